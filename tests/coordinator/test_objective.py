"""The simulated devices' objective: normalisation, the optimum, and the closed-form local steps."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.errors import ConfigError
from fedge_lab.objective import ObjectiveConfig, SimObjective

V0 = {"b": np.zeros((16, 8), np.float32), "a": np.linspace(-0.1, 0.1, 96, dtype=np.float32).reshape(8, 12)}


def test_loss_is_one_at_version_zero_and_optimum_at_the_mean_target() -> None:
    obj = SimObjective(ObjectiveConfig(domains=4), V0)
    assert obj.loss(V0) == pytest.approx(1.0, rel=1e-5)
    mean = obj.unflatten(obj.targets.mean(axis=0))
    assert obj.loss(mean) == pytest.approx(obj.optimum)
    # Any one domain's target is worse for the union than the mean target: the reason to federate.
    for g in range(4):
        assert obj.loss(obj.unflatten(obj.targets[g])) > obj.optimum
    # ~ (1 - shared) * (1 - 1/domains) for the default shared fraction of 0.8
    assert 0.05 < obj.optimum < 0.3


def test_layout_round_trips_and_names_are_sorted() -> None:
    obj = SimObjective(ObjectiveConfig(), V0)
    assert obj.names == ["a", "b"]
    back = obj.unflatten(obj.flatten(V0))
    assert all(np.array_equal(back[n], V0[n]) for n in V0)
    with pytest.raises(ConfigError, match="lacks tensors"):
        obj.flatten({"a": V0["a"]})


def test_same_seed_same_problem_other_seed_other_problem() -> None:
    a, b, c = (SimObjective(ObjectiveConfig(seed=s), V0) for s in (1, 1, 2))
    assert np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.targets, c.targets)


def test_closed_form_steps_match_explicit_noisy_steps_in_mean_and_spread() -> None:
    cfg = ObjectiveConfig(domains=2, lr=0.2, local_steps=4, noise=1.0)
    obj = SimObjective(cfg, V0)
    n = 4000
    closed = np.stack([obj.flatten(obj.local_update(V0, 1, np.random.default_rng(i))) for i in range(n)])
    explicit = []
    start = obj.flatten(V0)
    for i in range(n):
        rng = np.random.default_rng(10_000 + i)
        theta = start.copy()
        for _ in range(cfg.local_steps):
            noise = cfg.noise * cfg.scale * obj.magnitude * rng.standard_normal(theta.size).astype(np.float32)
            theta -= cfg.lr * ((theta - obj.targets[1]) + noise)
        explicit.append(theta - start)
    ex = np.stack(explicit)
    sd = ex.std(axis=0)
    assert np.all(np.abs(closed.mean(axis=0) - ex.mean(axis=0)) < 6 * sd / np.sqrt(n) + 1e-7)
    np.testing.assert_allclose(closed.std(axis=0), sd, rtol=0.12)


@given(st.integers(0, 3), st.integers(0, 2**31))
def test_a_noiseless_update_moves_toward_the_domain_target(domain: int, seed: int) -> None:
    obj = SimObjective(ObjectiveConfig(domains=4, noise=0.0), V0)
    delta = obj.local_update(V0, domain, np.random.default_rng(seed))
    after = {n: V0[n] + delta[n] for n in V0}
    assert obj.domain_loss(after, domain) == pytest.approx((1 - obj.cfg.lr) ** (2 * obj.cfg.local_steps) * obj.domain_loss(V0, domain))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"domains": 0}, "domains"),
        ({"shared": 1.5}, "shared"),
        ({"lr": 0.0}, "lr"),
        ({"local_steps": 0}, "local_steps"),
        ({"scale": -1.0}, "scale"),
    ],
)
def test_bad_objective_configs_name_the_key(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ObjectiveConfig(**kwargs)  # type: ignore[arg-type]
