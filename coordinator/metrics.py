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
        self.server_eval_loss = Gauge(
            "fedge_server_eval_loss", "Held-out loss of the last version scored at the coordinator ([eval])", ["fleet"], registry=r
        ).labels(**labels)
        self.server_eval_version = Gauge(
            "fedge_server_eval_version", "The global version that fedge_server_eval_loss is for", ["fleet"], registry=r
        ).labels(**labels)
        self.cohorts_opened = Gauge("fedge_cohorts_opened", "Cohorts opened since the fleet began", ["fleet"], registry=r).labels(**labels)
        self.cohort_dropouts = Gauge(
            "fedge_cohort_dropouts", "Cohort members that did not report by the deadline", ["fleet"], registry=r
        ).labels(**labels)
        # A root's sites (coordinator.root): from each site's status and its bridge's notification.
        site = ["fleet", "site"]
        self.site_bridge = _Labelled(
            Gauge("fedge_site_bridge_up", "1 while the site broker's bridge to the root is connected", site, registry=r), fleet
        )
        self.site_online = _Labelled(Gauge("fedge_site_online", "1 while the site aggregator's status is online", site, registry=r), fleet)
        self.site_lag = _Labelled(
            Gauge("fedge_site_lag_versions", "Root versions the site aggregator has not reached yet", site, registry=r), fleet
        )
        self.site_devices = _Labelled(Gauge("fedge_site_devices_online", "Devices online at the site", site, registry=r), fleet)
        self.site_unacked = _Labelled(
            Gauge("fedge_site_partials_unacked", "The site's partials waiting for the root's ack", site, registry=r), fleet
        )
        self.site_rejected = _Labelled(
            Gauge("fedge_site_updates_rejected", "Updates the site aggregator refused, all reasons", site, registry=r), fleet
        )
        self.site_updates = _Labelled(
            Counter("fedge_site_updates", "Device updates the root took in the site's partials", site, registry=r), fleet
        )
        self._fleet = fleet
        self._server: Any = None

    def site_status(self, site: str, status: dict[str, Any], root_version: int) -> None:
        """Export what a site's status says (its values are the site's word: numbers are clamped to be finite)."""

        def num(key: str) -> float:
            v = status.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e15 else 0.0

        self.site_online.labels(site=site).set(status.get("state") == "online")
        following = status.get("following")
        lag = root_version - following if isinstance(following, int) and not isinstance(following, bool) else root_version
        self.site_lag.labels(site=site).set(max(0, lag))
        self.site_devices.labels(site=site).set(num("devices_online"))
        self.site_unacked.labels(site=site).set(num("partials_unacked"))
        self.site_rejected.labels(site=site).set(num("rejected"))

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


class _Labelled:
    """A metric with the fleet's label already set: ``.labels(site=...)`` adds the rest."""

    def __init__(self, metric: Any, fleet: str) -> None:
        self.metric = metric
        self.fleet = fleet

    def labels(self, **labels: str) -> Any:
        return self.metric.labels(fleet=self.fleet, **labels)
