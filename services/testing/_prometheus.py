"""A real Prometheus for tests, and the check that the shipped dashboards' queries return data.

Used by ``tests/test_monitoring.py`` (a single-host stack) and
``tests/test_three_hosts.py`` (three namespaced hosts). The dashboards and
the scrape-config generator live in ``deploy/monitoring/`` (scripts, not a
package): :func:`load_monitoring` imports one of them by path.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ._stack import free_ports

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def load_monitoring(name: str) -> ModuleType:
    """``deploy/monitoring/<name>.py`` as a module (``dashboards``, ``prometheus_config``)."""
    module_name = f"silo_monitoring_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, MONITORING / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Prometheus:
    """Debian's prometheus, started by hand on a free loopback port with its own storage."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        self.dir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(config_text)
        self.port = free_ports(1)[0]
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 — closed in stop()
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={workdir / 'data'}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        """``/api/v1/<path>``'s data; fails unless Prometheus says success."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's samples (a scalar comes back as one)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data["result"]]
        return result

    def stop(self) -> None:
        """Stop Prometheus (safe to call twice)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def queries_without_data(prom: Prometheus, queries: Iterable[tuple[str, str, str]]) -> list[str]:
    """``"uid / title: expr"`` of each (dashboard uid, panel title, PromQL) that returns nothing."""
    return [f"{uid} / {title}: {expr}" for uid, title, expr in queries if not prom.query(expr)]
