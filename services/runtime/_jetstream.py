"""JetStream with devsilo's replication factor applied to every stream it creates.

In a NATS cluster (``deploy/multi-host/``) the events and journal streams,
the KV buckets and the object stores must survive the loss of a node, so
config.json's ``nats.replicas`` (3 in a three-node cluster) is the replica
count of each of them. Every creation path of nats-py (``add_stream``,
``create_key_value``, ``create_object_store``) goes through ``add_stream``;
that is the one place the count is applied. A stream whose creator asked for
more than one replica keeps its own count. Streams that already exist are
left as they are (raise an R1 stream with ``nats stream edit --replicas 3``).
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig, StreamInfo


class ReplicatedJetStream(JetStreamContext):
    """A JetStream context whose new streams get ``replicas`` replicas unless they ask for more."""

    def __init__(self, nc: NATS, replicas: int, **kwargs: Any) -> None:
        super().__init__(nc, **kwargs)
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        self.replicas = replicas

    async def add_stream(self, config: StreamConfig | None = None, **params: Any) -> StreamInfo:
        """Create a stream with at least ``replicas`` replicas."""
        config = (config or StreamConfig()).evolve(**params)
        if (config.num_replicas or 1) < self.replicas:
            config = config.evolve(num_replicas=self.replicas)
        return await super().add_stream(config)


def jetstream(nc: NATS, replicas: int = 1) -> JetStreamContext:
    """``nc``'s JetStream context, replicating new streams ``replicas`` times."""
    return ReplicatedJetStream(nc, replicas) if replicas > 1 else nc.jetstream()
