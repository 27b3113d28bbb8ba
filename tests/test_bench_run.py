"""``bench/run.py``: a benchmark that crashes does not lose the rows the others measured;
the table shows a CRASHED row naming the error, and ``--check`` fails."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench(name: str, measure: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.parse_args = lambda argv: argparse.Namespace()  # type: ignore[attr-defined]
    module.measure = measure  # type: ignore[attr-defined]
    return module


def test_a_crashing_bench_keeps_the_other_rows_and_fails_the_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("run", "common"):  # bench/'s own modules: gone again after the test
        monkeypatch.delitem(sys.modules, name, raising=False)
    import common
    import run

    monkeypatch.setitem(sys.modules, "run", run)
    monkeypatch.setitem(sys.modules, "common", common)

    async def fine(args: argparse.Namespace) -> list[Any]:
        return [common.Row("status", "a figure", 1.0, "ms", target=10.0)]

    async def crash(args: argparse.Namespace) -> list[Any]:
        raise RuntimeError("miner-0: all_tasks_failed | every task failed")

    monkeypatch.setitem(sys.modules, "status", _bench("status", fine))
    monkeypatch.setitem(sys.modules, "evaluations", _bench("evaluations", crash))
    monkeypatch.setitem(sys.modules, "switch", _bench("switch", fine))

    assert run.main(["--only", "status,evaluations,switch", "--check"]) == 1
    out = capsys.readouterr().out
    assert out.count("| a figure | 1 ms |") == 2  # the benches before and after the crash
    assert "| evaluations | CRASHED (see the note) |" in out
    assert "RuntimeError: miner-0: all_tasks_failed / every task failed" in out

    assert run.main(["--only", "status", "--check"]) == 0
