"""What the engine floor (``backends/engine/``) gives every engine, on real engines (rootful
and rootless Podman, Docker): a build whose base image is not on the host is refused before
it starts, on both engines, and a backtick-escaped Dockerfile with comment lines inside its
continuations builds as ``core/dockerfile.py`` reads it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from dockyard.core.dockerfile import external_images
from dockyard.core.errors import BuildFailed
from dockyard.core.runtime import BuildRequest, Runtime
from tests.contract import conftest as contract
from tests.contract.conftest import TestImage, make_context

engine = contract.engine_fixture(contract.RUNTIMES)
token = contract.token
runtime = contract.runtime
test_image = contract.test_image


def _backtick_dockerfile(base: str) -> str:
    return (
        "# escape=`\n"
        f"ARG BASE={base}\n"
        "FROM `\n"
        "  # the base comes from the ARG above\n"
        "  ${BASE}\n"
        "RUN echo one `\n"
        "  # a comment inside the continuation\n"
        "  two > /www/escaped.txt\n"
    )


async def test_a_missing_base_image_is_refused_before_building(
    runtime: Runtime, tmp_path: Path
) -> None:
    missing = f"localhost/dyc-absent-{uuid.uuid4().hex[:8]}:1"
    dockerfile = _backtick_dockerfile(missing)
    assert external_images(dockerfile) == [missing]
    tag = f"localhost/dyc-refused-{uuid.uuid4().hex[:8]}:1"
    context = make_context(tmp_path / "ctx", dockerfile)
    lines: list[str] = []
    with pytest.raises(BuildFailed) as caught:
        await runtime.build(BuildRequest(context=str(context), tag=tag), lines.append)
    assert "is not on this host" in caught.value.message and missing in caught.value.message
    assert caught.value.detail["log_tail"] == [f"missing image: {missing}"]
    assert lines == [], "the build never started: the engine streamed nothing"
    assert not await runtime.image_exists(tag)


@pytest.mark.slow
async def test_a_backtick_escaped_dockerfile_builds_as_it_is_read(
    runtime: Runtime, test_image: TestImage, tmp_path: Path
) -> None:
    tag = f"localhost/dyc-backtick-{uuid.uuid4().hex[:8]}:1"
    context = make_context(tmp_path / "ctx", _backtick_dockerfile(test_image.tag))
    lines: list[str] = []
    try:
        built = await runtime.build(BuildRequest(context=str(context), tag=tag), lines.append)
        assert await runtime.image_exists(tag) and built.id
        # One RUN instruction: the comment was not part of it, the backtick continued it.
        steps = [" ".join(line.split()) for line in lines]
        assert any(step.endswith("RUN echo one two > /www/escaped.txt") for step in steps), lines
    finally:
        await runtime.remove_image(tag, force=True)
