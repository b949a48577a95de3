"""The published comparison must keep running: a smoke run of bench/compare.py.

No figure is checked (benchmarks live in bench/, never as timed assertions):
only that every contender still starts, runs and lands in the report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_compare_smoke_run_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--smoke", "--output", str(report)],
        capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    for contender in ("asyncpg via pgbouncer", "asyncpg via pgpool-II", "hasql, 3 instances",
                      "prefer_replicas", "LeastLatency", "oracle"):
        assert contender in text, contender
    charts = sorted(p.name for p in (tmp_path / "charts").iterdir())
    assert charts == ["latency-equal.png", "latency-skewed.png", "point-8.png",
                      "read-capacity.png"]
