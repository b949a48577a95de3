"""The README's main job: the CRUD example, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness.picodata import EmulatedPicodata

from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "crud"


def run_example(*args: str, env: dict[str, str] | None = None) -> str:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("PICOPOOL_DSN", "PICODATA_CONNECTION_URL")}
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True,
        timeout=180, env=environment, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_demo_on_the_embedded_cluster() -> None:
    out = run_example()
    assert "starting an embedded cluster" in out
    assert "[primary" in out and "INSERT" in out
    assert "[replica" in out and "SELECT" in out
    assert "1 [x] write docs" in out and "2 [x] ship 0.1.0" in out
    assert "celebrate" not in out.split("finish one")[1]
    assert out.rstrip().endswith("embedded cluster stopped")


def test_commands_against_a_given_dsn(cluster_dsn: str) -> None:
    env = {"PICOPOOL_DSN": cluster_dsn}
    assert "added task" in run_example("add", "buy milk", env=env)
    listed = run_example("list", env=env)
    assert "buy milk" in listed
    task_id = next(line.split()[0] for line in listed.splitlines() if "buy milk" in line)
    assert f"updated task {task_id}" in run_example("update", task_id, "--done", env=env)
    assert f"removed task {task_id}" in run_example("remove", task_id, env=env)
    assert "embedded" not in run_example("list", env=env)


def test_picodata_flow() -> None:
    with EmulatedPicodata(2) as picodata:
        picodata.create_items_table()
        out = run_example("picodata", env={"PICODATA_CONNECTION_URL": picodata.dsn()})
    assert "provider=picodata" in out


@pytest.fixture
def cluster_dsn(cluster: LocalCluster) -> str:
    return cluster.dsn
