"""Prometheus metrics every service has, in a registry of its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class ServiceMetrics:
    """The metrics shared by every service; services add their own to ``registry``.

    Labels stay low-cardinality: message types, reasons, roles; never session
    or message ids.
    """

    def __init__(self, service: str, role: str) -> None:
        self.registry = CollectorRegistry()
        self.info = Gauge(
            "silo_service_info", "Service identity (value 1).", ["service", "role"],
            registry=self.registry,
        )
        self.info.labels(service=service, role=role).set(1)
        self.messages_received = Counter(
            "silo_messages_received_total", "Verified messages handled, by type.", ["type"],
            registry=self.registry,
        )
        self.messages_rejected = Counter(
            "silo_messages_rejected_total",
            "Messages dropped before any handler, by reason.", ["reason"],
            registry=self.registry,
        )
        self.messages_sent = Counter(
            "silo_messages_sent_total", "Signed messages sent, by type.", ["type"],
            registry=self.registry,
        )
        self.handler_seconds = Histogram(
            "silo_handler_seconds", "Time spent in message handlers, by type.", ["type"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
        )
        self.handler_errors = Counter(
            "silo_handler_errors_total", "Handlers that answered with an error, by type and code.",
            ["type", "code"], registry=self.registry,
        )
        self.js_retries = Counter(
            "silo_jetstream_publish_retries_total",
            "JetStream publishes repeated after no acknowledgement (e.g. NATS restarting).",
            registry=self.registry,
        )
        self.nats_connected = Gauge(
            "silo_nats_connected", "1 while the NATS connection is up.", registry=self.registry,
        )
        # Rejections are pre-declared so dashboards see zeros, not gaps.
        for reason in (
            "oversized", "malformed", "unknown_sender", "wrong_key", "bad_signature",
            "role_not_allowed", "wrong_subject", "expired", "replayed", "invalid_body",
        ):
            self.messages_rejected.labels(reason=reason)

    def watch_nats(self, nc: Any) -> None:
        """Read the NATS connection's state and reconnect count at every scrape.

        ``silo_nats_reconnects_total`` counts the times this client reconnected,
        to the same node or another one of the cluster: the services' own view of
        a NATS node going away (nats-server's /varz and /routez are JSON that
        Prometheus does not scrape).
        """
        self.nats_connected.set_function(lambda: 1.0 if nc.is_connected else 0.0)
        self.registry.register(_NatsReconnects(nc))


class _NatsReconnects(Collector):
    """``silo_nats_reconnects_total`` from nats-py's own count."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("silo_nats_reconnects", "Reconnections of this service to NATS.",
                                  value=float(self._nc.stats.get("reconnects", 0)))

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("silo_nats_reconnects", "Reconnections of this service to NATS.", value=0.0)
