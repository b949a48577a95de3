"""A real Prometheus server on loopback, scraping one target every second.

    with PrometheusServer(target="127.0.0.1:9187") as prom:
        prom.wait_for_scrape()
        value = prom.query('sum(picopool_statements_total)')

The server is Debian's ``prometheus`` package (``/usr/bin/prometheus``); its data
lives in a temporary directory removed on exit. Queries go to the HTTP API
(``/api/v1/query``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"
BINARY = "/usr/bin/prometheus"


class PrometheusUnavailable(RuntimeError):
    """/usr/bin/prometheus is missing (run .ci/install-servers.sh)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class PrometheusServer:
    def __init__(self, target: str, *, scrape_interval: str = "1s") -> None:
        if not Path(BINARY).exists():
            raise PrometheusUnavailable(f"{BINARY} not found: install the prometheus package")
        self.target = target
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="picopool-prometheus-"))
        (self._dir / "prometheus.yml").write_text(
            "global:\n"
            f"  scrape_interval: {scrape_interval}\n"
            f"  evaluation_interval: {scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: picopool\n"
            f"    scrape_interval: {scrape_interval}\n"
            f"    scrape_timeout: {scrape_interval}\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self._process: subprocess.Popen[bytes] | None = None
        self._log = open(self._dir / "prometheus.log", "wb")  # noqa: SIM115

    def start(self) -> Self:
        self._process = subprocess.Popen(
            [BINARY, f"--config.file={self._dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self._dir / 'data'}",
             f"--web.listen-address={HOST}:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in 30 s: {self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return (self._dir / "prometheus.log").read_text(errors="replace")[-2000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.loads(reply.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query failed: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector: ``[{"metric": {...labels}, "value": [t, "v"]}]``."""
        data = self.api("query", query=promql)
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, promql: str, *by: str) -> dict[tuple[str, ...], float]:
        """An instant query's samples keyed by the values of the labels *by*."""
        return {tuple(s["metric"].get(label, "") for label in by): float(s["value"][1])
                for s in self.query(promql)}

    def target_health(self) -> str:
        targets = self.api("targets")["activeTargets"]
        return str(targets[0]["health"]) if targets else "none"

    def wait_for(self, check: Any, timeout: float = 20.0, what: str = "") -> Any:
        """Poll ``check()`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.25)
        raise AssertionError(f"prometheus: {what or check} not true in {timeout} s "
                             f"(last: {last!r}); log: {self.log()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
