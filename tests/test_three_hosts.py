"""Three hosts on one machine: a NATS cluster and the services spread over network namespaces.

Hosts A, B and C are network namespaces on one bridge, each with its own
address and its own nats-server node of one three-node cluster (configs from
``silo init --export``, streams and buckets R3). Each runs its services from
its own bundle: A the gateway and executor ``executor-a``, B the harness,
C executor ``executor`` and the egress. A client on A (``silo run
--headless`` against A's gateway, bwrap sandboxes, the mock model) runs
sessions across them while, in order, B's NATS node stops, executor C stops
and executor C starts again. Prometheus, in the root namespace, scrapes all
five services over the bridge, and every dashboard query returns data.

Every service is given all three nodes, its own machine's first (tried in
order). Not covered, because it does not work yet: a tool call whose result
the executor sends while the harness has no NATS connection at all (the
instant between its node going and the reconnect) is lost, since a core NATS
reply is not stored, and the harness waits out the call's timeout (660 s).
The test lets the tool finish only once the harness has reconnected.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from devsilo.cli.main import main as silo_main
from devsilo.runtime._natsserver import find_nats_server
from devsilo.testing._hosts import HostNetwork
from devsilo.testing._nats import init_state
from devsilo.testing._netns import netns_available
from devsilo.testing._prometheus import (
    PROMETHEUS,
    Prometheus,
    load_monitoring,
    queries_without_data,
)

pytestmark = pytest.mark.skipif(netns_available() is not None or os.geteuid() != 0,
                                reason=f"three hosts need root and network namespaces ({netns_available()})")

NATS_PORT, CLUSTER_PORT, GATEWAY_PORT, EGRESS_PORT = 4222, 6222, 7443, 3128
METRICS = {"gateway": 9301, "harness": 9302, "executor": 9303, "egress": 9304, "executor-a": 9305}
PLACES = {"gateway": "a", "executor-a": "a", "harness": "b", "executor": "c", "egress": "c"}
ROLE_OF = {"executor-a": "executor"}
EVENT_WAIT_S = 60.0


@dataclass
class Cluster:
    """The three hosts and what runs on them; services and nodes are restartable by name."""

    net: HostNetwork
    root: Path
    bundles: dict[str, Path]
    node_confs: dict[str, Path]
    nats_urls: dict[str, str]
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    prometheus: Prometheus | None = None

    def addr(self, service: str) -> str:
        return self.net.address(PLACES[service])

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start_node(self, host: str) -> None:
        self.procs[f"nats-{host}"] = self.net.popen(
            host, [find_nats_server(), "-c", str(self.node_confs[host])], log=self.log(f"nats-{host}"))

    def start_service(self, sid: str) -> None:
        role = ROLE_OF.get(sid, sid)
        extra = {"gateway": ["--listen", f"{self.addr(sid)}:{GATEWAY_PORT}"],
                 "executor": ["--id", sid, "--backends", "bwrap"]}.get(role, [])
        self.procs[sid] = self.net.popen(
            PLACES[sid], [sys.executable, "-m", "devsilo.cli.main", "service", role, "--state-dir",
                          str(self.bundles[sid]), "--nats", self.nats_urls[PLACES[sid]], "--metrics-port", str(METRICS[sid]),
                          "--log-level", "info", *extra],
            log=self.log(sid), env={**os.environ, "DEVSILO_STATE_DIR": "/nonexistent"})

    def stop(self, name: str) -> int:
        return HostNetwork.terminate(self.procs[name])

    def metrics(self, sid: str) -> str:
        url = f"http://{self.addr(sid)}:{METRICS[sid]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def wait_healthy(self, sid: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[sid].poll() is not None:
                raise AssertionError(f"{sid} exited with {self.procs[sid].returncode}: "
                                     f"{self.log(sid).read_text()[-3000:]}")
            try:
                url = f"http://{self.addr(sid)}:{METRICS[sid]}/healthz"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    status: dict[str, Any] = json.loads(resp.read())
                    if status.get("nats_connected"):
                        return status
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or not healthy yet (503)
            time.sleep(0.1)
        raise AssertionError(f"{sid} not healthy in {timeout}s: {self.log(sid).read_text()[-3000:]}")

    def gauge(self, sid: str, name: str) -> float:
        return next(float(line.split()[1]) for line in self.metrics(sid).splitlines()
                    if line.startswith(name + " "))

    def pool_size(self) -> float:
        return self.gauge("harness", "silo_pool_executors")

    def wait_reconnected(self, sid: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.gauge(sid, "silo_nats_reconnects_total") >= 1
                    and self.gauge(sid, "silo_nats_connected") == 1):
                return
            time.sleep(0.05)
        raise AssertionError(f"{sid} did not reconnect to another NATS node: {self.log(sid).read_text()[-3000:]}")

    def wait_pool(self, size: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pool_size() == size:
                return
            time.sleep(0.1)
        raise AssertionError(f"the harness never counted {size} executors (has {self.pool_size()})")


def export(master: Path, out: Path, host: str, roles: str, *extra: str) -> Path:
    assert silo_main(["--state-dir", str(master), "init", "--export", host, "--roles", roles,
                      "-o", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("three-hosts")
    (root / "logs").mkdir()
    net = HostNetwork(("a", "b", "c"))
    master = init_state(root / "master")
    cfg = master.config().model_dump(mode="json")
    cfg["nats"]["replicas"] = 3
    cfg["services"]["executor-a"] = {"role": "executor", "metrics_port": METRICS["executor-a"]}
    for sid, svc in cfg["services"].items():
        svc["metrics_host"] = net.address(PLACES[sid])
        if svc["role"] == "executor":  # one sandbox each: a second session must go elsewhere
            svc["options"] = {"capacity": 1, "workspace_store": str(root / f"workspaces-{sid}")}
    egress = f"{net.address('c')}:{EGRESS_PORT}"  # both executors relay here, A's across the bridge
    cfg["services"]["egress"]["options"] = {"listen": egress, "advertise": egress}
    cfg["services"]["harness"]["options"] = {"lease_wait_s": 3}
    master.config_path.write_text(json.dumps(cfg))
    master.initialize()  # keys and roster entries for executor-a
    out = root / "bundles"
    confs = {}
    for host in ("a", "b", "c"):
        routes = ",".join(f"{net.address(h)}:{CLUSTER_PORT}" for h in ("a", "b", "c") if h != host)
        node = export(master.root, out / f"nats-{host}", net.address(host), "nats",
                      "--install-dir", str(out / f"nats-{host}"), "--nats-store", str(root / f"js-{host}"),
                      "--nats-listen", net.address(host), "--nats-port", str(NATS_PORT),
                      "--cluster-port", str(CLUSTER_PORT), "--cluster-routes", routes)
        confs[host] = node / "nats" / "server.conf"
    bundles = {sid: export(master.root, out / sid, f"host-{PLACES[sid]}", ROLE_OF.get(sid, sid), "--ids", sid)
               for sid in PLACES}
    # every service knows all three nodes, its own machine's first (tried in order)
    urls = {h: ",".join(f"tls://{net.address(o)}:{NATS_PORT}" for o in sorted("abc", key=lambda o: o != h))
            for h in "abc"}
    c = Cluster(net, root, bundles, confs, urls)
    net.start()
    try:
        if PROMETHEUS is not None:  # in the root namespace, scraping the three hosts over the bridge
            promconf = load_monitoring("prometheus_config")
            targets = [promconf.Target(sid, ROLE_OF.get(sid, sid), f"{c.addr(sid)}:{METRICS[sid]}")
                       for sid in PLACES]
            (root / "prom").mkdir()
            c.prometheus = Prometheus(root / "prom", promconf.render(promconf.scrape_config(
                targets, interval="1s", evaluation="1s", rule_files=[])))
        for host in ("a", "b", "c"):
            c.start_node(host)
        for sid in ("egress", "executor", "executor-a", "harness", "gateway"):
            c.start_service(sid)
        for sid in PLACES:
            assert c.wait_healthy(sid)["nats_connected"]
        c.wait_pool(2)
        yield c
    finally:
        if c.prometheus is not None:
            c.prometheus.stop()
        net.stop()


class Run:
    """``silo run --headless --json`` on host A against A's gateway; its events as they come."""

    def __init__(self, c: Cluster, name: str, responses: list[dict[str, Any]], sandbox: str = "bwrap") -> None:
        self.workspace = c.root / name
        self.workspace.mkdir()
        script = c.root / f"{name}.json"
        script.write_text(json.dumps({"responses": responses}))
        self.proc = c.net.popen("a", [
            sys.executable, "-m", "devsilo.cli", "--state-dir", str(c.bundles["gateway"]), "run", "--headless",
            "--json", "--script", str(script), "--workspace", str(self.workspace), "--prompt", "go",
            "--sandbox", sandbox, "--gateway", f"wss://{c.addr('gateway')}:{GATEWAY_PORT}/ws"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        if sandbox != "microvm":
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def until(self, kind: str, text: str = "") -> dict[str, Any]:
        """The next event of ``kind`` whose data mentions ``text``; fails if the run ends first."""
        while True:
            try:
                ev = self._lines.get(timeout=EVENT_WAIT_S)
            except queue.Empty:
                raise AssertionError(f"no {kind} event in {EVENT_WAIT_S}s; so far {self.kinds()}") from None
            if ev is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"the run ended before a {kind} event: {self.kinds()} {err}")
            self.events.append(ev)
            if ev["kind"] == kind and text in json.dumps(ev["data"]):
                return ev

    def finish(self) -> int:
        """Read to the end; the run's exit code."""
        self.until("shutdown")
        code = self.proc.wait(30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.events]

    @property
    def executor(self) -> str:
        return str(next(e for e in self.events if e["kind"] == "session_started")["data"]["executor"])


def bash(command: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "Bash", "input": {"command": command}}]}


def wait_file(name: str) -> str:
    return f"echo waiting-{name}; while [ ! -e /workspace/{name} ]; do sleep 0.1; done; echo {name}-seen"


EXIT = {"tool_calls": [{"name": "Exit", "input": {"message": "done"}}]}
CURL_REFUSED = "curl -sS -o /dev/null --max-time 20 https://not-allowed.example/; true"
"""A request the session's egress policy does not allow (no allowed domains): the egress refuses it."""
REFUSED = "CONNECT tunnel failed, response 403"


def test_a_session_survives_a_nats_node_and_the_pool_survives_an_executor(cluster: Cluster) -> None:
    c = cluster
    # one session, client on A, harness on B, sandbox on C (both idle: the pool picks by id)
    first = Run(c, "first", [bash("echo one"), bash(wait_file("go1")), bash("echo two"), bash(wait_file("never")),
                             EXIT])
    first.until("tool_result", "one")
    assert first.executor == "executor"
    first.until("tool_output", "waiting-go1")  # the call runs in the sandbox on C

    # B's NATS node goes: the harness on B (connected to it) moves to A's or C's node and the
    # session goes on. The tool is let finish once the harness is back: a reply published while
    # the harness has no connection at all is lost (core NATS request/reply; see the module doc).
    assert c.gauge("harness", "silo_nats_reconnects_total") == 0
    assert c.stop("nats-b") == 0
    c.wait_reconnected("harness")
    assert c.gauge("gateway", "silo_nats_reconnects_total") == 0  # A's services stayed on A's node
    (first.workspace / "go1").touch()
    first.until("tool_result", "go1-seen")
    first.until("tool_result", "two")
    first.until("tool_output", "waiting-never")
    assert c.procs["harness"].poll() is None

    # executor C stops: its session ends with an error naming it, the next session runs on A
    assert c.stop("executor") == 0
    # whichever the harness hears first: the executor's answer to the running call, or its
    # last announcement (stopping)
    err = first.until("error", "executor executor")
    assert any(why in err["data"]["message"] for why in (
        "closed on executor executor while Bash ran (the executor is stopping)",
        "executor executor stopped; the session cannot continue")), err["data"]["message"]
    assert first.finish() == 1, err
    assert first.events[-1]["data"]["exit_code"] == 1
    seqs = [e["seq"] for e in first.events]
    assert seqs == list(range(len(seqs))), seqs  # nothing lost or repeated across the node loss
    second = Run(c, "second", [bash(f"echo on-a; {CURL_REFUSED}"), bash(wait_file("go2")), EXIT])
    out = second.until("tool_result", "on-a")["data"]["content"]
    assert second.executor == "executor-a"
    assert REFUSED in out, out  # A's sandbox reached the egress on C, across the bridge

    # executor C starts again and rejoins: with A full, a new session can only lease there
    c.start_service("executor")
    c.wait_healthy("executor")
    c.wait_pool(2)
    third = Run(c, "third", [bash("echo on-c"), EXIT])
    third.until("tool_result", "on-c")
    assert third.executor == "executor"
    assert third.finish() == 0
    (second.workspace / "go2").touch()
    assert second.finish() == 0


def poll(what: str, check: Any, seconds: float = 60.0) -> Any:
    """``check()`` until it returns something truthy; fails naming ``what`` and the last answer."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # Prometheus not listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: still {last!r} after {seconds:.0f} s")


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed (./setup.sh --dev)")
def test_prometheus_scrapes_the_three_hosts_and_every_dashboard_query_returns_data(cluster: Cluster) -> None:
    prom = cluster.prometheus
    assert prom is not None
    # a session whose sandbox on C asks the egress on C for a domain it does not allow
    run = Run(cluster, "scraped", [bash(CURL_REFUSED), EXIT])
    assert REFUSED in run.until("tool_result")["data"]["content"]
    assert run.finish() == 0
    # and one no executor can serve: the harness's start handler answers with an error
    refused = Run(cluster, "refused", [EXIT], sandbox="microvm")
    _, err = refused.proc.communicate(timeout=60)
    assert refused.proc.returncode == 1 and "no executor could run a microvm sandbox" in err, err
    up = poll("every service on every host scraped", lambda: {
        s["metric"]["service"]: s["metric"]["instance"] for s in prom.query('up{job="devsilo"} == 1')}
        if len(prom.query('up{job="devsilo"} == 1')) == len(PLACES) else None)
    assert up == {sid: f"{cluster.addr(sid)}:{METRICS[sid]}" for sid in PLACES}
    queries = load_monitoring("dashboards").prometheus_queries()
    missing: list[str] = []

    def all_have_data() -> bool:
        missing[:] = queries_without_data(prom, queries)
        return not missing

    try:
        poll("every panel query returns data", all_have_data, seconds=45)
    except AssertionError:
        pytest.fail("panels without data:\n" + "\n".join(missing))
    # the sessions on both executors, seen by the harness on B
    assert float(prom.query("sum(silo_sessions_created_total)")[0]["value"][1]) >= 1
    leases = prom.query("sum by (service) (silo_sandbox_leases_total)")
    assert {s["metric"]["service"] for s in leases if float(s["value"][1]) > 0} >= {"executor"}
