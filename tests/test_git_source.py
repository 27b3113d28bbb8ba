"""The git source against real loopback servers (``git daemon`` and smart HTTP through
``git http-backend``): refs, caps, timeouts, redirects, symlinks, submodules, the cache,
and the URL parser (examples and a Hypothesis property)."""

from __future__ import annotations

import asyncio
import os
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pygit2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockyard.core.config import Settings
from dockyard.core.errors import SourceError
from dockyard.core.plugins import Registrar
from dockyard.core.source import FetchedSource, SourceLimits, SourceRequest
from dockyard.plugins import git_source
from dockyard.plugins.git_source import (
    GitSource,
    merge_refs,
    parse_repo_url,
    resolve_paths,
)
from tests.gitserver import (
    GitDaemon,
    Repo,
    RepoBuilder,
    SmartHttpServer,
    StallServer,
)

BIG_BLOBS = 4  # x 1 MiB of random bytes: incompressible
SMALL_CAP = 256 * 1024


# ---------------------------------------------------------------------------- fixtures
@dataclass
class World:
    """Served repositories, their interesting commits, and the servers."""

    daemon: GitDaemon
    http: SmartHttpServer
    sentinel: StallServer
    app: Repo
    first: str  # first commit of main (annotated tag v1 points here)
    main: str  # tip of main
    dev: str  # tip of dev
    light: str  # the lightweight tag's commit
    unreachable: str  # a commit no ref reaches
    big_size: int

    def url(self, transport: str, name: str) -> str:
        server = self.daemon if transport == "git" else self.http
        return f"{server.url}/{name}.git"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Builds the repositories once and serves them over git:// and http:// on 127.0.0.1."""
    root = tmp_path_factory.mktemp("gitsrv")
    builder = RepoBuilder(root / "srv")
    with StallServer() as sentinel:
        app = builder.new("app")
        app.write("Dockerfile", "FROM scratch\n").write("README", "one\n")
        first = app.commit("first")
        app.tag("v1", annotated=True)
        app.write("src/Dockerfile", "FROM scratch\nCOPY . /app\n").write("src/main.py", "app\n")
        app.write(".gitattributes", "*.bin filter=lfs diff=lfs merge=lfs -text\n")
        app.write("model.bin", "version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
        app.submodule("vendor/other", f"git://127.0.0.1:{sentinel.port}/other.git", first)
        light = app.commit("second")
        app.tag("light")
        app.branch("dev")
        app.write("dev.txt", "dev\n")
        dev = app.commit("dev work")
        app.switch("main")
        app.write("README", "three\n")
        main = app.commit("third")
        unreachable = app.dangling_commit()

        trunk = builder.new("trunk", branch="trunk")
        trunk.write("Dockerfile", "FROM scratch\n").commit()

        big = builder.new("big")
        for i in range(BIG_BLOBS):
            big.write(f"blob{i}", os.urandom(1024 * 1024))
        big.commit()
        big_size = sum((big.work / f"blob{i}").stat().st_size for i in range(BIG_BLOBS))

        bomb = builder.new("bomb")  # tiny pack, big checkout
        bomb.write("zeros", b"\0" * (2 * 1024 * 1024)).commit()

        many = builder.new("many")
        for i in range(30):
            many.write(f"f/{i}.txt", f"{i}\n")
        many.commit()

        escape_dir = builder.new("escape-dir")
        escape_dir.write("Dockerfile", "FROM scratch\n").symlink("sub", "../../etc").commit()

        escape_df = builder.new("escape-df")
        escape_df.symlink("Dockerfile", "/etc/passwd").commit()

        escape_chain = builder.new("escape-chain")  # each link alone looks harmless
        escape_chain.write("a/b/c/keep", "x").symlink("a/b/l", "../../a")
        escape_chain.symlink("m", "a/b/l/../..").write("Dockerfile", "FROM scratch\n").commit()

        inner = builder.new("inner-links")
        inner.write("docker/Dockerfile", "FROM scratch\n").write("src/app.py", "x\n")
        inner.symlink("Dockerfile", "docker/Dockerfile").symlink("ctx", "src").commit()

        builder.new("empty")

        with GitDaemon(builder.root) as daemon, SmartHttpServer(builder.root) as http:
            yield World(
                daemon=daemon,
                http=http,
                sentinel=sentinel,
                app=app,
                first=first,
                main=main,
                dev=dev,
                light=light,
                unreachable=unreachable,
                big_size=big_size,
            )


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "sources"


def make_source(cache: Path, **limits: Any) -> GitSource:
    return GitSource(cache, insecure=True, limits=SourceLimits(**limits))


def assert_nothing_left(cache: Path) -> None:
    """A refused fetch leaves no file or directory in the cache."""
    assert not cache.exists() or not any(cache.iterdir()), sorted(cache.rglob("*"))


def head_of(checkout: str) -> str:
    return str(pygit2.Repository(checkout).head.target)


async def refused(source: GitSource, reason: str, **request: Any) -> SourceError:
    with pytest.raises(SourceError) as info:
        await source.fetch(SourceRequest(**request))
    assert info.value.reason == reason, info.value.to_dict()
    return info.value


def check_fetched(got: FetchedSource, commit: str) -> None:
    assert got.commit == commit
    assert head_of(got.checkout) == commit
    assert Path(got.checkout).name == commit
    assert got.dockerfile == os.path.join(got.checkout, "Dockerfile")


TRANSPORTS = pytest.mark.parametrize("transport", ["git", "http"])


# ---------------------------------------------------------------------------- refs
@TRANSPORTS
async def test_branch_tags_commit_and_default_branch(
    world: World, cache: Path, transport: str
) -> None:
    source = make_source(cache)
    url = world.url(transport, "app")

    default = await source.fetch(SourceRequest(repo=url))
    check_fetched(default, world.main)
    assert default.resolved_ref == "refs/heads/main" and default.ref is None
    assert default.repo == url and not default.cached and default.bytes_received > 0
    assert (Path(default.checkout) / "README").read_text() == "three\n"

    dev = await source.fetch(SourceRequest(repo=url, ref="dev"))
    check_fetched(dev, world.dev)
    assert dev.resolved_ref == "refs/heads/dev"
    assert (Path(dev.checkout) / "dev.txt").read_text() == "dev\n"

    annotated = await source.fetch(SourceRequest(repo=url, ref="v1"))
    check_fetched(annotated, world.first)  # peeled to the commit
    assert annotated.resolved_ref == "refs/tags/v1"
    assert not (Path(annotated.checkout) / "src").exists()

    light = await source.fetch(SourceRequest(repo=url, ref="refs/tags/light"))
    check_fetched(light, world.light)
    assert light.resolved_ref == "refs/tags/light"

    commit = await source.fetch(SourceRequest(repo=url, ref=world.dev.upper()))
    assert commit.commit == world.dev and commit.ref == world.dev
    assert commit.resolved_ref is None and commit.cached  # dev was fetched above

    # A commit no branch or tag reaches, fetched by SHA for the first time.
    older = await make_source(cache / "fresh").fetch(SourceRequest(repo=url, ref=world.light))
    check_fetched(older, world.light)
    assert older.resolved_ref is None and not older.cached


async def test_other_default_branch(world: World, cache: Path) -> None:
    got = await make_source(cache).fetch(SourceRequest(repo=world.url("git", "trunk")))
    assert got.resolved_ref == "refs/heads/trunk"
    assert head_of(got.checkout) == got.commit


@TRANSPORTS
async def test_missing_refs_are_refused(world: World, cache: Path, transport: str) -> None:
    source = make_source(cache)
    url = world.url(transport, "app")
    err = await refused(source, "ref_not_found", repo=url, ref="no-such-branch")
    assert "no-such-branch" in err.message
    short = world.main[:7]
    mixed = any(c.isdigit() for c in short) and any(c.isalpha() for c in short)
    err = await refused(
        source, "invalid_repo_url" if mixed else "ref_not_found", repo=url, ref=short
    )
    assert "40-hex" in err.message
    err = await refused(source, "ref_not_found", repo=url, ref=world.unreachable)
    assert world.unreachable in err.message
    err = await refused(source, "ref_not_found", repo=url, ref="a" * 40)
    await refused(source, "ref_not_found", repo=url, ref="bad..ref")
    await refused(source, "ref_not_found", repo=world.url(transport, "empty"))
    assert_nothing_left(cache)


@pytest.mark.parametrize("ref", ["3f9c2a1", "ABC1234", "3f9c2a1b7d4e", "0a1b" + "2" * 35])
async def test_abbreviated_commits_are_refused_before_any_fetch(cache: Path, ref: str) -> None:
    """The README's promise: a short SHA is refused at admission, nothing fetched (the
    repository here does not even answer: a fetch would end ``repo_unreachable``)."""
    source = make_source(cache)
    with StallServer() as closed:
        port = closed.port
    url = f"git://127.0.0.1:{port}/acme/agent.git"
    with pytest.raises(SourceError) as info:
        source.validate(url, ref)
    assert info.value.reason == "invalid_repo_url"
    assert "abbreviated commit" in info.value.message and "40-hex" in info.value.message
    err = await refused(source, "invalid_repo_url", repo=url, ref=ref)
    assert err.detail == {"ref": ref}
    with pytest.raises(SourceError) as info:
        source.validate(f"https://github.com/acme/agent/tree/{ref}", None)
    assert info.value.reason == "invalid_repo_url"
    assert_nothing_left(cache)


@pytest.mark.parametrize("ref", ["deadbeef", "20240101", "cafe", "v1.2", "a" * 40])
async def test_hex_looking_names_are_still_looked_up(cache: Path, ref: str) -> None:
    """Digits only or letters only is a plausible branch or tag name: it is looked up on
    the remote (which does not answer here)."""
    source = make_source(cache)
    source.validate("https://github.com/acme/agent", ref)
    with StallServer() as closed:
        port = closed.port
    await refused(source, "repo_unreachable", repo=f"git://127.0.0.1:{port}/a.git", ref=ref)


@TRANSPORTS
async def test_unreachable_repository(world: World, cache: Path, transport: str) -> None:
    source = make_source(cache)
    await refused(source, "repo_unreachable", repo=world.url(transport, "does-not-exist"))
    with StallServer() as closed:
        port = closed.port
    await refused(source, "repo_unreachable", repo=f"{transport}://127.0.0.1:{port}/x.git")
    assert_nothing_left(cache)


async def test_local_paths_when_insecure(world: World, cache: Path) -> None:
    path = world.app.git_dir
    got = await make_source(cache).fetch(SourceRequest(repo=str(path), ref="dev"))
    check_fetched(got, world.dev)
    assert got.repo == f"file://{path}"
    again = await make_source(cache).fetch(SourceRequest(repo=f"file://{path}", ref="dev"))
    assert again.cached and again.checkout == got.checkout
    with pytest.raises(SourceError) as info:
        await GitSource(cache).fetch(SourceRequest(repo=str(path)))
    assert info.value.reason == "invalid_repo_url"


async def test_only_the_operators_local_repos_are_trusted(world: World, cache: Path) -> None:
    """``local_repos`` trusts exactly the listed paths, nothing else local or loopback."""
    path = world.app.git_dir
    source = GitSource(cache, local_repos=[str(path)])
    got = await source.fetch(SourceRequest(repo=str(path), ref="dev"))
    check_fetched(got, world.dev)
    source.validate(str(path), "dev")
    for other in (str(path.parent), f"{path}/..", "/etc", "git://127.0.0.1:1/x"):
        with pytest.raises(SourceError) as info:
            source.validate(other, None)
        assert info.value.reason == "invalid_repo_url"


# ---------------------------------------------------------------------------- paths
async def test_subdirectory_and_dockerfile(world: World, cache: Path) -> None:
    source = make_source(cache)
    url = world.url("http", "app")
    got = await source.fetch(SourceRequest(repo=url, subdir="src"))
    assert got.context == os.path.join(got.checkout, "src")
    assert got.dockerfile == os.path.join(got.checkout, "src", "Dockerfile")
    root_df = await source.fetch(SourceRequest(repo=url, subdir="src", dockerfile="../Dockerfile"))
    assert root_df.dockerfile == os.path.join(got.checkout, "Dockerfile") and root_df.cached
    no_df = await source.fetch(SourceRequest(repo=url, subdir="src/", dockerfile=None))
    assert no_df.dockerfile is None


@pytest.mark.parametrize(
    ("subdir", "dockerfile", "reason"),
    [
        ("nope", "Dockerfile", "subdir_not_found"),
        ("README", None, "subdir_not_found"),
        ("src", "Nope", "dockerfile_not_found"),
        ("", "src", "dockerfile_not_found"),
    ],
)
async def test_missing_paths(
    world: World, cache: Path, subdir: str, dockerfile: str | None, reason: str
) -> None:
    repo = world.url("http", "app")
    source = make_source(cache)
    err = await refused(source, reason, repo=repo, subdir=subdir, dockerfile=dockerfile)
    assert err.detail["commit"] == world.main  # refused after the fetch: the commit is known
    assert_nothing_left(cache)  # checked before the checkout is published
    # The same refusal of a cached checkout says its commit too.
    await source.fetch(SourceRequest(repo=repo, subdir="", dockerfile=None))
    err = await refused(source, reason, repo=repo, subdir=subdir, dockerfile=dockerfile)
    assert err.detail["commit"] == world.main


@pytest.mark.parametrize(
    ("subdir", "dockerfile"),
    [
        ("..", "Dockerfile"),
        ("../x", "Dockerfile"),
        ("src/../..", "Dockerfile"),
        ("/etc", "Dockerfile"),
        ("", "../Dockerfile"),
        ("src", "../../Dockerfile"),
        ("", "/etc/passwd"),
        (".git", None),
        ("", ".git/config"),
    ],
)
async def test_paths_escaping_lexically(
    world: World, cache: Path, subdir: str, dockerfile: str | None
) -> None:
    before = len(world.http.requests)
    await refused(
        make_source(cache),
        "path_escapes_repo",
        repo=world.url("http", "app"),
        subdir=subdir,
        dockerfile=dockerfile,
    )
    assert len(world.http.requests) == before  # refused before contacting the server
    assert_nothing_left(cache)


@pytest.mark.parametrize("name", ["escape-dir", "escape-df", "escape-chain"])
async def test_escaping_symlinks_refuse_the_repository(
    world: World, cache: Path, name: str
) -> None:
    err = await refused(make_source(cache), "path_escapes_repo", repo=world.url("git", name))
    assert "symlink" in err.message
    assert len(err.detail["commit"]) == 40  # the commit that was refused
    assert_nothing_left(cache)


async def test_symlinks_inside_the_repository_are_resolved(world: World, cache: Path) -> None:
    source = make_source(cache)
    url = world.url("git", "inner-links")
    got = await source.fetch(SourceRequest(repo=url))
    assert got.dockerfile == os.path.join(got.checkout, "docker", "Dockerfile")
    via_link = await source.fetch(SourceRequest(repo=url, subdir="ctx", dockerfile=None))
    assert via_link.context == os.path.join(got.checkout, "src")


def test_resolve_paths_follows_symlinks(tmp_path: Path) -> None:
    """The realpath layer on its own (e.g. a checkout changed after it was cached)."""
    root = tmp_path / "checkout"
    (root / "src").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "src" / "Dockerfile").write_text("FROM scratch\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "Dockerfile").write_text("FROM scratch\n")
    (root / "out").symlink_to(outside)
    (root / "df").symlink_to("/etc/passwd")
    (root / "gitlink").symlink_to(".git")

    assert resolve_paths(str(root), "src", "Dockerfile")[1] == str(root / "src" / "Dockerfile")
    for subdir, dockerfile in [("out", "Dockerfile"), ("", "df"), ("gitlink", None)]:
        with pytest.raises(SourceError) as info:
            resolve_paths(str(root), subdir, dockerfile)
        assert info.value.reason == "path_escapes_repo", (subdir, dockerfile)


# ---------------------------------------------------------------------------- caps
@TRANSPORTS
async def test_byte_cap_aborts_the_download_early(
    world: World, cache: Path, transport: str
) -> None:
    source = make_source(cache, max_bytes=SMALL_CAP)
    err = await refused(source, "repo_too_large", repo=world.url(transport, "big"))
    received = err.detail["bytes_received"]
    assert SMALL_CAP < received < world.big_size / 4, (received, world.big_size)
    assert_nothing_left(cache)


async def test_unpacked_size_is_capped_too(world: World, cache: Path) -> None:
    source = make_source(cache, max_bytes=1024 * 1024)
    err = await refused(source, "repo_too_large", repo=world.url("git", "bomb"))
    assert err.detail["checkout_bytes_seen"] > 1024 * 1024
    assert_nothing_left(cache)


async def test_file_cap(world: World, cache: Path) -> None:
    err = await refused(
        make_source(cache, max_files=10), "repo_too_large", repo=world.url("git", "many")
    )
    assert err.detail["max_files"] == 10
    assert_nothing_left(cache)
    ok = await make_source(cache, max_files=40).fetch(
        SourceRequest(repo=world.url("git", "many"), dockerfile=None)
    )
    assert ok.files == 30


@TRANSPORTS
async def test_stalled_server_times_out(cache: Path, transport: str) -> None:
    source = make_source(cache, timeout_s=1.0)
    with StallServer() as stall:
        started = time.monotonic()
        await refused(source, "fetch_timeout", repo=f"{transport}://127.0.0.1:{stall.port}/r.git")
        elapsed = time.monotonic() - started
        assert stall.connections >= 1
    assert 1.0 <= elapsed < 2.5, elapsed
    assert_nothing_left(cache)


# ---------------------------------------------------------------------------- safety
async def test_submodules_hooks_and_filters_are_not_run(world: World, cache: Path) -> None:
    got = await make_source(cache).fetch(SourceRequest(repo=world.url("http", "app")))
    sub = Path(got.checkout) / "vendor" / "other"
    assert not sub.exists() or not any(sub.iterdir())
    assert world.sentinel.connections == 0  # the submodule's server was never contacted
    # No LFS smudge: the pointer file is checked out as committed.
    assert (Path(got.checkout) / "model.bin").read_text().startswith("version https://git-lfs")


async def test_redirect_to_another_host_is_refused(world: World, cache: Path) -> None:
    target = f"http://localhost:{world.http.port}"
    with SmartHttpServer(world.http.base, redirect_to=target) as redirector:
        before = len(world.http.requests)
        err = await refused(
            make_source(cache), "repo_unreachable", repo=f"{redirector.url}/app.git"
        )
        assert "redirect" in err.message
        assert redirector.requests and len(world.http.requests) == before
    assert_nothing_left(cache)


# ---------------------------------------------------------------------------- cache
async def test_cache_reuse_and_integrity(world: World, cache: Path) -> None:
    source = make_source(cache)
    url = world.url("http", "app")
    first = await source.fetch(SourceRequest(repo=url, ref=world.dev))
    assert not first.cached and first.bytes_received > 0

    requests = len(world.http.requests)
    again = await source.fetch(SourceRequest(repo=url, ref=world.dev))
    assert again.cached and again.checkout == first.checkout
    assert again.files == first.files and again.bytes_received == 0
    assert len(world.http.requests) == requests  # by SHA: no network at all

    by_branch = await source.fetch(SourceRequest(repo=url, ref="dev"))
    assert by_branch.cached and by_branch.commit == world.dev
    new = world.http.requests[requests:]
    assert new and not any("POST" in r for r in new)  # ls-remote only, no pack
    assert by_branch.resolved_ref == "refs/heads/dev"

    # Only complete checkouts are visible: one entry per commit, no leftovers.
    entries = [p.name for p in Path(first.checkout).parent.iterdir()]
    assert entries == [world.dev]

    # A cached entry whose HEAD is not its commit is not trusted (by branch, by SHA).
    for ref in ("dev", world.dev):
        (Path(first.checkout) / ".git" / "HEAD").write_text(world.main + "\n")
        refetched = await source.fetch(SourceRequest(repo=url, ref=ref))
        assert not refetched.cached and refetched.checkout == first.checkout
        assert head_of(refetched.checkout) == world.dev
        assert [p.name for p in Path(first.checkout).parent.iterdir()] == [world.dev]


async def test_concurrent_fetches_of_one_commit(world: World, cache: Path) -> None:
    source = make_source(cache)
    request = SourceRequest(repo=world.url("git", "app"), ref=world.main)
    results = await asyncio.gather(*(source.fetch(request) for _ in range(3)))
    assert {r.checkout for r in results} == {results[0].checkout}
    assert head_of(results[0].checkout) == world.main
    assert [p.name for p in Path(results[0].checkout).parent.iterdir()] == [world.main]


# ---------------------------------------------------------------------------- URLs
HOSTILE_URLS = [
    "",
    "github.com/a/b",
    "file:///etc",
    "/srv/git/repo.git",
    "ssh://git@github.com/a/b.git",
    "git+ssh://github.com/a/b",
    "git@github.com:a/b.git",
    "https://u:p@github.com/a/b",
    "https://u@github.com/a/b",
    "https://@github.com/a/b",
    "https://gitlab.com/a/b",
    "https://github.com.evil.com/a/b",
    "https://evil.com/github.com/a/b",
    "https://github.com./a/b",
    "https://127.0.0.1/a/b",
    "ext::sh -c touch% /tmp/pwned",
    "https::github.com/a/b",
    "https://github.com/a/b::c",
    "https://github.com:443/a/b",
    "https://github.com:/a/b",
    "https://github.com/a/b?ref=main",
    "https://github.com/a/b#main",
    "https://github.com/a/%2e%2e",
    "https://github.com/a%2fb/c",
    "https://github.com/a\\b/c",
    "https://github.com/a/b c",
    "https://github.com/a/b\n",
    "https://github.com/a/b\x00",
    "https://github.com/a/b\t",
    "https://gith\u00fcb.com/a/b",
    "https://github.com/a",
    "https://github.com/",
    "https://github.com",
    "https://github.com//a/b",
    "https://github.com/a//b",
    "https://github.com/-a/b",
    "https://github.com/a/-b",
    "https://github.com/a/.",
    "https://github.com/a/..",
    "https://github.com/a/.git",
    "https://github.com/a_b/c",
    "https://github.com/" + "a" * 40 + "/b",
    "https://github.com/a/" + "b" * 101,
    "https://github.com/a/b/blob/main/README.md",
    "https://github.com/a/b/pulls",
    "https://github.com/a/b/tree/",
    "https://github.com/a/b/tree/..",
    "https://github.com/a/b/tree/a..b",
    "https://github.com/a/b/tree/-x",
    "https://github.com/a/b/tree/x.lock",
    "https://github.com/a/b/commit/abc1234",
    "https://github.com/a/b/commit/" + "g" * 40,
    "https://github.com/a/b/commit/" + "a" * 40 + "/x",
    "http://github.com/a/b",
    "git://github.com/a/b",
    "http://127.0.0.1:8080/a.git",
    "git://127.0.0.1/a.git",
    "HTTP://127.0.0.1/a.git",
    "https://github.com/a/b" + "c" * 600,
]

HOSTILE_EVEN_WHEN_INSECURE = [
    "http://10.0.0.1/a.git",
    "git://192.168.1.1:9418/a.git",
    "http://localhost:8080/a.git",
    "http://127.0.0.1.evil.com/a.git",
    "http://127.0.0.256/a.git",
    "http://127.0.0.01/a.git",
    "http://0x7f.0.0.1/a.git",
    "http://2130706433/a.git",
    "http://[::1]:8080/a.git",
    "http://u@127.0.0.1/a.git",
    "http://127.0.0.1:0/a.git",
    "http://127.0.0.1:65536/a.git",
    "http://127.0.0.1:80x/a.git",
    "http://127.0.0.1/../a.git",
    "http://127.0.0.1/a/./b.git",
    "git://127.0.0.1",
    "file://host/a.git",
    "file://../a.git",
    "/srv/../etc",
    "/srv//a.git",
    "relative/path.git",
    "ssh://127.0.0.1/a.git",
    "https://127.0.0.1/a/b",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
async def test_hostile_urls_are_refused(url: str, cache: Path) -> None:
    with pytest.raises(SourceError) as info:
        parse_repo_url(url)
    assert info.value.reason == "invalid_repo_url"
    assert info.value.message
    await refused(GitSource(cache), "invalid_repo_url", repo=url)
    assert not cache.exists()


@pytest.mark.parametrize("url", HOSTILE_EVEN_WHEN_INSECURE)
def test_hostile_urls_are_refused_when_insecure(url: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_repo_url(url, insecure=True)
    assert info.value.reason == "invalid_repo_url"


@pytest.mark.parametrize(
    ("url", "normalized", "ref"),
    [
        ("https://github.com/a/b", "https://github.com/a/b", None),
        ("https://github.com/a/b.git", "https://github.com/a/b", None),
        ("https://github.com/a/b/", "https://github.com/a/b", None),
        ("HTTPS://GitHub.COM/Owner-1/Repo.name_x", "https://github.com/Owner-1/Repo.name_x", None),
        ("https://github.com/a/.github", "https://github.com/a/.github", None),
        ("https://github.com/a/b/tree/main", "https://github.com/a/b", "main"),
        ("https://github.com/a/b/tree/feature/x-1", "https://github.com/a/b", "feature/x-1"),
        ("https://github.com/a/b/tree/v1.2.3/", "https://github.com/a/b", "v1.2.3"),
        ("https://github.com/a/b/commit/" + "A" * 40, "https://github.com/a/b", "a" * 40),
    ],
)
def test_github_url_forms(url: str, normalized: str, ref: str | None) -> None:
    parsed = parse_repo_url(url)
    assert (parsed.normalized, parsed.ref_from_url, parsed.host) == (normalized, ref, "github.com")
    assert parsed.fetch_url == normalized + ".git"


def test_allowlist_and_loopback_forms() -> None:
    parsed = parse_repo_url("https://git.example.org/team/x", ["GitHub.com", "Git.Example.org"])
    assert parsed.normalized == "https://git.example.org/team/x"
    loop = parse_repo_url("git://127.1.2.3:9418/srv/a.git", insecure=True)
    assert loop.normalized == loop.fetch_url == "git://127.1.2.3:9418/srv/a.git"
    assert loop.repo == "a" and not loop.local
    local = parse_repo_url("file:///srv/x.git", insecure=True)
    assert local.local and local.fetch_url == "file:///srv/x.git"


async def test_conflicting_refs(cache: Path) -> None:
    assert merge_refs("main", "main") == "main"
    assert merge_refs("a" * 40, "A" * 40) == "a" * 40
    assert merge_refs(None, "dev") == "dev" and merge_refs("dev", None) == "dev"
    err = await refused(
        GitSource(cache),
        "invalid_repo_url",
        repo="https://github.com/a/b/tree/main",
        ref="dev",
    )
    assert "main" in err.message and "dev" in err.message


STRICT = re.compile(r"https://github\.com/[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}")
URLISH = st.builds(
    "{}{}{}".format,
    st.sampled_from(["https://", "HTTPS://", "http://", "git://", "file://", "", "ssh://"]),
    st.sampled_from(
        [
            "github.com",
            "GitHub.com",
            "evil.com",
            "github.com.evil.com",
            "u@github.com",
            "github.com:443",
            "127.0.0.1",
            "127.0.0.1:9418",
            "",
            "github.com.",
        ]
    ),
    st.text(alphabet=string.ascii_letters + string.digits + "/._-:@%?#\\ ~+", max_size=60),
)


@settings(max_examples=400, deadline=None)
@given(url=st.one_of(st.text(max_size=120), URLISH), insecure=st.booleans())
def test_parser_property(url: str, insecure: bool) -> None:
    """Never anything but SourceError; whatever is accepted is strict and allowlisted."""
    try:
        parsed = parse_repo_url(url, ["github.com"], insecure)
    except SourceError as exc:
        assert exc.reason == "invalid_repo_url" and exc.message
        return
    if parsed.normalized.startswith("https://"):
        assert STRICT.fullmatch(parsed.normalized), parsed
        assert parsed.host == "github.com" and parsed.repo not in (".", "..")
    else:
        assert insecure
        assert re.fullmatch(
            r"(git|http)://127\.\d+\.\d+\.\d+(:\d+)?/[\w./-]+|file:///[\w./-]+", parsed.normalized
        ), parsed
        assert "/../" not in parsed.normalized + "/" and "/./" not in parsed.normalized + "/"
    if parsed.ref_from_url is not None:
        assert re.fullmatch(r"[A-Za-z0-9._/+-]+", parsed.ref_from_url)
        assert ".." not in parsed.ref_from_url


# ---------------------------------------------------------------------------- plugin
def test_registration_and_settings(tmp_path: Path) -> None:
    register: Registrar[Any] = Registrar("source")
    git_source.dockyard_register_sources(register=register)
    cfg = Settings(
        data_dir=str(tmp_path),
        allowed_git_hosts=["github.com", "Git.Example.org"],
        fetch_timeout_s=30,
        fetch_max_bytes=1024 * 1024,
        fetch_max_files=100,
    )
    source = register.get("git")(cfg)
    assert isinstance(source, GitSource) and source.name == "git"
    assert source.cache_dir == tmp_path / "sources"
    assert source.allowed_hosts == ("github.com", "git.example.org") and not source.insecure
    assert source.limits == SourceLimits(timeout_s=30, max_bytes=1024 * 1024, max_files=100)
    assert source.accepts("https://github.com/a/b") and source.accepts("git@github.com:a/b")
    assert source.accepts("/srv/a.git") and not source.accepts("s3://bucket/x")


async def test_host_git_config_is_ignored(
    world: World, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ~/.gitconfig rewriting URLs (insteadOf) or following redirects has no effect."""
    home = tmp_path / "home"
    (home / ".config" / "git").mkdir(parents=True)
    rewrite = (
        f'[url "http://127.0.0.1:{world.sentinel.port}/"]\n\tinsteadOf = {world.daemon.url}/\n'
        "[http]\n\tfollowRedirects = true\n"
    )
    (home / ".gitconfig").write_text(rewrite)
    (home / ".config" / "git" / "config").write_text(rewrite)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    got = await make_source(cache, timeout_s=10).fetch(
        SourceRequest(repo=world.url("git", "app"), ref="dev")
    )
    assert got.commit == world.dev
    assert world.sentinel.connections == 0
