"""Evaluation benchmark: a batch of image-mode miners against the same miners evaluated one
at a time, in the same run.

    python bench/evaluations.py [--miners 10] [--tasks 5] [--check] [--json]

Real rootful Podman (dockyard's own API service), the git source on a loopback ``git
daemon``, the ``none`` router and the evaluation service in process. Each miner is a
repository holding a shell agent (``nc -ll -e``) that answers ``/health``, and ``POST
/step`` (the validator's protocol, dockyard's default) after ``--task-s`` with no tool
call, which ends the task after one step; it runs in image mode on a busybox base image built
here once (the source mounted at ``/app``), as Autoppia's validator runs miners. The
baseline submits one miner, waits until it is final, then the next; the batch submits all
at once (``[plugins.evaluation] max_agents`` at a time). Target: batch ÷ one at a time
≤ 0.33. The host's floor is measured in the same run: the same containers started and
removed with the Podman CLI alone, all at once against one at a time; when that ratio is
above the target, the batch row says the target is below what this host's engine
parallelizes. Every container and image made here is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, add_report_options, podman_controller, run_benchmark

from dockyard.plugins.evaluation.models import EvaluateBatchRequest, EvaluateMinerRequest, Miner
from dockyard.plugins.evaluation.service import EvaluationService
from tests.gitserver import GitDaemon, RepoBuilder
from tests.nc_agent import handler

TARGET_RATIO = 0.33
BASE = "localhost/dockyard-bench/busybox-base:1"
BASE_DOCKERFILE = (
    'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
)
PORTS = (48700, 48760)
#: One HTTP exchange per connection: /health, and /step after SLEEP seconds, answered as the
#: validator's agents answer a step: no tool call (``actions`` empty) ends the task.
AGENT_SH = handler(r"""  /step) sleep __SLEEP__; reply "200 OK" '{"actions":[]}' ;;
""")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=300
    )


def _run_and_remove(name: str) -> None:
    podman("run", "-d", "--name", name, "-p", "127.0.0.1::8000",
           "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
           BASE, "nc", "-ll", "-p", "8000", "-e", "/bin/true")  # fmt: skip
    podman("rm", "-f", "-t", "0", name)


async def host_floor(n: int) -> tuple[float, float]:
    """Seconds for ``n`` containers started and removed with the Podman CLI one at a time,
    then all at once: how much parallelism the host's container engine has."""
    started = time.monotonic()
    for i in range(n):
        await asyncio.to_thread(_run_and_remove, f"bench-floor-seq-{i}")
    sequential = time.monotonic() - started
    started = time.monotonic()
    await asyncio.gather(
        *(asyncio.to_thread(_run_and_remove, f"bench-floor-par-{i}") for i in range(n))
    )
    return sequential, time.monotonic() - started


def tasks(n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"t{i}", "prompt": f"task {i}", "url": f"http://site.test/{i}"} for i in range(n)
    ]


async def until_final(service: EvaluationService, evaluation_id: str, batch: bool) -> Any:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if batch:
            found: Any = await service.batch(evaluation_id)
            if found.state == "finished":
                return found
        else:
            found = await service.get(evaluation_id)
            if found.final:
                return found
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{evaluation_id} did not finish")


async def measure(args: argparse.Namespace) -> list[Row]:
    if shutil.which("podman") is None:
        return [Row("evaluations", "skipped: podman is not installed", float("nan"), "")]
    with tempfile.TemporaryDirectory(prefix="dockyard-bench-eval-") as tmp:
        work = Path(tmp)
        context = work / "base"
        context.mkdir()
        shutil.copy2("/bin/busybox", context / "busybox")
        (context / "Dockerfile").write_text(BASE_DOCKERFILE)
        podman("build", "-q", "--network", "none", "--pull=never", "-t", BASE, str(context))
        builder = RepoBuilder(work / "served")
        names = []
        for i in range(args.miners):
            repo = builder.new(f"miner-{i}")
            repo.write("agent.sh", AGENT_SH.replace("__SLEEP__", f"{args.task_s:g}"), mode=0o755)
            repo.commit("agent")
            names.append(repo.name)
        services, controller = await podman_controller(
            work / "data", PORTS, plugins={"evaluation": {"max_agents": args.agents}}
        )
        service = EvaluationService(
            controller, store=services.store, pm=services.pm, settings=services.settings
        )
        await service.start()
        try:
            with GitDaemon(builder.root) as daemon:
                miners = [
                    Miner(
                        github_url=f"{daemon.url}/{name}",
                        ref="main",
                        build_mode="image",
                        image=BASE,
                        command=["nc", "-ll", "-p", "8000", "-e", "/app/agent.sh"],
                        uid=i,
                    )
                    for i, name in enumerate(names)
                ]
                options: dict[str, Any] = {
                    "tasks": tasks(args.tasks),
                    "timeouts": {"health_s": 60, "task_s": 60, "request_s": 30},
                }
                started = time.monotonic()
                for miner in miners:
                    request = {"miner": msgspec.to_builtins(miner), **options}
                    submitted = await service.submit(msgspec.convert(request, EvaluateMinerRequest))
                    result = await until_final(service, submitted.id, batch=False)
                    if not result.ok:
                        raise RuntimeError(f"{miner.github_url}: {result.reason} {result.message}")
                one_at_a_time = time.monotonic() - started
                started = time.monotonic()
                request = {"miners": msgspec.to_builtins(miners), **options}
                batch = await service.submit_batch(msgspec.convert(request, EvaluateBatchRequest))
                done = await until_final(service, batch.id, batch=True)
                in_batch = time.monotonic() - started
                if done.progress.ok != len(miners):
                    raise RuntimeError(f"batch: {done.progress}")
            floor = await host_floor(args.miners)
        finally:
            await service.stop()
            await controller.stop()
            await services.close()
            podman("rmi", "-f", BASE, check=False)
    return [
        Row(
            "evaluations",
            f"host floor: {args.miners} x (podman run, podman rm) in parallel",
            floor[1],
            "s",
            baseline=floor[0],
            baseline_name="one at a time",
            samples=1,
            note="no dockyard: what this host's Podman allows in parallel; no target",
        ),
        Row(
            "evaluations",
            f"{args.miners} miners x {args.tasks} tasks, image mode: batch",
            in_batch,
            "s",
            baseline=one_at_a_time,
            baseline_name="one at a time",
            target=TARGET_RATIO,
            on_ratio=True,
            samples=1,
            note=f"max_agents={args.agents}, each task answered after {args.task_s:g} s"
            + floor_note(floor),
        ),
    ]


def floor_note(floor: tuple[float, float]) -> str:
    """When this host's Podman alone (no dockyard) cannot start and remove the containers
    in parallel within the target, say so: the target is below the host's floor."""
    sequential, parallel = floor
    ratio = parallel / sequential if sequential else float("nan")
    if not ratio > TARGET_RATIO:
        return ""
    return (
        f"; the host's floor is {ratio:.2f} (the podman CLI alone, every run + rm in parallel"
        f" vs one at a time) > the target {TARGET_RATIO:g}: this host cannot reach it"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--miners", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--task-s", type=float, default=0.5, help="an agent's time per task")
    parser.add_argument(
        "--agents", type=int, default=10, help="max_agents (default: one per miner)"
    )
    add_report_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    title = "dockyard evaluation benchmark: rootful Podman, image mode, loopback git"
    return run_benchmark(measure, args, title)


if __name__ == "__main__":
    sys.exit(main())
