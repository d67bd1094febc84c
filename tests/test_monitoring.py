"""deploy/monitoring: the dashboards, alerts and scrape config, checked against the code and a real Prometheus.

* The committed dashboard JSON and scrape config are what their generators write.
* Every metric and label a dashboard panel or alert rule uses is one the services
  register (their metric classes, instantiated into fresh registries), PromQL parsed
  with ``promql-parser``; no metric has a high-cardinality label.
* Monitoring for real: Debian's Prometheus scrapes a running single-host stack
  (`silo up`) while a scripted session runs in a bwrap sandbox and goes through the
  egress (one allowed request, one blocked); then every panel's query returns data
  through Prometheus's HTTP API, every alert rule evaluates without error and none
  fires, and ``promtool check config|rules`` pass.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import promql_parser as pp
import pytest
import yaml
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.testing._internet import ZONE, TestInternet
from devsilo.testing._prometheus import Prometheus, queries_without_data
from prometheus_client import CollectorRegistry

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
ALERTS = MONITORING / "prometheus" / "alerts.yml"
TARGET_LABELS = {"job", "instance", "service", "role"}
"""Labels Prometheus attaches to every scraped series (the scrape config's relabelling)."""
SYNTHETIC = {"up": set[str]()}
"""Series Prometheus makes itself for every target."""
HIGH_CARDINALITY = {"session", "session_id", "sid", "host", "domain", "url", "request_path", "user", "client",
                    "client_name", "key_id", "mid", "message_id", "id", "workspace", "agent", "question_id", "file",
                    "tool_use_id", "pid", "address", "ip"}
"""Label names that would carry an unbounded set of values (``path`` is not one: the gateway's
delivery path is "live" or "stream")."""
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason="Debian's prometheus package is not installed (./setup.sh --dev)")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"silo_monitoring_{name}", MONITORING / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


dashboards = _load("dashboards")
promconf = _load("prometheus_config")


# --- what the services register ----------------------------------------------------------------

def service_registries() -> dict[str, CollectorRegistry]:
    """One fresh registry per role holding every metric that role's code registers."""
    from devsilo.egress._service import EgressMetrics
    from devsilo.executor._service import ExecutorMetrics
    from devsilo.gateway._server import GatewayMetrics
    from devsilo.harness._agents import LoopMetrics
    from devsilo.harness._gate import ModelMetrics
    from devsilo.harness._service import PoolMetrics
    from devsilo.runtime._metrics import ServiceMetrics

    out = {}
    for role in ("gateway", "harness", "executor", "egress"):
        base = ServiceMetrics(role, role)
        # the reconnect collector only reads these two attributes of the nats-py client
        base.watch_nats(SimpleNamespace(is_connected=True, stats={"reconnects": 0}))
        ctx = SimpleNamespace(metrics=base)
        if role == "gateway":
            GatewayMetrics(ctx)  # type: ignore[arg-type]
        elif role == "harness":
            PoolMetrics(ctx)  # type: ignore[arg-type]
            ModelMetrics(base.registry)
            LoopMetrics(base.registry)
        elif role == "executor":
            ExecutorMetrics(ctx)  # type: ignore[arg-type]
        else:
            EgressMetrics(base.registry)
        out[role] = base.registry
    return out


def declared_series() -> dict[str, set[str]]:
    """Every sample name the services can expose -> its label names (target labels not included)."""
    series: dict[str, set[str]] = {}
    for registry in service_registries().values():
        # prometheus_client has no public way to list a collector's label names; _labelnames is it
        for collector in list(registry._collector_to_names):
            labels = set(getattr(collector, "_labelnames", ()))
            describe = getattr(collector, "describe", None)
            for family in (describe() if describe else collector.collect()):
                name, kind = family.name, family.type
                if kind == "counter":
                    names = {f"{name}_total": labels, f"{name}_created": labels}
                elif kind == "histogram":
                    names = {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels,
                             f"{name}_count": labels, f"{name}_created": labels}
                elif kind == "summary":
                    names = {name: labels | {"quantile"}, f"{name}_sum": labels, f"{name}_count": labels}
                else:
                    names = {name: labels}
                for n, ls in names.items():
                    series.setdefault(n, set()).update(ls)
    return series


# --- PromQL: which metrics and labels an expression uses ----------------------------------------

def check_promql(text: str, declared: dict[str, set[str]]) -> list[str]:
    """Problems with ``text``: metrics the code does not register, labels those metrics lack."""
    problems: list[str] = []
    known = {**declared, **SYNTHETIC}

    def labels_of(expr: Any) -> set[str]:
        """The labels the result of ``expr`` can carry; records problems on the way."""
        if isinstance(expr, pp.VectorSelector):
            if expr.name is None:
                problems.append(f"selector without a metric name: {expr}")
                return set()
            if expr.name not in known:
                problems.append(f"metric {expr.name} is not registered by any service")
                return set()
            have = known[expr.name] | TARGET_LABELS
            for m in expr.matchers.matchers:
                if m.name != "__name__" and m.name not in have:
                    problems.append(f"{expr.name} has no label {m.name!r} (it has {sorted(have)})")
            return have
        if isinstance(expr, pp.MatrixSelector):
            return labels_of(expr.vector_selector)
        if isinstance(expr, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
            return labels_of(expr.expr)
        if isinstance(expr, pp.Call):
            have: set[str] = set()
            for arg in expr.args:
                if isinstance(arg, pp.Expr):
                    have |= labels_of(arg)
            if expr.func.name == "histogram_quantile":
                have.discard("le")
            return have
        if isinstance(expr, pp.AggregateExpr):
            inner = labels_of(expr.expr)
            if isinstance(expr.param, pp.Expr):
                labels_of(expr.param)
            if expr.modifier is None:
                return set()
            for label in expr.modifier.labels:
                if label not in inner:
                    problems.append(f"{expr.op} by/without {label!r}: no series inside has it ({sorted(inner)})")
            if expr.modifier.type == pp.AggModifierType.By:
                return set(expr.modifier.labels)
            return inner - set(expr.modifier.labels)
        if isinstance(expr, pp.BinaryExpr):
            both = labels_of(expr.lhs) | labels_of(expr.rhs)
            matching = expr.modifier.matching if expr.modifier is not None else None
            for label in (matching.labels if matching is not None else []):
                if label not in both:
                    problems.append(f"on/ignoring {label!r}: neither side has it")
            return both
        if isinstance(expr, (pp.NumberLiteral, pp.StringLiteral)):
            return set()
        problems.append(f"unhandled PromQL node {type(expr).__name__}: {expr}")
        return set()

    try:
        labels_of(pp.parse(text))
    except ValueError as exc:  # promql-parser raises ValueError on a syntax error
        problems.append(f"does not parse: {exc}")
    return problems


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def all_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard panel query and every alert expression."""
    out = [(f"dashboard {uid} / {title}", expr) for uid, title, expr in dashboards.prometheus_queries()]
    out += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    return out


# --- static checks ------------------------------------------------------------------------------

def test_committed_dashboards_are_what_the_generator_writes(tmp_path: Path) -> None:
    written = dashboards.write(tmp_path)
    committed = sorted(p.name for p in (MONITORING / "grafana" / "dashboards").glob("*.json"))
    assert sorted(p.name for p in written) == committed
    for path in written:
        assert path.read_text() == (MONITORING / "grafana" / "dashboards" / path.name).read_text(), (
            f"{path.name} is stale: run python deploy/monitoring/dashboards.py")
        model = json.loads(path.read_text())
        assert model["uid"].startswith("devsilo-") and model["panels"]
        for panel in model["panels"]:
            assert panel["datasource"]["uid"] in {"devsilo-prometheus", "devsilo-loki"}, panel["title"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    provisioned = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/devsilo.yml").read_text())
    assert {d["uid"] for d in provisioned["datasources"]} == {"devsilo-prometheus", "devsilo-loki"}


def sdk_round_trip(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` read into the SDK's typed Dashboard model (made from Grafana's schema) and written back."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    back: dict[str, Any] = json.loads(json.dumps(Dashboard.from_json(model), cls=JSONEncoder))
    return back


def test_dashboards_read_back_through_the_typed_grafana_models() -> None:
    """No Grafana dashboard JSON Schema is available offline: the SDK's typed models are the check.

    A dashboard that reads back unchanged has no field the models do not know.
    """
    for path in sorted((MONITORING / "grafana" / "dashboards").glob("*.json")):
        model = json.loads(path.read_text())
        assert sdk_round_trip(model) == model, path.name
    broken = json.loads((MONITORING / "grafana" / "dashboards" / "overview.json").read_text())
    broken["panels"][0]["tagets"] = broken["panels"][0].pop("targets")
    assert sdk_round_trip(broken) != broken


def test_shipped_scrape_config_is_what_the_generator_writes() -> None:
    text = promconf.render(promconf.scrape_config(promconf.stack_targets(promconf.default_services())))
    assert (MONITORING / "prometheus" / "prometheus.yml").read_text() == text
    config = yaml.safe_load(text)
    assert sorted(c["labels"]["__silo_service"] for c in config["scrape_configs"][0]["static_configs"]) == [
        "egress", "executor", "gateway", "harness"]


def test_every_metric_and_label_a_dashboard_or_alert_uses_is_registered_by_the_services() -> None:
    declared = declared_series()
    queries = all_queries()
    assert len(queries) > 60
    problems = [f"{where}: {p}" for where, expr in queries for p in check_promql(expr, declared)]
    assert problems == []
    used = {m for _, expr in queries for m in declared if m in expr}
    # every dashboard covers something: the overview uses the shared metrics, each role's are used too
    for metric in ("silo_messages_rejected_total", "silo_model_cost_usd_total", "silo_pool_capacity",
                   "silo_egress_requests_total", "silo_auth_total", "silo_nats_reconnects_total"):
        assert metric in used


def test_the_checker_catches_unknown_metrics_and_labels() -> None:
    declared = declared_series()
    assert check_promql('sum(rate(silo_auth_total{outcome="ok"}[5m]))', declared) == []
    assert "silo_nope_total is not registered" in " ".join(check_promql("rate(silo_nope_total[5m])", declared))
    assert "no label 'session'" in " ".join(check_promql('silo_auth_total{session="x"}', declared))
    assert "no series inside has it" in " ".join(
        check_promql("sum by (reason) (rate(silo_auth_total[5m]))", declared))
    assert "neither side" in " ".join(check_promql("silo_auth_total / on (path) silo_auth_total", declared))
    assert "does not parse" in " ".join(check_promql("sum(rate(silo_auth_total[5m]", declared))


def test_no_metric_has_a_high_cardinality_label() -> None:
    bad = {name: labels & HIGH_CARDINALITY for name, labels in declared_series().items()
           if labels & HIGH_CARDINALITY}
    assert bad == {}


async def test_nats_gauges_follow_a_real_connection_through_a_server_restart(
        state_dir: Any, nats_server: Any) -> None:
    """silo_nats_connected is read at scrape time; silo_nats_reconnects_total counts reconnections."""
    from devsilo.runtime._metrics import ServiceMetrics
    from devsilo.runtime._natsconn import connect_nats
    from prometheus_client import generate_latest

    def sample(metrics: ServiceMetrics, name: str) -> float:
        for line in generate_latest(metrics.registry).decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exposed")

    metrics = ServiceMetrics("harness", "harness")
    nc = await connect_nats(state_dir, "harness", nats_server.url, reconnect_base=0.05, reconnect_cap=0.2)
    try:
        metrics.watch_nats(nc)
        assert sample(metrics, "silo_nats_connected") == 1
        assert sample(metrics, "silo_nats_reconnects_total") == 0
        await nats_server.stop()
        await poll("disconnect seen", lambda: not nc.is_connected, seconds=10)
        assert sample(metrics, "silo_nats_connected") == 0
        await nats_server.start()
        await poll("reconnected", lambda: nc.is_connected, seconds=20)
        assert sample(metrics, "silo_nats_connected") == 1
        assert sample(metrics, "silo_nats_reconnects_total") == 1
    finally:
        await nc.close()


@needs_prometheus
def test_alert_rules_fire_when_they_should_and_stay_quiet_otherwise() -> None:
    """promtool's unit tests of the rules (alerts_test.yml): each alert fires on its case."""
    tests = MONITORING / "prometheus" / "alerts_test.yml"
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    cases = yaml.safe_load(tests.read_text())["tests"]
    fired = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alert_rules()}
    # the unit tests' input series are real metrics with real labels too
    declared = declared_series()
    for case in cases:
        for series in case["input_series"]:
            assert check_promql(series["series"], declared) == [], series["series"]


# --- monitoring for real ------------------------------------------------------------------------

WWW, OTHER = f"www.{ZONE}", f"other.{ZONE}"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], check=False, capture_output=True, text=True, timeout=60)


async def poll(what: str, check: Any, seconds: float = 60.0) -> Any:
    """Call ``check`` until it returns something truthy; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except OSError as exc:  # Prometheus not listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: still {last!r} after {seconds:.0f} s")


@needs_prometheus
async def test_prometheus_scrapes_a_running_stack_and_every_panel_and_alert_evaluates(tmp_path: Path) -> None:
    # the shipped files pass promtool
    shipped = promtool("check", "config", str(MONITORING / "prometheus" / "prometheus.yml"))
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr

    async with TestInternet() as internet:
        stack = Stack(tmp_path / "state", services={"egress": {"options": {
            "nameservers": [internet.dns_addr], "ca_bundles": [str(internet.ca_file)]}}})
        await asyncio.to_thread(stack.start)
        prom: Prometheus | None = None
        try:
            cfg = StateDir(stack.state_dir).config()
            targets = promconf.stack_targets(
                {sid: (cfg.role_of(sid).value, port) for sid, port in stack.metrics_ports.items()})
            text = promconf.render(promconf.scrape_config(targets, interval="1s", evaluation="1s",
                                                          rule_files=[str(ALERTS)]))
            (tmp_path / "prom").mkdir()
            prom = Prometheus(tmp_path / "prom", text)
            checked = promtool("check", "config", str(prom.config))
            assert checked.returncode == 0, checked.stdout + checked.stderr
            await poll("every service scraped",
                       lambda: len([s for s in prom.query('up{job="devsilo"} == 1')]) == len(targets))

            # a session: tools in a bwrap sandbox, one request the egress lets through, one it blocks
            script = {"responses": [
                {"text": "fetch", "tool_calls": [{"name": "Bash", "input": {
                    "command": f"curl -sS --max-time 30 https://{WWW}/hello; "
                               f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 30 https://{OTHER}/hello; "
                               "true"}}]},
                {"text": "read", "tool_calls": [{"name": "Read", "input": {"path": "missing.txt"}}]},
                {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]},
            ]}
            (tmp_path / "script.json").write_text(json.dumps(script))
            workspace = tmp_path / "ws"
            workspace.mkdir()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "run", "--headless",
                "--script", str(tmp_path / "script.json"), "--workspace", str(workspace), "--prompt", "go",
                "--json", "--allow-domain", WWW,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 300)
            assert proc.returncode == 0, err.decode() + out.decode()
            events = [json.loads(line) for line in out.decode().splitlines()]
            sid = events[0]["session_id"]
            bash = next(e["data"]["content"] for e in events
                        if e["kind"] == "tool_result" and e["data"]["name"] == "Bash")
            assert f"hello from {WWW}" in bash, bash
            # and a session refused: its workspace is on the risk list (a handler answers with an error)
            refused = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "run", "--headless",
                "--script", str(tmp_path / "script.json"), "--workspace", str(stack.state_dir), "--prompt", "go",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, refused_err = await asyncio.wait_for(refused.communicate(), 120)
            assert refused.returncode == 1 and b"risk list" in refused_err, refused_err

            # every dashboard query returns data (Prometheus scrapes every second; wait for the
            # session's series to have two samples so that rate() has something to work on)
            queries = dashboards.prometheus_queries()

            def empty() -> list[str]:
                return queries_without_data(prom, queries)

            missing: list[str] = []

            def all_have_data() -> bool:
                missing[:] = empty()
                return not missing

            try:
                await poll("every panel query returns data", all_have_data, seconds=45)
            except AssertionError:
                pytest.fail("panels without data:\n" + "\n".join(missing))

            # the session's own numbers made it through
            blocked = prom.query('sum(silo_egress_requests_total{decision="blocked",reason="domain_not_allowed"})')
            assert float(blocked[0]["value"][1]) >= 1
            allowed = prom.query('sum(silo_egress_requests_total{decision="allowed"})')
            assert float(allowed[0]["value"][1]) >= 1
            assert float(prom.query("sum(silo_tool_calls_total)")[0]["value"][1]) >= 2
            assert float(prom.query("sum(silo_sessions_created_total)")[0]["value"][1]) >= 1

            # every alert expression is valid PromQL to this Prometheus; every rule evaluated, none fires
            for rule in alert_rules():
                prom.query(rule["expr"])  # raises on an error answer

            def evaluated() -> list[dict[str, Any]] | None:
                groups = prom.api("rules")["groups"]
                got = [r for g in groups for r in g["rules"]]
                done = got and all(r["lastEvaluation"] > "2000" for r in got)
                return got if done else None

            evaluated_rules = await poll("every rule evaluated", evaluated)
            assert {r["name"] for r in evaluated_rules} == {r["alert"] for r in alert_rules()}
            for r in evaluated_rules:
                assert r["health"] == "ok", r
                assert r["state"] != "firing", r
            assert prom.query('ALERTS{alertstate="firing"}') == []

            # labels stay low-cardinality on the wire too: no series carries the session id
            series = prom.api("series", **{"match[]": '{job="devsilo"}'})
            assert series and not [s for s in series if any(sid in v for v in s.values())]
            per_metric: dict[str, int] = {}
            for s in series:
                if "le" not in s:  # a histogram counts once per label set, not once per bucket
                    per_metric[s["__name__"]] = per_metric.get(s["__name__"], 0) + 1
            assert {n: c for n, c in per_metric.items() if c > 60} == {}
            # the relabelling gave every series its service and role, and nothing else of the target's
            assert {s["service"] for s in series} == set(stack.metrics_ports)
            assert all(s["role"] == cfg.role_of(s["service"]).value for s in series)
            assert not [s for s in series if any(k.startswith(("__silo", "exported_")) for k in s)]

            # the Loki panel's LogQL reads these fields of the egress's JSON log lines
            lines = [json.loads(x) for x in (stack.state_dir / "logs" / "egress.log").read_text().splitlines()
                     if x.startswith("{")]
            blocked_lines = [x for x in lines if x.get("event") == "egress_blocked"]
            assert [x["host"] for x in blocked_lines] == [OTHER]
            assert blocked_lines[0]["reason"] == "domain_not_allowed" and blocked_lines[0]["service"] == "egress"
        finally:
            if prom is not None:
                prom.stop()
            await asyncio.to_thread(stack.stop)
