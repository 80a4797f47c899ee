"""Secure aggregation's rounds, coordinator and devices in memory: the coordinator's
:class:`SecureCohort` against real :class:`DeviceSession` devices, every message encoded,
signed and decoded as on the wire."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compression.keys import ed25519_verifier
from compression.protocol import CohortInvite
from compression.secagg import SecAggError
from compression.secagg_device import DeviceSession
from compression.secagg_wire import DOWN_KINDS, UP_KINDS, SecAggMessage, decode, read_keys_up, unmask_down
from coordinator.cohorts import Cohort
from coordinator.secure import SecureCohort, SecureConfig

FLEET_KEY = Ed25519PrivateKey.generate()
SIZE = 5000


def _verifier(key: Ed25519PrivateKey):  # type: ignore[no-untyped-def]
    return ed25519_verifier(key.public_key())


class Fleet:
    """``n`` devices and one coordinator cohort; messages go through the wire encoding."""

    def __init__(self, n: int, cfg: SecureConfig | None = None, now: float = 1000.0) -> None:
        self.cfg = cfg or SecureConfig(round_s=10.0)
        self.now = now
        names = [f"dev-{i:02d}" for i in range(n)]
        self.cohort = Cohort("c00000001", 1, 0, tuple(names), now, now + 600.0, n)
        self.sc = SecureCohort(self.cfg, self.cohort, SIZE, b"\x07" * 32, now)
        self.keys = {d: Ed25519PrivateKey.generate() for d in names}
        self.sessions = {d: DeviceSession(CohortInvite("c00000001", d, 0, now + 600, now, secagg=self.sc.params(d))) for d in names}
        self.offline: set[str] = set()
        self.offline_after_mask: set[str] = set()
        self.inputs: dict[str, np.ndarray] = {}
        self.sent_int: dict[str, np.ndarray] = {}

    def up(self, device: str, msg: SecAggMessage | None) -> None:
        if msg is None or device in self.offline:
            return
        if msg.kind == "masked" and device in self.offline_after_mask:
            self.offline.add(device)  # its masked input goes out; it answers nothing after it
        wire = msg.encode(self.keys[device].sign)
        decoded = decode(wire, lambda d: _verifier(self.keys[d]), UP_KINDS)
        for out in self.sc.receive(decoded, self.now):
            self.down(out)

    def down(self, msg: SecAggMessage) -> None:
        wire = msg.encode(FLEET_KEY.sign)
        decoded = decode(wire, lambda d: _verifier(FLEET_KEY), DOWN_KINDS)
        if decoded.device not in self.offline:
            self.up(decoded.device, self.sessions[decoded.device].handle(decoded))

    def start(self) -> None:
        for d, s in self.sessions.items():
            self.up(d, s.start())

    def submit(self, rng: np.random.Generator) -> None:
        for d, s in self.sessions.items():
            if d in self.offline:
                continue
            x = rng.normal(0, 0.01, SIZE)
            msg, residual = s.submit(x, np.random.default_rng(len(self.inputs)))
            idx = s.indices(SIZE)
            self.sent_int[d] = np.rint((x[idx] - residual[idx]) * s.quantizer.scale).astype(np.int64)
            self.inputs[d] = x
            self.up(d, msg)

    def tick(self, dt: float) -> None:
        self.now += dt
        for out in self.sc.tick(self.now):
            self.down(out)

    def expected(self, devices: list[str]) -> np.ndarray:
        r = self.sc.quantizer.ring_bits
        return (np.sum([self.sent_int[d] for d in devices], axis=0) % (1 << r)).astype(np.uint32)


def test_the_recovered_sum_equals_the_plain_sum_of_the_quantized_inputs_exactly() -> None:
    f = Fleet(6)
    f.start()
    assert f.sc.phase == "masked" and f.sc.u2 == [1, 2, 3, 4, 5, 6]
    f.submit(np.random.default_rng(0))
    assert f.sc.total is not None, f.sc.failed
    assert np.array_equal(f.sc.ring_sum, f.expected(sorted(f.sessions)))
    assert all(s.phase == "done" for s in f.sessions.values())
    mean = f.sc.mean_step({"a": (SIZE,)})["a"]
    idx = f.sc.indices()
    clip = f.cfg.clip
    want = np.mean([np.clip(x[idx], -clip, clip) for x in f.inputs.values()], axis=0)
    assert np.abs(mean[idx] - want).max() < 2 / f.sc.quantizer.scale
    assert np.count_nonzero(np.delete(mean, idx)) == 0


def test_a_third_dropping_after_the_masked_input_is_recovered_from_the_others() -> None:
    f = Fleet(9)
    f.start()
    everyone = sorted(f.sessions)
    late = set(everyone[:3])
    f.offline_after_mask = late
    f.submit(np.random.default_rng(2))
    assert f.sc.phase == "unmask" and f.sc.u3 == list(range(1, 10))
    f.tick(f.cfg.round_s + 1)  # the three never reveal: the round closes on its deadline with 6 >= t
    assert f.sc.t == 6
    assert f.sc.total is not None, f.sc.failed
    assert np.array_equal(f.sc.ring_sum, f.expected(everyone))


def test_a_third_dropping_before_the_masked_input_leaves_the_survivors_sum() -> None:
    f = Fleet(9)
    f.start()
    gone = sorted(f.sessions)[-3:]
    f.offline |= set(gone)
    f.submit(np.random.default_rng(3))
    assert f.sc.phase == "masked"
    f.tick(600.0 - 2 * f.cfg.round_s)  # the masked round closes; the unmasking goes to the six
    assert f.sc.u3 == list(range(1, 7)) and f.sc.total is not None, f.sc.failed
    assert np.array_equal(f.sc.ring_sum, f.expected(sorted(f.sessions)[:6]))
    assert f.sc.survivors == sorted(f.sessions)[:6]


def test_too_few_members_fail_the_cohort_and_nothing_is_recovered() -> None:
    f = Fleet(6)
    f.offline |= set(sorted(f.sessions)[:3])
    f.start()
    assert f.sc.phase == "keys"
    f.tick(f.cfg.round_s + 1)
    assert f.sc.failed and "fewer than the threshold" in f.sc.failed and f.sc.total is None


def test_a_device_refuses_a_coordinator_that_asks_for_both_shares_of_one_member() -> None:
    f = Fleet(4)
    f.start()
    # The coordinator deviates: it names member 4 both a survivor and a dropout.
    f.sc.receive = lambda msg, now: []  # type: ignore[method-assign]  # swallow the masked inputs
    f.submit(np.random.default_rng(4))
    s = f.sessions["dev-00"]
    answer = s.handle(unmask_down("c00000001", "dev-00", [1, 2, 3, 4], [4]))
    assert answer is not None and answer.kind == "refuse" and "both shares" in answer.fields["why"]
    assert s.phase == "refused" and s.client.revealed == {}
    with pytest.raises(SecAggError, match="does not fit"):
        s.handle(unmask_down("c00000001", "dev-00", [1, 2, 3], [4]))  # no second chance after a refusal


def test_a_redelivered_message_is_ignored_and_changes_nothing() -> None:
    f = Fleet(4)
    first = f.sessions["dev-00"].start()
    assert f.sc.receive(first, f.now) == [] and f.sc.keys[1].index == 1
    again = f.sessions["dev-00"].start()  # another keys message of the same member, in the same round
    assert f.sc.receive(again, f.now) == [] and f.sc.keys[1] == read_keys_up(first, 4)
    f.start()  # the others join; the rounds go on as if the redelivery never came
    f.submit(np.random.default_rng(5))
    assert f.sc.total is not None, f.sc.failed


def test_messages_out_of_turn_forged_or_from_outsiders_are_refused() -> None:
    f = Fleet(4)
    keys = f.sessions["dev-00"].start()
    outsider = replace(keys, device="mallory")
    with pytest.raises(SecAggError, match="not a member"):
        f.sc.receive(outsider, f.now)
    wire = bytearray(keys.encode(f.keys["dev-00"].sign))
    wire[-70] ^= 1
    with pytest.raises(SecAggError, match="does not verify|not JSON"):
        decode(bytes(wire), lambda d: _verifier(f.keys[d]), UP_KINDS)
    with pytest.raises(SecAggError, match="claims"):
        decode(bytes(wire[:-1]), lambda d: _verifier(f.keys[d]), UP_KINDS)
    wrong = replace(keys, fields={**keys.fields, "position": 3})
    with pytest.raises(SecAggError, match="its keys say 3"):
        f.sc.receive(wrong, f.now)
    with pytest.raises(SecAggError, match="does not fit"):
        f.sessions["dev-01"].handle(unmask_down("c00000001", "dev-01", [1, 2, 3], []))


def test_a_restart_abandons_the_secure_cohorts_it_had_open_and_never_resends_them() -> None:
    """The rounds live in the memory of the coordinator that opened the cohort: after a kill -9,
    nothing of an open secure cohort can be unmasked, so its members are abandoned, their slots
    free, and its invitations are not sent again (a plain cohort's are)."""
    import sqlite3

    from coordinator.cohorts import CohortConfig, Cohorts
    from coordinator.schema import create_or_migrate
    from coordinator.secure import SecureRounds

    db = sqlite3.connect(":memory:", isolation_level=None)
    create_or_migrate(db)
    cfg = CohortConfig(enabled=True, concurrency=6, size=3, deadline_s=300.0)
    secure = SecureRounds(SecureConfig(enabled=True), "f", {"a": (100,)}, lambda d: None, FLEET_KEY.sign, lambda t, p: None)
    cohorts = Cohorts(cfg, db, 3, secure=secure)
    published: list[CohortInvite] = []
    cohorts.tick(1000.0, {f"d{i}" for i in range(6)}, 0, _no_transaction, published.extend)
    assert len(published) == 6 and all(i.secagg is not None for i in published)
    assert {i.secagg.position for i in published if i.secagg} == {1, 2, 3} and len(secure.open) == 2
    assert cohorts.open_invitations() == []  # a reconnect does not resend them: their rounds are in memory
    again = Cohorts(cfg, db, 3, secure=SecureRounds(SecureConfig(enabled=True), "f", {"a": (100,)}, lambda d: None, FLEET_KEY.sign, print))
    assert again.in_flight == 0
    states = dict(db.execute("SELECT state, COUNT(*) FROM cohort_members GROUP BY state").fetchall())
    assert states == {"abandoned": 6}
    assert not db.execute("SELECT 1 FROM ledger").fetchall()  # nothing of them was applied


def test_a_secure_cohort_never_opens_with_fewer_than_three_members() -> None:
    import sqlite3

    from coordinator.cohorts import CohortConfig, Cohorts
    from coordinator.schema import create_or_migrate
    from coordinator.secure import SecureRounds

    db = sqlite3.connect(":memory:", isolation_level=None)
    create_or_migrate(db)
    secure = SecureRounds(SecureConfig(enabled=True), "f", {"a": (100,)}, lambda d: None, FLEET_KEY.sign, lambda t, p: None)
    cohorts = Cohorts(CohortConfig(enabled=True, concurrency=6, size=4, fill_wait_s=0.0), db, 4, secure=secure)
    assert cohorts.open_next(1000.0, {"d0", "d1"}, 0) == []
    assert [len(c.members) for c in cohorts.open_next(1001.0, {"d0", "d1", "d2"}, 0)] == [3]


def test_secure_aggregation_config_is_checked() -> None:
    from coordinator.cohorts import CohortConfig
    from coordinator.config import CoordinatorConfig, LimitsConfig
    from coordinator.errors import ConfigError
    from coordinator.privacy import DPConfig
    from coordinator.strategy import StrategyConfig

    on = SecureConfig(enabled=True, round_s=10.0)
    cohorts = CohortConfig(enabled=True, concurrency=10, size=10, deadline_s=60.0)
    CoordinatorConfig(state_dir="s", cohorts=cohorts, secagg=on)
    with pytest.raises(ConfigError, match="needs cohorts.enabled"):
        CoordinatorConfig(state_dir="s", secagg=on)
    with pytest.raises(ConfigError, match="cohorts.size set"):
        CoordinatorConfig(state_dir="s", cohorts=replace(cohorts, size=2), secagg=on)
    with pytest.raises(ConfigError, match="deadline_s >= 5"):
        CoordinatorConfig(state_dir="s", cohorts=replace(cohorts, deadline_s=40.0), secagg=on)
    with pytest.raises(ConfigError, match="central DP"):
        CoordinatorConfig(state_dir="s", cohorts=cohorts, secagg=on, strategy=StrategyConfig(kind="fedbuff"), dp=DPConfig(enabled=True))
    with pytest.raises(ConfigError, match="enrolled and signing"):
        CoordinatorConfig(state_dir="s", cohorts=cohorts, secagg=on, limits=LimitsConfig(allow_unknown_devices=True))
    with pytest.raises(ValueError, match="threshold"):
        SecureConfig(threshold=0.4)


def test_invitations_without_secagg_are_byte_for_byte_what_they_were() -> None:
    plain = CohortInvite("c00000001", "d1", 3, 200.0, 100.0)
    assert b"secagg" not in plain.to_json()
    f = Fleet(3)
    secure = CohortInvite("c00000001", "dev-00", 0, 200.0, 100.0, secagg=f.sc.params("dev-00")).signed(FLEET_KEY.sign)
    back = CohortInvite.from_json(secure.to_json(), _verifier(FLEET_KEY))
    assert back == secure and back.secagg is not None and back.secagg.t == 2
    with pytest.raises(Exception, match="secagg"):
        CohortInvite.from_json(secure.to_json().replace(b'"t":2', b'"t":9'))


def _no_transaction():  # type: ignore[no-untyped-def]
    from contextlib import nullcontext

    return nullcontext()


def _noise_only(f: Fleet, members: list[str]) -> np.ndarray:
    """Every member in ``members`` submits a zero update: the recovered sum is the noise alone."""
    for d in members:
        msg, _residual = f.sessions[d].submit(np.zeros(SIZE), np.random.default_rng(1), np.random.default_rng(hash(d) % 2**32))
        f.up(d, msg)
    return f.sc.ring_sum  # type: ignore[return-value]


def _signed(ring: np.ndarray, r: int) -> np.ndarray:
    v = ring.astype(np.int64) & ((1 << r) - 1)
    return np.where(v >= 1 << (r - 1), v - (1 << r), v)


@pytest.mark.parametrize("survivors", [10, 6])
def test_the_distributed_noise_on_the_recovered_sum_has_the_target_variance(survivors: int) -> None:
    """Each member adds Skellam noise scaled so that any t survivors carry the target variance
    ``(z * sensitivity)^2``; with all n, n/t times it. Checked within sampling error: the sample
    variance of k = 5000 draws has a relative standard deviation of sqrt(2/k) = 2%."""
    from coordinator.secure import sensitivity

    cfg = SecureConfig(round_s=10.0, fraction=1.0, bits=10, noise_multiplier=1.0, l2_clip=0.01, threshold=0.6)
    f = Fleet(10, cfg)
    assert f.sc.t == 6 and f.sc.mu > 0
    gone = sorted(f.sessions)[survivors:]
    f.offline |= set(gone)
    f.start()
    total = _noise_only(f, sorted(f.sessions)[:survivors]) if survivors == 10 else None
    if total is None:
        _noise_only(f, sorted(f.sessions)[:survivors])
        f.tick(600.0 - 2 * cfg.round_s)
        total = f.sc.ring_sum
    assert total is not None and f.sc.u3 == list(range(1, survivors + 1))
    noise = _signed(total, f.sc.quantizer.ring_bits).astype(np.float64)
    target = (cfg.noise_multiplier * sensitivity(cfg, 10, f.sc.k)) ** 2
    expected = target * survivors / f.sc.t
    assert abs(noise.var() / expected - 1) < 4 * np.sqrt(2 / noise.size), (noise.var(), expected)
    assert abs(noise.mean()) < 4 * np.sqrt(expected / noise.size)
    # The ring holds the noised sum: nothing wrapped (12 standard deviations of headroom at n).
    assert np.abs(noise).max() < 2 ** (f.sc.quantizer.ring_bits - 1) / 2


def test_under_distributed_dp_a_member_clips_its_values_in_l2_and_keeps_the_noise_out_of_its_residual() -> None:
    cfg = SecureConfig(round_s=10.0, fraction=1.0, bits=10, noise_multiplier=1.0, l2_clip=0.01)
    f = Fleet(3, cfg)
    f.start()
    s = f.sessions["dev-00"]
    x = np.full(SIZE, 0.001)  # L2 norm 0.0707: clipped to 0.01
    _msg, residual = s.submit(x, np.random.default_rng(0), np.random.default_rng(1))
    sent = x - residual
    # Clipped to 0.01 before rounding; the rounding moves each value by less than one step, which
    # is what the sensitivity bound adds (sqrt(k) steps).
    assert 0.009 < np.linalg.norm(sent) <= 0.01 + np.sqrt(SIZE) / s.quantizer.scale
    assert np.abs(sent).max() < 0.001  # what was clipped off stays in the residual, and no noise is in it
