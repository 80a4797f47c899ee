"""Central DP over cohorts: the record of their sampling, the ε it amplifies, and the budget that stops them.

Each cohort is ``size`` devices drawn uniformly without replacement from the ``eligible``
ones, seeded and recorded (:mod:`coordinator.cohorts`), and under DP-FedBuff its updates make
one buffer, protected by one Gaussian mechanism. A device's ε is then the composition over
every cohort of that sampled mechanism (:func:`coordinator.privacy.amplified_epsilon`),
whether it was sampled or not: the same bound for every device, since each could have been
sampled in every cohort. What voids the claim is in ``docs/privacy.md``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import TYPE_CHECKING

from coordinator.privacy import DPConfig, amplified_epsilon

if TYPE_CHECKING:
    from coordinator.cohorts import Cohort

log = logging.getLogger(__name__)


def recorded_sampling(db: sqlite3.Connection) -> list[tuple[int, int]]:
    """``(eligible, size)`` of every cohort recorded, in order, the eligible count rounded down (:func:`sampling_pool`)."""
    return [sampling_pool(int(e), len(json.loads(m))) for e, m in db.execute("SELECT eligible, members FROM cohorts ORDER BY number")]


def sampling_pool(eligible: int, size: int) -> tuple[int, int]:
    """``(eligible, size)`` with the eligible count rounded down to two significant digits (at least
    ``size``): a smaller pool means a larger sampling rate, so never less ε, and a fleet's
    cohorts come in few distinct shapes, each one's privacy curve computed once."""
    if eligible >= 100:
        unit = 10 ** (len(str(eligible)) - 2)
        eligible = eligible // unit * unit
    return max(size, eligible), size


class CohortBudget:
    """The sampling of every cohort opened, the ε it gives any device under ``dp`` (None: no DP),
    and whether the budget stopped the cohorts."""

    def __init__(self, dp: DPConfig | None, sampled: list[tuple[int, int]]) -> None:
        self.dp = dp if dp is not None and dp.enabled else None
        self.sampled = sampled
        """``(eligible, size)`` of every cohort opened, the eligible count rounded down (:func:`sampling_pool`)."""
        self.spent = False
        self._epsilon: float | None = None
        """:meth:`epsilon` of :attr:`sampled` as it is (every accepted update asks; it changes only when a cohort opens)."""

    def epsilon(self, extra: Cohort | None = None) -> float:
        """ε of any device so far (with ``extra``, were it opened); 0 without DP."""
        if self.dp is None:
            return 0.0
        if extra is None and self._epsilon is not None:
            return self._epsilon
        more = [sampling_pool(extra.eligible, len(extra.members))] if extra is not None else []
        eps = amplified_epsilon(self.sampled + more, self.dp.noise_multiplier, self.dp.delta)
        if extra is None:
            self._epsilon = eps
        return eps

    def allows(self, cohort: Cohort) -> bool:
        """Whether ``cohort`` may open: not when it would take ε past the budget (then none opens again)."""
        dp = self.dp
        if dp is None or dp.epsilon_budget <= 0 or dp.enforce == "off" or self.epsilon(cohort) <= dp.epsilon_budget:
            return True
        if not self.spent:
            log.warning("no more cohorts: one more would take the fleet's epsilon past its privacy budget %g", dp.epsilon_budget)
        self.spent = True
        return False

    def opened(self, cohort: Cohort) -> None:
        self.sampled.append(sampling_pool(cohort.eligible, len(cohort.members)))
        self._epsilon = None

    def truncate(self, n: int) -> None:
        """Forget the cohorts after the first ``n`` (a rolled-back transaction opened them)."""
        del self.sampled[n:]
        self._epsilon = None
