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
import sqlite3
from typing import TYPE_CHECKING

from coordinator.privacy import DPConfig, amplified_epsilon

if TYPE_CHECKING:
    from coordinator.cohorts import Cohort


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


def cohort_epsilon(dp: DPConfig | None, sampled: list[tuple[int, int]], extra: Cohort | None = None) -> float:
    """ε of any device after the cohorts ``sampled`` (and ``extra``, were it opened); 0 without DP."""
    if dp is None or not dp.enabled:
        return 0.0
    more = [sampling_pool(extra.eligible, len(extra.members))] if extra is not None else []
    return amplified_epsilon(sampled + more, dp.noise_multiplier, dp.delta)


def over_budget(dp: DPConfig | None, sampled: list[tuple[int, int]], cohort: Cohort) -> bool:
    """Whether opening ``cohort`` would take the fleet past its privacy budget (then no cohort opens)."""
    if dp is None or not dp.enabled or dp.epsilon_budget <= 0 or dp.enforce == "off":
        return False
    return cohort_epsilon(dp, sampled, cohort) > dp.epsilon_budget
