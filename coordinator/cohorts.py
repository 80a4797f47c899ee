"""Cohorts: the coordinator decides which devices train, and how many at once.

With ``[cohorts] enabled``, a device trains only when invited. The coordinator keeps at
most ``concurrency`` devices in flight (FedBuff's C): whenever enough slots are free, it
samples a cohort of up to ``size`` devices, uniformly without replacement and seeded by
``(seed, cohort number)``, from those eligible now (online, idle or waiting, and not in
flight), records it, and only then sends each member a signed invitation on
``fl/<fleet>/cohorts/<cohort>/invite/<device>``. A member's upload names its cohort; it
frees the member's slot. A member that has not uploaded by the deadline is a dropout: its
slot is freed, and an upload it makes later is refused (``not_invited``). Cohorts overlap
in time: a new one opens as soon as slots free up, so the fleet never waits for the
slowest member of the last one.

Bounding concurrency bounds staleness: at most ``concurrency`` updates can be trained
against any one version's successors, which is what keeps asynchronous strategies stable
on a loaded coordinator (an unbounded fleet's updates queue, and staleness grows without
limit).

:class:`CohortPlanner` is pure (time and the eligible devices are passed in); the
:class:`Cohorts` shell records cohorts and members in the store, in the caller's
transaction.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.protocol import CohortInvite, SecAggParams
from coordinator.cohort_privacy import CohortBudget, recorded_sampling
from coordinator.errors import Rejection, StoreError

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig
    from coordinator.engine import Engine
    from coordinator.metrics import Metrics
    from coordinator.privacy import DPConfig
    from coordinator.secure import SecureRounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortConfig:
    """``[cohorts]``: who trains, and how many at once (see :mod:`coordinator.cohorts`)."""

    enabled: bool = False
    concurrency: int = 20
    """Devices training at once, at most (FedBuff's C)."""
    size: int = 0
    """Devices per cohort (0: the strategy's buffer size, or the round's participants under FedAvg; at most ``concurrency``)."""
    deadline_s: float = 600.0
    """A member that has not uploaded this long after its invitation is a dropout."""
    fill_wait_s: float = 5.0
    """A cohort smaller than ``size`` (too few devices eligible) opens only this long after the last one
    (or the start), so that devices coming online one by one join one cohort, not one each."""
    seed: int = 0
    """Cohort ``n`` is sampled with ``numpy.random.default_rng([seed, n])``: recorded and reproducible."""

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 100_000:
            raise ValueError(f"cohorts.concurrency must be in 1..100000, got {self.concurrency}")
        if not 0 <= self.size <= self.concurrency:
            raise ValueError(f"cohorts.size must be in 0..concurrency ({self.concurrency}), got {self.size}")
        if not 1.0 <= self.deadline_s <= 7 * 86400:
            raise ValueError(f"cohorts.deadline_s must be in 1..604800 seconds, got {self.deadline_s}")
        if self.seed < 0:
            raise ValueError(f"cohorts.seed must be non-negative, got {self.seed}")
        if not 0.0 <= self.fill_wait_s <= 3600.0:
            raise ValueError(f"cohorts.fill_wait_s must be in 0..3600 seconds, got {self.fill_wait_s}")


@dataclass(frozen=True)
class Cohort:
    cohort: str
    number: int
    version: int
    """The version its members are invited to train on."""
    members: tuple[str, ...]
    created: float
    deadline: float
    eligible: int
    """Devices it was sampled from."""


class CohortPlanner:
    """Who is in flight, and the next cohort. Pure: ``now`` and the eligible devices come in."""

    def __init__(
        self,
        cfg: CohortConfig,
        size: int,
        *,
        in_flight: dict[str, tuple[str, float]] | None = None,
        number: int = 0,
        started: float = float("-inf"),
        min_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.min_size = min_size
        """A smaller cohort is never opened (a securely aggregated one needs several members)."""
        self.last_opened = started
        """When the last cohort opened (or the coordinator started)."""
        self.size = max(1, min(size, cfg.concurrency))
        self.in_flight: dict[str, tuple[str, float]] = dict(in_flight or {})
        """device -> (cohort, deadline) of its open invitation."""
        self.number = number
        """Cohorts opened so far."""

    def plan(self, now: float, eligible: Iterable[str], version: int) -> Cohort | None:
        """The next cohort, if slots and devices allow one now: ``size`` members, or every
        eligible device if fewer are (``fill_wait_s`` after the last cohort), once that many
        slots are free."""
        candidates = sorted(set(eligible) - set(self.in_flight))
        k = min(self.size, len(candidates))
        if k == 0 or k < self.min_size or self.cfg.concurrency - len(self.in_flight) < k:
            return None
        if k < self.size and now - self.last_opened < self.cfg.fill_wait_s:
            return None
        number = self.number + 1
        rng = np.random.default_rng([self.cfg.seed, number])
        members = tuple(sorted(candidates[int(i)] for i in rng.choice(len(candidates), size=k, replace=False)))
        return Cohort(f"c{number:08d}", number, version, members, now, now + self.cfg.deadline_s, len(candidates))

    def opened(self, cohort: Cohort) -> None:
        """``cohort`` was recorded: its members are in flight."""
        self.number = max(self.number, cohort.number)
        self.last_opened = cohort.created
        for d in cohort.members:
            self.in_flight[d] = (cohort.cohort, cohort.deadline)

    def check(self, device: str, cohort: str) -> None:
        """Raise ``not_invited`` unless ``device`` has an open invitation for ``cohort``."""
        open_ = self.in_flight.get(device)
        if open_ is None or open_[0] != cohort:
            have = f"its open invitation is for {open_[0]}" if open_ else "it has no open invitation"
            named = f"cohort {cohort!r}" if cohort else "no cohort"
            raise Rejection("not_invited", f"the fleet trains in cohorts; the update names {named}, and {have}")

    def reported(self, device: str) -> None:
        self.in_flight.pop(device, None)

    def expired(self, now: float) -> list[tuple[str, str]]:
        """``(device, cohort)`` of every invitation past its deadline, which frees their slots."""
        late = [(d, c) for d, (c, deadline) in self.in_flight.items() if deadline <= now]
        for d, _c in late:
            del self.in_flight[d]
        return late


def cohort_size(cfg: CohortConfig, strategy_kind: str, buffer_size: int, round_participants: int) -> int:
    """Devices per cohort: ``cfg.size``, else a buffer's worth (a FedAvg round's participants)."""
    if cfg.size:
        return cfg.size
    if strategy_kind == "fedavg":
        return min(round_participants or cfg.concurrency, cfg.concurrency)
    return min(buffer_size, cfg.concurrency)


class Cohorts:
    """The planner, recorded in the coordinator's database (its caller's transaction)."""

    enabled = True

    def __init__(
        self,
        cfg: CohortConfig,
        db: sqlite3.Connection,
        size: int,
        now: float = float("-inf"),
        secure: SecureRounds | None = None,
        dp: DPConfig | None = None,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.budget = CohortBudget(dp, recorded_sampling(db))
        """Central (or distributed) DP: the cohorts' sampling amplifies its ε, and its budget stops them."""
        self.secure = secure
        """The secure-aggregation rounds, when every cohort is securely aggregated."""
        # A securely aggregated cohort's rounds lived in the memory of the process that opened it:
        # one still open now can never be unmasked, so it is abandoned (nothing of it was applied).
        abandoned = db.execute(
            "UPDATE cohort_members SET state='abandoned', ts=? "
            "WHERE state='invited' AND cohort IN (SELECT cohort FROM cohorts WHERE secure=1)",
            (time.time(),),
        ).rowcount
        if abandoned:
            log.warning("%d member(s) of securely aggregated cohorts open before the restart are abandoned", abandoned)
        rows = db.execute(
            "SELECT m.device, m.cohort, c.deadline FROM cohort_members m JOIN cohorts c USING (cohort) WHERE m.state = 'invited'"
        ).fetchall()
        (number,) = db.execute("SELECT COALESCE(MAX(number), 0) FROM cohorts").fetchone()
        in_flight = {r[0]: (r[1], float(r[2])) for r in rows}
        min_size = 3 if secure is not None else 1
        self.planner = CohortPlanner(cfg, size, in_flight=in_flight, number=int(number), started=now, min_size=min_size)
        (dropped,) = db.execute("SELECT COUNT(*) FROM cohort_members WHERE state = 'dropped'").fetchone()
        self.dropouts = int(dropped)
        self.metrics: Metrics | None = None

    def report(self) -> None:
        """Set the cohort gauges of ``/metrics``."""
        if self.metrics is not None:
            self.metrics.cohort_in_flight.set(self.in_flight)
            self.metrics.cohorts_opened.set(self.planner.number)
            self.metrics.cohort_dropouts.set(self.dropouts)
            if self.budget.dp is not None:  # central or distributed DP: the amplified bound, the same for every device
                self.metrics.epsilon_max.set(self.budget.epsilon())

    @property
    def in_flight(self) -> int:
        return len(self.planner.in_flight)

    def status(self) -> dict[str, object]:
        """What the coordinator's status says of its cohorts."""
        out: dict[str, object] = {
            "cohorts_opened": self.planner.number,
            "cohorts_in_flight": self.in_flight,
            "cohort_dropouts": self.dropouts,
        }
        if self.budget.dp is not None:
            out["cohort_epsilon"] = round(self.budget.epsilon(), 4)
        if self.budget.spent:
            out["cohorts_stopped"] = "privacy budget spent"
        return out

    def check(self, device: str, cohort: str) -> None:
        self.planner.check(device, cohort)

    def due(self, now: float, eligible: set[str]) -> bool:
        """Whether :meth:`open_next` has anything to do now (cheap: no transaction otherwise)."""
        p = self.planner
        if any(deadline <= now for _c, deadline in p.in_flight.values()):
            return True
        return len(p.in_flight) < self.cfg.concurrency and any(d not in p.in_flight for d in eligible)

    def reported(self, device: str, cohort: str, now: float) -> None:
        """``device``'s update for ``cohort`` was accepted (recorded in the caller's transaction)."""
        self.db.execute("UPDATE cohort_members SET state='reported', ts=? WHERE cohort=? AND device=?", (now, cohort, device))
        self.planner.reported(device)
        self.report()

    def open_next(self, now: float, eligible: Iterable[str], version: int) -> list[Cohort]:
        """Record the dropouts of ``now``, then every cohort the free slots allow (in the caller's
        transaction). The caller publishes the invitations after the commit."""
        for device, cid in self.planner.expired(now):
            self.db.execute("UPDATE cohort_members SET state='dropped', ts=? WHERE cohort=? AND device=?", (now, cid, device))
            self.dropouts += 1
            log.info("%s is a dropout of cohort %s (no update by the deadline)", device, cid)
        opened = []
        eligible = set(eligible)
        while (cohort := self.planner.plan(now, eligible, version)) is not None:
            if not self.budget.allows(cohort):
                break
            self.budget.opened(cohort)
            self.db.execute(
                "INSERT INTO cohorts (cohort, number, version, created, deadline, eligible, seed, members, secure) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    cohort.cohort,
                    cohort.number,
                    version,
                    now,
                    cohort.deadline,
                    cohort.eligible,
                    self.cfg.seed,
                    json.dumps(cohort.members),
                    int(self.secure is not None),
                ),
            )
            self.db.executemany(
                "INSERT INTO cohort_members (cohort, device, state, ts) VALUES (?, ?, 'invited', ?)",
                [(cohort.cohort, d, now) for d in cohort.members],
            )
            self.planner.opened(cohort)
            eligible -= set(cohort.members)
            opened.append(cohort)
        return opened

    def tick(
        self,
        now: float,
        ready: set[str],
        version: int,
        transaction: Callable[[], AbstractContextManager[None]],
        publish: Callable[[list[CohortInvite]], None],
    ) -> None:
        """Between batches: record the dropouts and open what the free slots allow in one
        transaction, then send the invitations (after the commit, as everything the coordinator
        publishes). A storage fault leaves it all for the next turn."""
        if not self.due(now, ready):
            return
        mark = self.mark()
        try:
            with transaction():
                opened = self.open_next(now, ready, version)
        except (sqlite3.Error, OSError, StoreError) as exc:
            self.restore(*mark)
            log.error("storage error while opening a cohort; retrying: %s", exc)
            return
        for cohort in opened:
            log.info("cohort %s: %d of %d eligible devices invited on v%d", cohort.cohort, len(cohort.members), cohort.eligible, version)
            publish(invitations(cohort, self.secure.params(cohort, now) if self.secure is not None else None))
        self.report()

    def restore(self, in_flight: dict[str, tuple[str, float]], number: int, last_opened: float, dropouts: int, sampled: int) -> None:
        """Undo what a rolled-back transaction did to the planner."""
        p = self.planner
        p.in_flight, p.number, p.last_opened, self.dropouts = dict(in_flight), number, last_opened, dropouts
        self.budget.truncate(sampled)

    def mark(self) -> tuple[dict[str, tuple[str, float]], int, float, int, int]:
        p = self.planner
        return dict(p.in_flight), p.number, p.last_opened, self.dropouts, len(self.budget.sampled)

    def open_invitations(self) -> list[CohortInvite]:
        """Every invitation still open, to send again after a restart (devices act on each once)."""
        rows = self.db.execute(
            "SELECT m.cohort, m.device, c.version, c.deadline, c.created FROM cohort_members m JOIN cohorts c USING (cohort) "
            "WHERE m.state = 'invited' AND c.secure = 0 ORDER BY c.number, m.device"
        ).fetchall()
        return [CohortInvite(r[0], r[1], int(r[2]), float(r[3]), float(r[4])) for r in rows]


class NoCohorts:
    """A fleet that does not train in cohorts: every device trains when it likes."""

    enabled = False
    in_flight = 0
    dropouts = 0

    def check(self, device: str, cohort: str) -> None: ...

    def reported(self, device: str, cohort: str, now: float) -> None: ...

    def tick(self, *args: Any) -> None: ...

    def mark(self) -> tuple[Any, ...]:
        return ()

    def restore(self, *mark: Any) -> None: ...

    def open_invitations(self) -> list[CohortInvite]:
        return []

    def status(self) -> dict[str, object]:
        return {}


def open_cohorts(
    cfg: CoordinatorConfig,
    db: sqlite3.Connection,
    metrics: Metrics | None = None,
    secure: SecureRounds | None = None,
    engine: Engine | None = None,
) -> Cohorts | NoCohorts:
    """The fleet's cohorts (:class:`NoCohorts` when it does not train in cohorts), reporting to
    ``metrics``; with ``secure``, every cohort is securely aggregated. Under central DP, the
    ``engine`` accounts ε with amplification by the cohorts' sampling."""
    if not cfg.cohorts.enabled:
        return NoCohorts()
    s = cfg.strategy
    size = cohort_size(cfg.cohorts, s.kind, s.buffer_size, s.round_participants)
    dp = cfg.dp if cfg.dp.enabled else cfg.secagg.dp if cfg.secagg.enabled else None  # central, or distributed in secure aggregation
    cohorts = Cohorts(cfg.cohorts, db, size, now=time.time(), secure=secure, dp=dp)
    cohorts.metrics = metrics
    cohorts.report()
    if engine is not None and cfg.dp.enabled:
        engine.amplified = cohorts.budget.epsilon
    return cohorts


def invitations(cohort: Cohort, secagg: dict[str, SecAggParams] | None = None) -> list[CohortInvite]:
    return [
        CohortInvite(cohort.cohort, d, cohort.version, cohort.deadline, cohort.created, secagg=secagg[d] if secagg else None)
        for d in cohort.members
    ]
