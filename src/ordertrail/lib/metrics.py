"""Prometheus instruments: what the service counts and times as it runs.

Each process keeps its own registry; with several server processes, each
answers for itself (scrape them one by one, or put one process per port).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "APPEND_SECONDS",
    "BATCH_SIZE",
    "DELIVERIES",
    "PROJECTION_APPLIED",
    "PROJECTION_LAG_EVENTS",
    "PROJECTION_LAG_SECONDS",
    "PROJECTION_TARGET",
    "REGISTRY",
]

REGISTRY = CollectorRegistry(auto_describe=True)

DELIVERIES = Counter(
    "ordertrail_deliveries",
    "Webhook deliveries by mode and outcome.",
    ["mode", "outcome"],
    registry=REGISTRY,
)
APPEND_SECONDS = Histogram(
    "ordertrail_append_seconds",
    "Time to append and commit one group of deliveries.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "ordertrail_append_batch_size",
    "Deliveries sharing one commit.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
PROJECTION_LAG_EVENTS = Gauge(
    "ordertrail_projection_lag_events",
    "Events after a projection version's checkpoint.",
    ["projection", "version", "state"],
    registry=REGISTRY,
)
PROJECTION_LAG_SECONDS = Gauge(
    "ordertrail_projection_lag_seconds",
    "Age of the oldest event after a projection version's checkpoint.",
    ["projection", "version", "state"],
    registry=REGISTRY,
)
PROJECTION_APPLIED = Gauge(
    "ordertrail_projection_events_applied",
    "Events a projection version has applied (rebuild progress).",
    ["projection", "version", "state"],
    registry=REGISTRY,
)
PROJECTION_TARGET = Gauge(
    "ordertrail_projection_head_position",
    "The log's highest position, the goal of a rebuild.",
    ["projection", "version", "state"],
    registry=REGISTRY,
)
