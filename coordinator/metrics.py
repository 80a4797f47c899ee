"""Prometheus metrics of the coordinator (prometheus-client), served on ``/metrics``.

Each service has its own registry, so that several coordinators (tests, a lab) can live in
one process. The endpoint binds to ``metrics.host`` (loopback by default); put it behind
your monitoring network's access control.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from compression.reasons import Reason

log = logging.getLogger(__name__)

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, fleet: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"fleet": fleet}
        r = self.registry
        self.accepted = Counter("fedge_updates_accepted", "Updates accepted (applied or buffered)", ["fleet"], registry=r).labels(**labels)
        self.rejected = Counter("fedge_updates_rejected", "Updates rejected, by reason", ["fleet", "reason"], registry=r)
        for code in Reason:  # every reason is exported from the start, at 0, so that rates and alerts see it
            self.rejected.labels(fleet=fleet, reason=code.value)
        self.duplicates = Counter(
            "fedge_updates_duplicate",
            "Resent updates that were already processed (confirmed again, not applied twice)",
            ["fleet"],
            registry=r,
        ).labels(**labels)
        self.applied = Counter("fedge_updates_applied", "Updates aggregated into a global version", ["fleet"], registry=r).labels(**labels)
        self.staleness = Histogram(
            "fedge_update_staleness", "Staleness of accepted updates (versions)", ["fleet"], buckets=STALENESS_BUCKETS, registry=r
        ).labels(**labels)
        self.latency = Histogram(
            "fedge_ingest_latency_seconds",
            "From receipt of an update to its acknowledgement after the durable commit",
            ["fleet"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.version = Gauge("fedge_global_version", "Current global version", ["fleet"], registry=r).labels(**labels)
        self.devices_online = Gauge("fedge_devices_online", "Devices whose last status is not offline", ["fleet"], registry=r).labels(
            **labels
        )
        self.buffered = Gauge("fedge_buffered_updates", "Accepted updates waiting for aggregation", ["fleet"], registry=r).labels(**labels)
        self.epsilon_max = Gauge(
            "fedge_dp_epsilon_max", "Largest per-device epsilon spent, RDP bound (central DP; 0 when off)", ["fleet"], registry=r
        ).labels(**labels)
        self.cohort_in_flight = Gauge(
            "fedge_cohort_devices_in_flight", "Devices invited to a cohort that have not reported", ["fleet"], registry=r
        ).labels(**labels)
        self.cohorts_opened = Gauge("fedge_cohorts_opened", "Cohorts opened since the fleet began", ["fleet"], registry=r).labels(**labels)
        self.cohort_dropouts = Gauge(
            "fedge_cohort_dropouts", "Cohort members that did not report by the deadline", ["fleet"], registry=r
        ).labels(**labels)
        self._fleet = fleet
        self._server: Any = None

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected.labels(fleet=self._fleet, reason=reason).inc(n)

    def serve(self, host: str, port: int) -> int:
        """Start ``/metrics`` on ``host:port`` (0 picks a free port); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
