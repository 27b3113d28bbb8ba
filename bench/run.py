"""Every benchmark in one run and one table: status, switch, deploy, evaluations.

    python bench/run.py [--only status,switch,deploy,evaluations] [--quick] [--check] [--json]

Each benchmark measures dockyard and its baseline in the same run (``bench/<name>.py``
says how); this prints one Markdown table of medians, spreads, ratios and targets, and with
``--check`` exits 1 when any target is missed. A bench that crashes does not lose the
table: the rows measured so far are printed, then the crash (a row of its own, a MISS), and
the other benches still run. ``--quick`` runs fewer samples (for a smoke
run; the README's table comes from a full run). ``deploy`` and ``evaluations`` need rootful
Podman and say so when it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, add_report_options, report

BENCHES = ["status", "switch", "deploy", "evaluations"]
QUICK = {
    "status": ["--requests", "100"],
    "switch": ["--switches", "8", "--clients", "10", "--routers", "none,caddy,traefik"],
    "deploy": ["--runs", "2"],
    "evaluations": ["--miners", "6", "--tasks", "3"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated benches")
    parser.add_argument("--quick", action="store_true", help="fewer samples: a smoke run")
    add_report_options(parser)
    return parser.parse_args(argv)


def crashed(name: str, exc: BaseException) -> Row:
    """A row saying ``name`` crashed and why; it counts as a missed target."""
    reason = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
    return Row(name, "CRASHED (see the note)", float("nan"), "", target=0, note=reason[:300])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows: list[Row] = []
    started = time.monotonic()
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in BENCHES:
            print(f"bench/run.py: unknown benchmark {name!r} (known: {', '.join(BENCHES)})")
            return 2
        module = importlib.import_module(name)
        bench_args = module.parse_args(QUICK[name] if args.quick else [])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            rows += asyncio.run(module.measure(bench_args))
        except Exception as exc:  # one bench's crash must not lose the others' rows
            traceback.print_exc(file=sys.stderr)
            rows.append(crashed(name, exc))
    title = f"dockyard benchmarks ({time.monotonic() - started:.0f} s)"
    return report(rows, as_json=args.json, check=args.check, title=title)


if __name__ == "__main__":
    sys.exit(main())
