"""Cold-deploy benchmark: dockyard against the Podman CLI doing the same steps, and the fetch
alone against ``git clone --depth 1``.

    python bench/deploy.py [--runs 5] [--apps busybox,example] [--check] [--json]

A loopback ``git daemon`` serves two apps: a busybox ``httpd`` image built ``FROM scratch``
and the example agent (``contrib/example-agent`` on ``localhost/dockyard/base-python:
bookworm``, built by ``contrib/base-image/build.sh``; skipped when that image is missing).
Every run commits a new version of each app, so nothing is cached: neither the checkout nor
the image's last layers.

- **dockyard**: a real controller (rootful Podman through its API service, SQLite, the git
  source, the ``none`` router) creates a deployment; timed from the call to the first 200
  from the promoted slot's port.
- **podman CLI** (the baseline, same run, alternating order): ``git clone --depth 1``,
  ``podman build --network none --pull=never``, ``podman run -d -p``, then ``GET /health``
  every 10 ms until 200.
- **fetch**: ``GitSource.fetch`` of a new commit against ``git clone --depth 1`` of it.

Targets: deploy ratio ≤ 1.05 for both apps. Only 127.0.0.1 is used; every container and
image made here is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Row, add_report_options, median, podman_controller, run_benchmark, spread

from dockyard.core.controller import Controller
from dockyard.core.models import DeploymentSpec, HealthCheck, SlotState
from dockyard.core.services import Services
from dockyard.core.source import SourceRequest
from tests.gitserver import GIT_ENV, GitDaemon, RepoBuilder

TARGET_RATIO = 1.05
BASE_IMAGE = "localhost/dockyard/base-python:bookworm"
BUSYBOX_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www /www
CMD ["httpd", "-f", "-p", "8000", "-h", "/www"]
"""
PORTS = (48500, 48560)
BENCH_IMAGES = "localhost/dockyard-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Apps:
    """The served repositories; ``commit(app)`` makes a new version and returns its SHA."""

    def __init__(self, root: Path) -> None:
        self.builder = RepoBuilder(root)
        self.repos: dict[str, Any] = {}
        self.versions = 0

    def add_busybox(self) -> None:
        repo = self.builder.new("busybox-app")
        repo.write("busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
        repo.write("Dockerfile", BUSYBOX_DOCKERFILE)
        repo.write("www/health", "ok")
        self.repos["busybox"] = repo

    def add_example(self) -> None:
        repo = self.builder.new("example-agent")
        source = ROOT / "contrib" / "example-agent"
        repo.write("Dockerfile", (source / "Dockerfile").read_text())
        repo.write("agent.py", (source / "agent.py").read_text())
        self.repos["example"] = repo

    def commit(self, app: str) -> str:
        self.versions += 1
        repo = self.repos[app]
        if app == "busybox":
            repo.write("www/index.html", f"version {self.versions}\n")
        else:
            repo.write("VERSION", f"{self.versions}\n")
            dockerfile = (ROOT / "contrib" / "example-agent" / "Dockerfile").read_text()
            repo.write("Dockerfile", dockerfile + "COPY VERSION /srv/VERSION\n")
        return str(repo.commit(f"v{self.versions}"))


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=600
    )


def cli_deploy(url: str, commit: str, work: Path, tag: str, name: str) -> dict[str, float]:
    """The baseline: clone, build, run, poll; seconds per step and in all."""
    steps: dict[str, float] = {}
    started = time.monotonic()
    checkout = work / name
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", "--no-tags", url, str(checkout)],
        env=GIT_ENV,
        check=True,
        capture_output=True,
        timeout=120,
    )
    head = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"],
        env=GIT_ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert head == commit, (head, commit)
    steps["clone"] = time.monotonic() - started
    podman("build", "-q", "--network", "none", "--pull=never", "-t", tag, str(checkout))
    steps["build"] = time.monotonic() - started
    port = free_port()
    podman(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", tag,
    )  # fmt: skip
    steps["run"] = time.monotonic() - started
    deadline = time.monotonic() + 60
    while not answers(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} never answered")
        time.sleep(0.01)
    steps["total"] = time.monotonic() - started
    return steps


async def dockyard_deploy(
    controller: Controller, url: str, commit: str, deployment_id: str
) -> dict[str, float]:
    started = time.monotonic()
    spec = DeploymentSpec(
        id=deployment_id,
        repo=url,
        ref=commit,
        grace_period_s=0,
        health=HealthCheck(interval_s=1.0, timeout_s=2, deadline_s=60),
    )
    await controller.create(spec)
    if not await controller.wait(deployment_id, 300):
        raise RuntimeError(f"{deployment_id}: the deploy did not end")
    op = controller.operation(deployment_id)
    if op and op.error:
        raise RuntimeError(f"{deployment_id}: {op.error}")
    slots = await controller.services.store.list_slots(deployment_id)
    promoted = next(s for s in slots if s.state is SlotState.PROMOTED)
    assert promoted.host_port is not None
    while not await asyncio.to_thread(answers, promoted.host_port):
        await asyncio.sleep(0.01)
    total = time.monotonic() - started
    steps = {"total": total}
    events = await controller.services.store.list_events(deployment_id)
    first = events[0].at if events else 0.0
    for event in events:
        if event.kind == "source_fetched":
            steps.setdefault("fetched", event.at - first)
        if event.to_state is SlotState.STAGING:
            steps.setdefault("staging", event.at - first)
        if event.to_state is SlotState.HEALTHY:
            steps.setdefault("healthy", event.at - first)
    return steps


async def measure(args: argparse.Namespace) -> list[Row]:
    if shutil.which("podman") is None:
        return [Row("deploy", "skipped: podman is not installed", float("nan"), "")]
    rows: list[Row] = []
    apps_wanted = [a.strip() for a in args.apps.split(",") if a.strip()]
    made_images: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dockyard-bench-deploy-") as tmp:
        work = Path(tmp)
        apps = Apps(work / "served")
        apps.add_busybox()
        have_base = podman("image", "exists", BASE_IMAGE, check=False).returncode == 0
        if "example" in apps_wanted and have_base:
            apps.add_example()
        for app in apps_wanted:
            apps.commit(app) if app in apps.repos else None
        services, controller = await podman_controller(work / "data", PORTS)
        try:
            with GitDaemon(apps.builder.root) as daemon:
                for app in apps_wanted:
                    if app not in apps.repos:
                        rows.append(
                            Row(
                                "deploy",
                                f"{app}: skipped",
                                float("nan"),
                                "",
                                note=f"{BASE_IMAGE} is missing: contrib/base-image/build.sh",
                            )
                        )
                        continue
                    url = f"{daemon.url}/{apps.repos[app].name}"
                    ours: list[float] = []
                    theirs: list[float] = []
                    details: dict[str, list[float]] = {}
                    for run in range(args.runs + 1):  # run 0 warms caches, not counted
                        for who in ("cli", "dockyard") if run % 2 else ("dockyard", "cli"):
                            commit = apps.commit(app)
                            name = f"bench-{app}-{who}-{run}"
                            if who == "cli":
                                tag = f"{BENCH_IMAGES}/{app}:{commit[:12]}"
                                made_images.append(tag)
                                try:
                                    steps = await asyncio.to_thread(
                                        cli_deploy, url, commit, work / "clones", tag, name
                                    )
                                finally:
                                    podman("rm", "-f", "-t", "0", name, check=False)
                                if run:
                                    theirs.append(steps["total"])
                            else:
                                try:
                                    steps = await dockyard_deploy(controller, url, commit, name)
                                    for revision in await services.store.list_revisions(name):
                                        if revision.image_tag:
                                            made_images.append(revision.image_tag)
                                finally:
                                    with contextlib.suppress(Exception):
                                        await controller.delete(name)
                                if run:
                                    ours.append(steps["total"])
                            if run:
                                for key, value in steps.items():
                                    details.setdefault(f"{who} {key}", []).append(value)
                    note = ", ".join(
                        f"{key} {median(values):.2f} s" for key, values in sorted(details.items())
                    )
                    # From asking for the container to the first healthy answer seen: dockyard's
                    # probes (at once, then backing off) against podman run + polling every
                    # 10 ms.
                    healthy, staging = details["dockyard healthy"], details["dockyard staging"]
                    ours_up = [h - s for h, s in zip(healthy, staging, strict=True)]
                    total, built = details["cli total"], details["cli build"]
                    theirs_up = [t - b for t, b in zip(total, built, strict=True)]
                    rows.append(
                        Row(
                            "deploy",
                            f"{app}: container start asked -> seen healthy",
                            median(ours_up) * 1000,
                            "ms",
                            spread=spread(ours_up) * 1000,
                            baseline=median(theirs_up) * 1000,
                            baseline_name="podman run, then polling every 10 ms",
                            samples=len(ours_up),
                            note="dockyard: STAGING -> HEALTHY events; no target of its own",
                        )
                    )
                    rows.append(
                        Row(
                            "deploy",
                            f"{app}: cold deploy to promoted and answering",
                            median(ours),
                            "s",
                            spread=spread(ours),
                            baseline=median(theirs),
                            baseline_name="podman CLI",
                            target=TARGET_RATIO,
                            on_ratio=True,
                            samples=len(ours),
                            note=note,
                            raw={"dockyard_s": ours, "cli_s": theirs},
                        )
                    )
                rows.append(await fetch_row(services, apps, daemon, work, args.runs * 2))
        finally:
            await controller.stop()
            await services.close()
            for tag in made_images:
                podman("rmi", "-f", tag, check=False)
    return rows


async def fetch_row(
    services: Services, apps: Apps, daemon: GitDaemon, work: Path, runs: int
) -> Row:
    """``GitSource.fetch`` of a new commit against ``git clone --depth 1`` of another."""
    source = services.sources["git"]
    app = "busybox"
    url = f"{daemon.url}/{apps.repos[app].name}"
    ours, theirs = [], []
    for run in range(runs + 1):
        commit = apps.commit(app)
        await asyncio.sleep(0.3)  # the next warm fetch child is ready, as between deploys
        started = time.monotonic()
        got = await source.fetch(SourceRequest(repo=url, ref=commit))
        took = time.monotonic() - started
        assert got.commit == commit and not got.cached
        commit = apps.commit(app)
        target = work / f"clone-{run}"
        started = time.monotonic()
        await asyncio.to_thread(
            subprocess.run,
            ["git", "clone", "-q", "--depth", "1", "--no-tags", url, str(target)],
            env=GIT_ENV,
            check=True,
            capture_output=True,
        )
        clone = time.monotonic() - started
        if run:
            ours.append(took)
            theirs.append(clone)
    return Row(
        "deploy",
        "fetch of a new commit (git source)",
        median(ours) * 1000,
        "ms",
        spread=spread(ours) * 1000,
        baseline=median(theirs) * 1000,
        baseline_name="git clone --depth 1",
        samples=len(ours),
        note="the floor: a new commit's objects over git://; no target of its own",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="counted deploys per app and side")
    parser.add_argument("--apps", default="busybox,example")
    add_report_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    title = f"dockyard cold-deploy benchmark: {args.runs} deploys per app and side, rootful Podman"
    return run_benchmark(measure, args, title)


if __name__ == "__main__":
    sys.exit(main())
