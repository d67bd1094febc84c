"""The /healthz and /metrics HTTP endpoint every service serves on its own port."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class HealthServer:
    """A small HTTP server: ``/healthz`` (JSON, 200 or 503) and ``/metrics``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, object]],
        host: str,
        port: int,
    ) -> None:
        self._registry = registry
        self._status = status
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Start listening."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        status = self._status()
        code = 200 if status.get("ok") else 503
        return web.Response(status=code, text=json.dumps(status), content_type="application/json")

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
