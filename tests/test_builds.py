"""Build safety and reuse: refused Dockerfile features, content-addressed tags, one build per
set of inputs, and the image mode's checks (fast: the fake runtime builds nothing)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dockyard.core.builds import Builder, build_inputs, check_dockerfile, image_tag
from dockyard.core.errors import BuildFailed, ValidationError
from dockyard.core.models import DeploymentSpec
from dockyard.core.source import FetchedSource
from tests.fakes import FakeRuntime


@pytest.mark.parametrize(
    ("dockerfile", "fragment"),
    [
        ("# syntax=docker/dockerfile:1\nFROM scratch\n", "# syntax="),
        ("#escape=`\n# Syntax = evil/frontend\nFROM scratch\n", "# syntax="),
        ("FROM scratch\nRUN --security=insecure id\n", "--security=insecure"),
        (
            "FROM scratch\nRUN --mount=type=cache,target=/x \\\n    --security insecure id\n",
            "--security=insecure",
        ),
        ("FROM scratch\nRUN --network=host wget x\n", "--network=host"),
        ("FROM scratch\nADD https://example.invalid/x.tgz /x\n", "ADD <url>"),
        ("FROM scratch\nadd --chown=1:1 git://example.invalid/r /r\n", "ADD <url>"),
    ],
)
def test_dangerous_dockerfiles_are_refused(dockerfile: str, fragment: str) -> None:
    with pytest.raises(BuildFailed) as info:
        check_dockerfile(dockerfile)
    assert info.value.reason == "dockerfile_refused"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    "dockerfile",
    [
        "FROM localhost/python:3.11-slim\nCOPY . /app\nRUN pip --version\n",
        "FROM scratch\n# a comment mentioning # syntax= later is fine\nRUN --network=none true\n",
        "FROM scratch\nADD local.tar.gz /x\n",
    ],
)
def test_ordinary_dockerfiles_pass(dockerfile: str) -> None:
    check_dockerfile(dockerfile)


def test_build_network_opt_in_is_allowed_only_with_the_flag() -> None:
    check_dockerfile("FROM scratch\nRUN --network=default true\n", network_allowed=True)


def _source(tmp_path: Path, commit: str = "a" * 40) -> FetchedSource:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    return FetchedSource(
        repo="https://github.com/Acme/Web.Agent",
        ref="main",
        resolved_ref="refs/heads/main",
        commit=commit,
        checkout=str(tmp_path),
        context=str(tmp_path),
        dockerfile=str(tmp_path / "Dockerfile"),
    )


def test_tags_are_content_addressed(tmp_path: Path) -> None:
    source = _source(tmp_path)
    spec = DeploymentSpec(id="x", repo=source.repo, build_args={"B": "1", "A": "2"})
    same = DeploymentSpec(id="other", repo=source.repo, build_args={"A": "2", "B": "1"})
    changed = DeploymentSpec(id="x", repo=source.repo, build_args={"A": "3", "B": "1"})
    assert build_inputs(spec, source) == build_inputs(same, source)
    assert build_inputs(spec, source) != build_inputs(changed, source)
    tag = image_tag(source, "0123456789abcdef")
    assert tag == f"localhost/dockyard/acme-web.agent:{'a' * 12}-01234567"


async def test_the_same_inputs_build_once_even_concurrently(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    builder = Builder(runtime=runtime)
    source = _source(tmp_path)
    spec = DeploymentSpec(id="x", repo=source.repo)
    first, second = await asyncio.gather(builder.build(spec, source), builder.build(spec, source))
    assert runtime.builds == 1
    assert first.image == second.image
    assert {first.reused, second.reused} == {False, True}
    other = DeploymentSpec(id="y", repo=source.repo)  # another deployment, same inputs
    assert (await builder.build(other, source)).reused is True
    assert runtime.builds == 1


async def test_build_network_needs_the_operator(tmp_path: Path) -> None:
    spec = DeploymentSpec(id="x", repo="https://github.com/a/b", build_network=True)
    with pytest.raises(ValidationError, match="build_network"):
        await Builder(runtime=FakeRuntime()).build(spec, _source(tmp_path))


async def test_image_mode_checks_the_allowlist_and_the_image(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    runtime.images["localhost/base:1"] = {}
    source = _source(tmp_path)
    spec = DeploymentSpec(
        id="x",
        repo=source.repo,
        build_mode="image",
        image="localhost/base:1",
        command=["python3", "main.py"],
    )
    built = await Builder(runtime=runtime).build(spec, source)
    assert built.image == "localhost/base:1" and built.mounts == [(source.context, "/app")]
    assert built.command == ["python3", "main.py"] and runtime.builds == 0
    with pytest.raises(ValidationError, match="not an allowed base image"):
        await Builder(runtime=runtime, allowed_base_images=["localhost/other:1"]).build(
            spec, source
        )
    missing = DeploymentSpec(id="x", repo=source.repo, build_mode="image", image="nope:1")
    with pytest.raises(ValidationError, match="never pulled"):
        await Builder(runtime=runtime).build(missing, source)


# A backtick-escaped Dockerfile with comment lines inside continued instructions: the safety
# check and the base-image check read it through one reader, so they see the same four
# instructions (a backslash ends no line here; the comments are not part of any instruction).
BACKTICK_DOCKERFILE = (
    "# escape=`\n"
    "ARG BASE=localhost/base:1\n"
    "FROM `\n"
    "  # which base: the ARG above\n"
    "  ${BASE} AS build\n"
    "RUN echo C:\\dir\\\n"
    "COPY --from=build `\n"
    "\n"
    "  # from the stage above\n"
    "  /a /b\n"
    "ADD `\n"
    "  # a URL on a continuation line\n"
    "  https://example.invalid/x.tgz /x\n"
)


def test_backtick_escapes_and_comments_in_continuations_read_alike() -> None:
    from dockyard.core.dockerfile import external_images, parse

    dockerfile = parse(BACKTICK_DOCKERFILE)
    assert dockerfile.escape == "`"
    assert [(i.line, i.text) for i in dockerfile.instructions] == [
        (2, "ARG BASE=localhost/base:1"),
        (3, "FROM ${BASE} AS build"),
        (6, "RUN echo C:\\dir\\"),
        (7, "COPY --from=build /a /b"),
        (11, "ADD https://example.invalid/x.tgz /x"),
    ]
    # The base-image check: the FROM spread over three lines names the ARG's image.
    assert external_images(BACKTICK_DOCKERFILE) == ["localhost/base:1"]
    # The safety check: the same ADD instruction, refused at its first line.
    with pytest.raises(BuildFailed, match="line 11: ADD <url>") as info:
        check_dockerfile(BACKTICK_DOCKERFILE)
    assert info.value.reason == "dockerfile_refused"
    # Without the ADD, the same file passes the safety check.
    check_dockerfile(BACKTICK_DOCKERFILE.split("ADD `")[0])


def test_a_backslash_does_not_continue_under_a_backtick_escape() -> None:
    """A ``RUN --network`` flag reads as a flag only when it starts an instruction: under
    ``# escape=`` a backslash is text, so the next line is an instruction of its own."""
    text = "# escape=`\nFROM scratch\nRUN echo \\\nRUN --network=host true\n"
    with pytest.raises(BuildFailed, match="line 4: RUN --network=host"):
        check_dockerfile(text)
    with pytest.raises(BuildFailed, match="invalid escape token"):
        check_dockerfile("# escape=x\nFROM scratch\n")
