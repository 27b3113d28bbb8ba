"""What every benchmark shares: percentiles, one row per figure (dockyard, its baseline in
the same run, the ratio, the target), the table they print and the ``--check`` verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dockyard.core.controller import Controller
    from dockyard.core.services import Services

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.fakes, tests.gitserver, ... from this checkout


async def podman_controller(
    data_dir: Path, ports: tuple[int, int], **settings: Any
) -> tuple[Services, Controller]:
    """A started dockyard controller on rootful Podman, no router, with its services, for
    the benchmarks that deploy from a loopback git daemon; ``settings`` on top. The caller
    stops the controller and closes the services."""
    from dockyard.core.config import Settings
    from dockyard.core.controller import Controller
    from dockyard.core.plugins import build_plugin_manager
    from dockyard.core.services import Services

    config = Settings(
        data_dir=str(data_dir),
        runtime="podman",
        router="none",
        insecure_sources=True,
        monitor_interval_s=0,
        port_range_start=ports[0],
        port_range_end=ports[1],
        **settings,
    )
    services = Services.build(config, build_plugin_manager(load_entry_points=False))
    await services.start()
    controller = Controller.from_services(services)
    await controller.start()
    return services, controller


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """Half the distance between the 25th and 75th percentile: the noise of a median."""
    if len(values) < 2:
        return 0.0
    return (pct(values, 0.75) - pct(values, 0.25)) / 2


def rss_mib(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default), in MiB."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


@dataclass
class Row:
    """One figure: ``value`` (dockyard) against ``baseline`` (same run), and the target.

    ``target`` is checked against ``value`` (``unit`` "ms", "MiB", ...) or, when
    ``on_ratio``, against ``value / baseline``; lower is better.
    """

    bench: str
    figure: str
    value: float
    unit: str
    spread: float = 0.0
    baseline: float | None = None
    baseline_name: str = ""
    target: float | None = None
    on_ratio: bool = False
    samples: int = 0
    note: str = ""
    raw: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline or math.isnan(self.baseline):
            return None
        return self.value / self.baseline

    @property
    def checked(self) -> float | None:
        return self.ratio if self.on_ratio else self.value

    @property
    def ok(self) -> bool | None:
        if self.target is None:
            return None
        checked = self.checked
        return checked is not None and not math.isnan(checked) and checked <= self.target


def _num(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    text = (
        f"{value:.3g}"
        if abs(value) < 10
        else f"{value:.0f}"
        if abs(value) >= 100
        else f"{value:.1f}"
    )
    return f"{text} {unit}".strip()


def table(rows: Sequence[Row]) -> str:
    """A Markdown table: figure, dockyard (median ± spread), baseline, ratio, target."""
    lines = [
        "| bench | figure | dockyard | baseline | ratio | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = _num(r.value, r.unit) + (f" ± {_num(r.spread)}" if r.spread else "")
        base = f"{_num(r.baseline, r.unit)} ({r.baseline_name})" if r.baseline is not None else "-"
        ratio = _num(r.ratio) if r.ratio is not None else "-"
        if r.target is None:
            target, verdict = "-", ""
        else:
            target = f"≤ {_num(r.target)}" + ("" if r.on_ratio else f" {r.unit}")
            verdict = "PASS" if r.ok else "MISS"
        lines.append(
            f"| {r.bench} | {r.figure} | {value} | {base} | {ratio} | {target} | {verdict} |"
        )
    return "\n".join(lines)


def report(rows: Sequence[Row], *, as_json: bool, check: bool, title: str = "") -> int:
    """Print the rows (a table or JSON); 1 when ``check`` and a target is missed."""
    if as_json:
        print(json.dumps([{**asdict(r), "ratio": r.ratio, "ok": r.ok} for r in rows], indent=1))
    else:
        if title:
            print(title)
        print(table(rows))
        notes = [f"- {r.figure}: {r.note}" for r in rows if r.note]
        if notes:
            print("\n".join(notes))
    missed = [r for r in rows if r.ok is False]
    for r in missed:
        print(f"MISS: {r.bench}: {r.figure}", file=sys.stderr)
    return 1 if check and missed else 0


Main = Callable[[list[str] | None], int]


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--check``: how :func:`report` prints and whether it judges."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")


def run_benchmark(
    measure: Callable[[argparse.Namespace], Awaitable[list[Row]]],
    args: argparse.Namespace,
    title: str,
) -> int:
    """A benchmark's ``main``: ``measure(args)`` with only errors logged, then
    :func:`report` (its exit code)."""
    logging.basicConfig(level=logging.ERROR)
    return report(asyncio.run(measure(args)), as_json=args.json, check=args.check, title=title)
