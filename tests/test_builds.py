"""Build safety and reuse: refused Dockerfile features, content-addressed tags, one build per
set of inputs, and the image mode's checks (fast: the fake runtime builds nothing)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dockyard.core.builds import Builder, build_inputs, check_dockerfile, image_tag
from dockyard.core.errors import BuildFailed, ValidationError
from dockyard.core.models import DeploymentSpec
from dockyard.core.runtime import ImageInfo
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
    (tmp_path / "src").mkdir()
    source = _source(tmp_path / "src")
    spec = DeploymentSpec(
        id="x",
        repo=source.repo,
        build_mode="image",
        image="localhost/base:1",
        command=["python3", "main.py"],
    )
    builder = Builder(runtime=runtime, views_dir=tmp_path / "views")
    built = await builder.build(spec, source)
    [(view, target)] = built.mounts
    assert built.image == "localhost/base:1" and target == "/app"
    assert Path(view).parent == tmp_path / "views" and (Path(view) / "Dockerfile").is_file()
    assert built.tmpfs == {"/app/logs": 64} and built.workdir == "/app"
    assert built.command == ["python3", "main.py"] and runtime.builds == 0
    with pytest.raises(ValidationError, match="not an allowed base image"):
        await Builder(runtime=runtime, allowed_base_images=["localhost/other:1"]).build(
            spec, source
        )
    missing = DeploymentSpec(id="x", repo=source.repo, build_mode="image", image="nope:1")
    with pytest.raises(ValidationError, match="never pulled"):
        await Builder(runtime=runtime).build(missing, source)


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


async def test_image_mode_mounts_a_view_and_never_writes_into_the_cache(tmp_path: Path) -> None:
    """The source is mounted through a view: a world-readable copy without ``.git`` that has
    the ``logs`` mountpoint the ``/app/logs`` tmpfs needs, so the engine never creates it in
    the cached checkout (nor fails on a read-only one). Concurrent deploys share one view."""
    checkout = tmp_path / "cache" / "commit"
    (checkout / ".git").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("a" * 40)
    (checkout / "agent").mkdir()
    (checkout / "agent" / "main.py").write_text("app = None\n")
    (checkout / "agent" / "run.sh").write_text("#!/bin/sh\n")
    (checkout / "agent" / "run.sh").chmod(0o700)
    (checkout / "agent" / "secret.txt").write_text("x")
    (checkout / "agent" / "secret.txt").chmod(0o600)
    (checkout / "agent" / "link").symlink_to("main.py")
    (checkout / "agent" / "logs").mkdir()  # the repository's own: hidden by the tmpfs
    (checkout / "agent" / "logs" / "old.log").write_text("x")
    for path in (checkout, checkout / "agent"):
        path.chmod(0o700)
    before = _tree(checkout)
    source = FetchedSource(
        repo="https://github.com/a/b",
        ref=None,
        resolved_ref=None,
        commit="a" * 40,
        checkout=str(checkout),
        context=str(checkout / "agent"),
        dockerfile=None,
    )
    runtime = FakeRuntime()
    runtime.images["localhost/base:1"] = {}
    spec = DeploymentSpec(id="x", repo=source.repo, build_mode="image", image="localhost/base:1")
    builder = Builder(runtime=runtime, views_dir=tmp_path / "views")
    built = await asyncio.gather(*(builder.build(spec, source) for _ in range(4)))
    views = {b.mounts[0][0] for b in built}
    assert len(views) == 1, views
    view = Path(views.pop())
    assert sorted(p.name for p in view.iterdir()) == [
        "link",
        "logs",
        "main.py",
        "run.sh",
        "secret.txt",
    ]
    assert (view / "logs").is_dir() and not any((view / "logs").iterdir())
    assert (view / "link").is_symlink() and (view / "link").read_text() == "app = None\n"
    modes = {p.name: p.stat().st_mode & 0o7777 for p in view.iterdir() if not p.is_symlink()}
    assert modes == {"logs": 0o1777, "main.py": 0o644, "run.sh": 0o755, "secret.txt": 0o644}
    assert view.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "views").stat().st_mode & 0o777 == 0o700
    assert _tree(checkout) == before  # the cache is untouched
    assert not [p for p in (tmp_path / "views").iterdir() if p.name.startswith(".tmp-")]

    none = DeploymentSpec(
        id="x", repo=source.repo, build_mode="image", image="localhost/base:1", logs_tmpfs_mb=0
    )
    plain = await builder.build(none, source)
    assert plain.tmpfs == {}  # no mount: the repository's own logs/ is left as it is
    assert (Path(plain.mounts[0][0]) / "logs" / "old.log").read_text() == "x"
    assert _tree(checkout) == before


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


async def test_base_image_aliases_are_build_inputs(tmp_path: Path) -> None:
    """An image built while ``python:3.11-slim`` mapped to one local image is not reused
    once it maps to another, nor once that image was rebuilt (another id); a Dockerfile
    whose names map to nothing hashes as without aliases."""
    runtime = FakeRuntime()
    source = _source(tmp_path)
    (tmp_path / "Dockerfile").write_text("FROM docker.io/library/python:3.11-slim\n")
    spec = DeploymentSpec(id="x", repo=source.repo)
    runtime.images.update({"localhost/a:1": {}, "localhost/b:1": {}})

    def builder(target: str) -> Builder:
        return Builder(runtime=runtime, base_image_aliases={"python:3.11-slim": target})

    first = await builder("localhost/a:1").build(spec, source)
    assert (await builder("localhost/a:1").build(spec, source)).reused is True
    other = await builder("localhost/b:1").build(spec, source)
    assert other.image != first.image and other.reused is False
    runtime.image_info["localhost/a:1"] = ImageInfo(id="rebuilt", tags=["localhost/a:1"])
    rebuilt = await builder("localhost/a:1").build(spec, source)
    assert rebuilt.image not in (first.image, other.image) and rebuilt.reused is False
    assert runtime.builds == 3
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    plain = await Builder(runtime=runtime).build(spec, source)
    assert (await builder("localhost/a:1").build(spec, source)).image == plain.image
