"""The egress service: accepts session policies from verified grants.

The proxy itself (allow-list, address guard, TLS interception, credential
injection, DNS) is not built yet: until it is, sandboxes have no network.
"""

from __future__ import annotations

from devsilo.protocol import (
    EgressSessionClose,
    EgressSessionOpen,
    EgressSessionReady,
    Envelope,
    GrantError,
    Message,
    open_grant,
    subjects,
)
from devsilo.runtime import ServiceContext
from nats.aio.msg import Msg
from prometheus_client import Gauge

from ._policy import PolicyTable


async def serve(ctx: ServiceContext) -> None:
    """Run the egress until stopped."""
    bus = ctx.bus
    policies = PolicyTable()
    gauge = Gauge("silo_egress_sessions", "Session policies in force.", registry=ctx.metrics.registry)

    async def on_session(env: Envelope, msg: Msg) -> Message | None:
        if isinstance(env.body, EgressSessionClose):
            if env.header.sid != env.body.session_id:
                raise GrantError("close signed for another session")
            policies.remove(env.body.session_id)
            gauge.set(len(policies))
            return None
        req = env.expect(EgressSessionOpen)
        grant = open_grant(bus.verifier, req.grant)
        if env.header.sid != grant.session_id:
            raise GrantError(f"open signed for {env.header.sid}, grant is for {grant.session_id}")
        policy = policies.install(grant)
        gauge.set(len(policies))
        ctx.log.info("egress_session_open", session=grant.session_id, domains=len(policy.allowed_domains))
        return EgressSessionReady(session_id=grant.session_id, egress_id=ctx.service_id,
                                  allowed_domains=policy.allowed_domains)

    await bus.subscribe(subjects.egress_session(ctx.service_id), on_session)
    await bus.subscribe(subjects.egress_session(subjects.EGRESS_ANY), on_session, queue=subjects.EGRESS_QUEUE)
    await ctx.stopping.wait()
