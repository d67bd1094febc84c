"""Generates devsilo's Grafana dashboards (JSON) with the grafana-foundation-sdk typed builders.

Run ``python deploy/monitoring/dashboards.py`` after changing a panel; it rewrites
``grafana/dashboards/*.json`` next to this file (the JSON is committed, and a test
regenerates it and compares). Every PromQL query here is also evaluated against a
real Prometheus scraping a running stack in ``tests/test_monitoring.py``.

Panels are declared as data (``DASHBOARDS``) so the test can read every query
without parsing the JSON back.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as gcommon
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import logs as glogs
from grafana_foundation_sdk.builders import loki as gloki
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import table as gtable
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Panel

HERE = Path(__file__).resolve().parent
OUT = HERE / "grafana" / "dashboards"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="devsilo-prometheus")
LOKI = DataSourceRef(type_val="loki", uid="devsilo-loki")
"""The datasource uids that ``grafana/provisioning/datasources/devsilo.yml`` provisions."""


@dataclass(frozen=True)
class Query:
    """One PromQL (or, with ``loki``, LogQL) query of a panel and its legend."""

    expr: str
    legend: str = ""
    loki: bool = False


@dataclass(frozen=True)
class PanelSpec:
    """A panel: ``kind`` is timeseries, stat, table (instant) or logs."""

    title: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"
    unit: str = "short"
    description: str = ""
    width: int = 12


@dataclass(frozen=True)
class DashboardSpec:
    """A dashboard: uid, title and its panels in order (laid out two to a row)."""

    uid: str
    title: str
    panels: tuple[PanelSpec, ...]


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def ts(title: str, *queries: Query, unit: str = "short", description: str = "") -> PanelSpec:
    return PanelSpec(title, queries, "timeseries", unit, description)


def st(title: str, *queries: Query, unit: str = "short", description: str = "") -> PanelSpec:
    return PanelSpec(title, queries, "stat", unit, description, width=6)


RATE = "5m"
"""The window of every rate(): at least four scrapes at the shipped 15 s interval."""

DASHBOARDS: tuple[DashboardSpec, ...] = (
    DashboardSpec("devsilo-overview", "devsilo / Overview", (
        st("Services up", q('sum(up{job="devsilo"})', "up"),
           description="Services whose /metrics Prometheus reached at its last scrape."),
        st("Services down", q('count(up{job="devsilo"} == 0) or vector(0)', "down")),
        st("Sessions running", q("sum(silo_sessions_active)", "sessions")),
        st("Free sandbox slots", q('max(silo_pool_capacity{state="free"})', "free")),
        ts("Service up, by service", q('max by (service, role) (up{job="devsilo"})', "{{service}}")),
        ts("NATS connection, by service", q("min by (service) (silo_nats_connected)", "{{service}}"),
           description="1 while the service's NATS connection is up."),
        ts("Messages handled, by service", q(f"sum by (service) (rate(silo_messages_received_total[{RATE}]))",
                                              "{{service}}"), unit="reqps"),
        ts("Messages rejected, by reason",
           q(f"sum by (reason) (rate(silo_messages_rejected_total[{RATE}]))", "{{reason}}"), unit="reqps"),
        ts("Handler latency p95, by service",
           q(f"histogram_quantile(0.95, sum by (service, le) (rate(silo_handler_seconds_bucket[{RATE}])))",
             "{{service}}"), unit="s"),
        ts("NATS reconnects, by service",
           q(f"sum by (service) (increase(silo_nats_reconnects_total[{RATE}]))", "{{service}}"),
           description="A client moved to another NATS node: a node went away or the network broke."),
    )),
    DashboardSpec("devsilo-sessions", "devsilo / Sessions and models", (
        st("Sessions running", q("sum(silo_sessions_active)", "sessions")),
        st("Sessions created (24 h)", q("sum(increase(silo_sessions_created_total[24h]))", "created")),
        st("Model spend (24 h)", q("sum(increase(silo_model_cost_usd_total[24h]))", "USD"), unit="currencyUSD"),
        st("Tokens (24 h)", q("sum(increase(silo_model_tokens_total[24h]))", "tokens")),
        ts("Tokens per second, by backend and kind",
           q(f"sum by (backend, kind) (rate(silo_model_tokens_total[{RATE}]))", "{{backend}} {{kind}}")),
        ts("Dollars per hour, by backend",
           q(f"sum by (backend) (rate(silo_model_cost_usd_total[{RATE}])) * 3600", "{{backend}}"),
           unit="currencyUSD"),
        ts("Unpriced completions, by backend",
           q(f"sum by (backend) (increase(silo_model_unpriced_completions_total[{RATE}]))", "{{backend}}"),
           description="Completions of models without a known price: their dollars are missing above."),
        ts("Quota stops, by quota", q(f"sum by (quota) (increase(silo_quota_stops_total[{RATE}]))", "{{quota}}")),
        ts("Sandbox lease wait p95, by outcome",
           q(f"histogram_quantile(0.95, sum by (outcome, le) (rate(silo_lease_wait_seconds_bucket[{RATE}])))",
             "{{outcome}}"), unit="s"),
        ts("Journal messages, by kind",
           q(f"sum by (kind) (rate(silo_journal_messages_total[{RATE}]))", "{{kind}}"), unit="reqps"),
    )),
    DashboardSpec("devsilo-executors", "devsilo / Executor pool and sandboxes", (
        st("Executors in the pool", q("max(silo_pool_executors)", "executors")),
        st("Pool slots free", q('max(silo_pool_capacity{state="free"})', "free")),
        st("Pool slots total", q('max(silo_pool_capacity{state="total"})', "total")),
        st("Warm sandboxes", q("sum(silo_sandboxes_warm)", "warm")),
        ts("Slots per executor, by state", q("sum by (service, state) (silo_executor_capacity)",
                                             "{{service}} {{state}}")),
        ts("Sandboxes, by backend and state", q("sum by (backend, state) (silo_sandboxes)",
                                                "{{backend}} {{state}}")),
        ts("Sandbox starts, by backend and outcome",
           q(f"sum by (backend, outcome) (rate(silo_sandbox_starts_total[{RATE}]))", "{{backend}} {{outcome}}"),
           unit="ops"),
        ts("Sandbox start latency p95, by backend",
           q(f"histogram_quantile(0.95, sum by (backend, le) (rate(silo_sandbox_start_seconds_bucket[{RATE}])))",
             "{{backend}}"), unit="s"),
        ts("Leases, by backend and kind",
           q(f"sum by (backend, kind) (increase(silo_sandbox_leases_total[{RATE}]))", "{{backend}} {{kind}}")),
        ts("Lease refusals, by reason",
           q(f"sum by (reason) (increase(silo_lease_refusals_total[{RATE}]))", "{{reason}}")),
        ts("Tool calls, by tool and outcome",
           q(f"sum by (tool, outcome) (rate(silo_tool_calls_total[{RATE}]))", "{{tool}} {{outcome}}"),
           unit="ops"),
        ts("Tool latency p95, by tool",
           q(f"histogram_quantile(0.95, sum by (tool, le) (rate(silo_tool_seconds_bucket[{RATE}])))", "{{tool}}"),
           unit="s"),
    )),
    DashboardSpec("devsilo-egress", "devsilo / Egress", (
        st("Session policies in force", q("sum(silo_egress_sessions)", "sessions")),
        st("Blocked share (5 m)",
           q(f'sum(rate(silo_egress_requests_total{{decision="blocked"}}[{RATE}])) '
             f"/ sum(rate(silo_egress_requests_total[{RATE}]))", "blocked"), unit="percentunit"),
        st("Credentials injected (24 h)", q("sum(increase(silo_egress_credentials_injected_total[24h]))",
                                            "injected")),
        st("Records not journaled (24 h)", q("sum(increase(silo_egress_records_dropped_total[24h]))", "dropped")),
        ts("Requests, by decision and reason",
           q(f"sum by (decision, reason) (rate(silo_egress_requests_total[{RATE}]))", "{{decision}} {{reason}}"),
           unit="reqps"),
        ts("Bytes, by direction", q(f"sum by (direction) (rate(silo_egress_bytes_total[{RATE}]))",
                                    "{{direction}}"), unit="Bps"),
        ts("Request duration p95, by decision",
           q(f"histogram_quantile(0.95, sum by (decision, le) (rate(silo_egress_request_seconds_bucket[{RATE}])))",
             "{{decision}}"), unit="s"),
        ts("Sandbox DNS queries, by answer",
           q(f"sum by (answer) (rate(silo_egress_dns_queries_total[{RATE}]))", "{{answer}}"), unit="reqps"),
        PanelSpec("Top blocked domains (from the egress's logs, Loki)", (Query(
            'topk(10, sum by (host) (count_over_time({service="egress"} | json | event="egress_blocked" '
            "[$__range])))", "{{host}}", loki=True),), "table",
            description="Needs Loki collecting the egress's JSON log lines with a service=\"egress\" label. "
                        "Hosts are never Prometheus labels (unbounded); they live in the logs."),
    )),
    DashboardSpec("devsilo-gateway", "devsilo / Gateway and clients", (
        st("Clients connected", q("sum(silo_client_connections)", "clients")),
        st("Connections accepted (24 h)", q("sum(increase(silo_client_connections_accepted_total[24h]))",
                                            "accepted")),
        st("Sessions created (24 h)", q("sum(increase(silo_sessions_created_total[24h]))", "created")),
        st("Events delivered (5 m)", q(f"sum(increase(silo_events_delivered_total[{RATE}]))", "events")),
        ts("Clients connected, by gateway", q("sum by (service) (silo_client_connections)", "{{service}}")),
        ts("Events delivered and caught up",
           q(f"sum(rate(silo_events_delivered_total[{RATE}]))", "delivered"),
           q(f"sum(rate(silo_events_caught_up_total[{RATE}]))", "from the stream"), unit="ops"),
        ts("Delivery lag p95, by path",
           q(f"histogram_quantile(0.95, sum by (path, le) (rate(silo_event_delivery_lag_seconds_bucket[{RATE}])))",
             "{{path}}"), unit="s"),
        ts("Slow clients: feeds dropped and overloaded answers",
           q(f"sum(increase(silo_delivery_queue_drops_total[{RATE}]))", "feed dropped"),
           q(f"sum by (reason) (increase(silo_overloaded_total[{RATE}]))", "overloaded {{reason}}")),
        ts("Client authentication, by method and outcome",
           q(f"sum by (method, outcome) (rate(silo_auth_total[{RATE}]))", "{{method}} {{outcome}}"), unit="ops"),
        ts("Gateway tables, by table", q("max by (table) (silo_gateway_table_entries)", "{{table}}"),
           description="Entries in each in-memory table of the gateway; each is bounded or pruned, so "
                       "under steady load every line stays level (one that climbs is a leak)."),
    )),
    DashboardSpec("devsilo-security", "devsilo / Security", (
        st("Auth failures (1 h)", q('sum(increase(silo_auth_total{outcome!="ok"}[1h]))', "failures")),
        st("Signature rejections (1 h)",
           q('sum(increase(silo_messages_rejected_total{reason=~"bad_signature|wrong_key|unknown_sender"}[1h]))',
             "rejected")),
        st("Pairing lockouts (24 h)", q("sum(increase(silo_pairing_lockouts_total[24h]))", "lockouts")),
        st("Client keys revoked (24 h)", q("sum(increase(silo_client_keys_revoked_total[24h]))", "revoked")),
        ts("Auth failures, by method and outcome",
           q(f'sum by (method, outcome) (increase(silo_auth_total{{outcome!="ok"}}[{RATE}]))',
             "{{method}} {{outcome}}")),
        ts("Pairing attempts, by outcome",
           q(f"sum by (outcome) (increase(silo_pairing_attempts_total[{RATE}]))", "{{outcome}}"),
           q(f"sum(increase(silo_pairing_codes_issued_total[{RATE}]))", "codes issued")),
        ts("Rejected messages, by service and reason",
           q(f"sum by (service, reason) (increase(silo_messages_rejected_total[{RATE}]))",
             "{{service}} {{reason}}")),
        ts("Events not delivered (bad signature, wrong sender or session)",
           q(f"sum by (service) (increase(silo_events_rejected_total[{RATE}]))", "{{service}}")),
        ts("Egress refusals, by reason",
           q(f'sum by (reason) (increase(silo_egress_requests_total{{decision="blocked"}}[{RATE}]))',
             "{{reason}}")),
        ts("Handler errors, by service and code",
           q(f"sum by (service, code) (increase(silo_handler_errors_total[{RATE}]))", "{{service}} {{code}}")),
    )),
)


def _target(query: Query, ref: str) -> gprom.Dataquery | gloki.Dataquery:
    if query.loki:
        return (gloki.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref)
                .query_type("instant").instant(True).datasource(LOKI))
    return gprom.Dataquery().expr(query.expr).legend_format(query.legend or "__auto").ref_id(ref).range()


def _panel(spec: PanelSpec) -> Builder[Panel]:
    builder: gts.Panel | gstat.Panel | gtable.Panel | glogs.Panel
    if spec.kind == "timeseries":
        builder = (gts.Panel()
                   .legend(gcommon.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                           .placement(common.LegendPlacement.BOTTOM))
                   .tooltip(gcommon.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                            .sort(common.SortOrder.DESCENDING)))
    elif spec.kind == "stat":
        builder = (gstat.Panel().graph_mode(common.BigValueGraphMode.AREA)
                   .reduce_options(gcommon.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    elif spec.kind == "table":
        builder = gtable.Panel().show_header(True)
    else:
        builder = glogs.Panel()
    loki = any(x.loki for x in spec.queries)
    builder = builder.title(spec.title).unit(spec.unit).span(spec.width).height(8 if spec.kind != "stat" else 4)
    builder = builder.datasource(LOKI if loki else PROMETHEUS)
    if spec.description:
        builder = builder.description(spec.description)
    for i, query in enumerate(spec.queries):
        builder = builder.with_target(_target(query, chr(ord("A") + i)))
    return builder


def build(spec: DashboardSpec) -> dict[str, object]:
    """The dashboard's JSON model, as Grafana's provisioning reads it."""
    dash = (gd.Dashboard(spec.title).uid(spec.uid).tags(["devsilo"]).refresh("30s").time("now-6h", "now")
            .timezone("utc").editable())
    for panel in spec.panels:
        dash = dash.with_panel(_panel(panel))
    model: dict[str, object] = json.loads(json.dumps(dash.build(), cls=JSONEncoder))
    return model


def render(spec: DashboardSpec) -> str:
    """The file text of one dashboard (stable: sorted keys, trailing newline)."""
    return json.dumps(build(spec), indent=2, sort_keys=True) + "\n"


def prometheus_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) of every Prometheus query."""
    return [(d.uid, p.title, x.expr) for d in DASHBOARDS for p in d.panels for x in p.queries if not x.loki]


def write(out: Path = OUT) -> list[Path]:
    """Write every dashboard's JSON into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in DASHBOARDS:
        path = out / f"{spec.uid.removeprefix('devsilo-')}.json"
        path.write_text(render(spec))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p)
