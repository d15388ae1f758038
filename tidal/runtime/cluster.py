"""Which discovery and event plane a process uses: embedded (nothing configured) or distributed.

`ClusterConfig` names the services (etcd endpoints, a NATS URL) and the namespace that keeps
deployments sharing them apart. The factories return the embedded implementations when a
service is not configured: `LocalDiscovery` without etcd, ZMQ PUB/SUB without NATS. The
distributed implementations are imported only when asked for, so an embedded deployment never
loads the etcd or NATS clients.

Discovery is returned unstarted: `await discovery.start()` before handing it to a router (its
`list()` is a cache that a background watch fills) and `await discovery.close()` at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tidal.runtime.discovery import Discovery, LocalDiscovery
from tidal.runtime.events import EventPublisher, EventSubscriber, ZmqEventPublisher, ZmqEventSubscriber

NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ClusterConfig:
    etcd_endpoints: tuple[str, ...] = ()
    """etcd client URLs (`http://10.0.0.5:2379`); empty: discovery is the process's own table."""
    nats_url: str | None = None
    """NATS server URL (`nats://10.0.0.5:4222`), several joined by commas; None: events go over
    ZMQ PUB/SUB, each worker binding its own socket."""
    namespace: str = "default"
    """Keeps deployments that share etcd and NATS apart: etcd keys under `/tidal/<namespace>/`,
    NATS subjects under `tidal.<namespace>.`."""
    lease_ttl_s: int = 10
    """A worker's etcd lease: a worker that stops renewing it (dead, cut off) disappears from
    discovery this long after its last renewal."""

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r}: use letters, digits, '-' and '_' only")
        if self.lease_ttl_s < 2:
            raise ValueError(f"lease_ttl_s={self.lease_ttl_s}: etcd grants no lease shorter than 2 s")

    @property
    def nats_servers(self) -> list[str]:
        return [url.strip() for url in (self.nats_url or "").split(",") if url.strip()]


def make_discovery(cluster: ClusterConfig) -> Discovery:
    """etcd discovery if endpoints are configured, else an in-process table (unstarted)."""
    if not cluster.etcd_endpoints:
        return LocalDiscovery()
    from tidal.runtime.etcd_discovery import EtcdDiscovery
    return EtcdDiscovery(cluster)


def make_event_publisher(cluster: ClusterConfig, source_id: str, address: str) -> EventPublisher:
    """A worker's publisher: NATS subjects `tidal.<namespace>.<topic>.<source_id>` if NATS is
    configured, else a ZMQ PUB socket bound at `address`. Its `address` attribute is what the
    worker advertises as `WorkerInfo.event_addr`."""
    if not cluster.nats_servers:
        return ZmqEventPublisher(address)
    from tidal.runtime.nats_events import NatsEventPublisher
    return NatsEventPublisher(cluster, source_id)


def make_event_subscriber(cluster: ClusterConfig, topics: tuple[str, ...] = ("",)) -> EventSubscriber:
    """A subscriber to `topics` (exact topic names for NATS, prefixes for ZMQ; "" is every topic)."""
    if not cluster.nats_servers:
        return ZmqEventSubscriber(topics)
    from tidal.runtime.nats_events import NatsEventSubscriber
    return NatsEventSubscriber(cluster, topics)
