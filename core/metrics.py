"""dockyard's Prometheus metrics, defined once in their own registry.

Counters and histograms move as things happen: most from the ``dockyard_event`` observer
(``dockyard.plugins.telemetry``), health-probe latency from ``core/health.py`` and HTTP
requests from the API's middleware. Gauges of what exists right now (slots by state, port
leases) are read from the store when ``/metrics`` is scraped (``dockyard.api.metrics``).
A plugin registers its own metrics in :data:`REGISTRY` (the evaluation plugin's are in
``dockyard.plugins.evaluation.metrics``) and refreshes its scrape-time gauges through
``ApiRegistrar.scrape``.

The README's "Metrics" table lists every metric; ``tests/test_observability.py`` checks that
table against :data:`REGISTRY`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

#: Seconds: from sub-second cached steps up to the longest build.
SLOW_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

BUILDS = Counter(
    "dockyard_builds",
    "Image builds by outcome (ok, failed) and reason",
    ["outcome", "reason"],
    registry=REGISTRY,
)
BUILD_SECONDS = Histogram(
    "dockyard_build_duration_seconds",
    "Time from fetched source to image ready (or build failure)",
    ["outcome"],
    buckets=SLOW_BUCKETS,
    registry=REGISTRY,
)
FETCH_SECONDS = Histogram(
    "dockyard_fetch_duration_seconds",
    "Time to fetch a revision's source",
    buckets=SLOW_BUCKETS,
    registry=REGISTRY,
)
FETCH_BYTES = Counter(
    "dockyard_fetch_bytes",
    "Bytes received while fetching sources",
    registry=REGISTRY,
)
DEPLOYS = Counter(
    "dockyard_deploys",
    "Deploys (a revision into a slot) by outcome (promoted, failed) and failure reason",
    ["outcome", "reason"],
    registry=REGISTRY,
)
DEPLOY_SECONDS = Histogram(
    "dockyard_deploy_duration_seconds",
    "Time from BUILDING to PROMOTED, HEALTHY (no auto-promote) or FAILED",
    ["outcome"],
    buckets=SLOW_BUCKETS,
    registry=REGISTRY,
)
PROBE_SECONDS = Histogram(
    "dockyard_health_probe_duration_seconds",
    "Latency of dockyard's HTTP health probes, by result (ok, failed)",
    ["result"],
    buckets=FAST_BUCKETS,
    registry=REGISTRY,
)
SWITCH_SECONDS = Histogram(
    "dockyard_switch_duration_seconds",
    "Time from writing a route to the proxy serving it, by router",
    ["router"],
    buckets=FAST_BUCKETS,
    registry=REGISTRY,
)
SLOT_TRANSITIONS = Counter(
    "dockyard_slot_transitions",
    "Slot state changes, by the state entered",
    ["to_state"],
    registry=REGISTRY,
)
SLOTS = Gauge(
    "dockyard_slots",
    "Slots by state (read at scrape time)",
    ["state"],
    registry=REGISTRY,
)
PORT_LEASES = Gauge(
    "dockyard_port_leases",
    "Host ports leased (read at scrape time)",
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "dockyard_http_requests",
    "API requests by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "dockyard_http_request_duration_seconds",
    "API request latency by route template and method (streams: until the headers)",
    ["route", "method"],
    buckets=FAST_BUCKETS,
    registry=REGISTRY,
)
EVENT_STREAMS = Gauge(
    "dockyard_event_streams",
    "Open server-sent event streams",
    registry=REGISTRY,
)


def observe_probe(ok: bool, latency_s: float) -> None:
    """Record one health probe (called by ``core/health.py``)."""
    PROBE_SECONDS.labels(result="ok" if ok else "failed").observe(latency_s)
