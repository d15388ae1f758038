"""The discovery and event planes a process uses, built from its `tidal.config.PlaneConfig`.

The factories return the embedded implementations when a service is not configured:
`LocalDiscovery` without etcd, ZMQ PUB/SUB without NATS. The etcd and NATS implementations are
imported only when asked for, so an embedded deployment never loads their clients.

`curve_keys` loads the ZMQ CURVE keys `curve_key_dir` names (None without); the ZMQ event plane
uses them, and the cluster commands hand them to the request plane and the zmq KV transfer.

Discovery is returned unstarted: `await discovery.start()` before handing it to a router (its
`list()` is a cache that a background watch fills) and `await discovery.close()` at the end.
"""

from __future__ import annotations

from tidal.config import PlaneConfig
from tidal.curve import CurveKeys
from tidal.runtime.discovery import Discovery, LocalDiscovery
from tidal.runtime.events import EventPublisher, EventSubscriber, ZmqEventPublisher, ZmqEventSubscriber


def curve_keys(planes: PlaneConfig) -> CurveKeys | None:
    """The CURVE keys in `planes.curve_key_dir`; None when it names none (plain TCP)."""
    return CurveKeys.load(planes.curve_key_dir) if planes.curve_key_dir else None


def make_discovery(planes: PlaneConfig) -> Discovery:
    """etcd discovery if endpoints are configured, else an in-process table (unstarted)."""
    if not planes.etcd_endpoints:
        return LocalDiscovery()
    from tidal.runtime.etcd_discovery import EtcdDiscovery
    return EtcdDiscovery(planes)


def make_event_publisher(planes: PlaneConfig, source_id: str, address: str) -> EventPublisher:
    """A worker's publisher: NATS subjects `tidal.<namespace>.<topic>.<source_id>` if NATS is
    configured, else a ZMQ PUB socket bound at `address`. Its `address` attribute is what the
    worker advertises as `WorkerInfo.event_addr`."""
    if not planes.nats_servers:
        return ZmqEventPublisher(address, keys=curve_keys(planes))
    from tidal.runtime.nats_events import NatsEventPublisher
    return NatsEventPublisher(planes, source_id)


def make_event_subscriber(planes: PlaneConfig, topics: tuple[str, ...] = ("",)) -> EventSubscriber:
    """A subscriber to `topics` (exact topic names for NATS, prefixes for ZMQ; "" is every topic)."""
    if not planes.nats_servers:
        return ZmqEventSubscriber(topics, keys=curve_keys(planes))
    from tidal.runtime.nats_events import NatsEventSubscriber
    return NatsEventSubscriber(planes, topics)
