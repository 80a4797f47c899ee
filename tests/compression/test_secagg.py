"""Secure aggregation's cryptographic core: exact recovery, dropouts, refusals, and masks that
look uniform."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.secagg import MaskingClient, Quantizer, SecAggError, Shamir, pack, prg, shared_indices, unmask, unpack

COHORT = b"c00000007"


def _cohort(n: int, t: int) -> tuple[list[MaskingClient], dict]:
    clients = [MaskingClient(COHORT, i, n, t) for i in range(1, n + 1)]
    keys = [c.keys() for c in clients]
    sealed = [m for c in clients for m in c.share(keys)]
    for c in clients:
        c.receive([m for m in sealed if m.receiver == c.index])
    return clients, {k.index: k for k in keys}


def _run(n: int, t: int, inputs: list[np.ndarray], drop_after_shares: set[int]) -> tuple[np.ndarray, list[int]]:
    clients, keys = _cohort(n, t)
    masked = {c.index: c.mask(x) for c, x in zip(clients, inputs, strict=True) if c.index not in drop_after_shares}
    survivors = sorted(masked)
    dropped = sorted(set(keys) - set(masked))
    reveals = [c.reveal(survivors, dropped) for c in clients if c.index in masked]
    return unmask(COHORT, t, keys, masked, reveals, inputs[0].size), survivors


def test_the_recovered_sum_is_the_plain_sum_of_the_quantized_inputs_exactly() -> None:
    rng = np.random.default_rng(0)
    q = Quantizer(clip=1.0, cohort=6)
    floats = [rng.normal(0, 0.3, 500) for _ in range(6)]
    inputs = [q.encode(x, rng) for x in floats]
    total, survivors = _run(6, 4, inputs, set())
    assert survivors == [1, 2, 3, 4, 5, 6]
    plain = np.zeros(500, np.uint32)
    for x in inputs:
        plain += x
    np.testing.assert_array_equal(total, plain)
    np.testing.assert_allclose(q.decode_sum(total), sum(np.clip(x, -1.0, 1.0) for x in floats), atol=6 / q.scale + 1e-9)


def test_a_third_of_the_cohort_dropping_after_the_shares_still_gives_the_survivors_sum() -> None:
    rng = np.random.default_rng(1)
    q = Quantizer(clip=0.5, cohort=9)
    inputs = [q.encode(rng.uniform(-0.5, 0.5, 300), rng) for _ in range(9)]
    total, survivors = _run(9, 5, inputs, drop_after_shares={2, 5, 9})
    plain = np.zeros(300, np.uint32)
    for i in survivors:
        plain += inputs[i - 1]
    np.testing.assert_array_equal(total, plain)


def test_too_many_dropouts_recover_nothing() -> None:
    rng = np.random.default_rng(2)
    inputs = [rng.integers(0, 1 << 20, 50).astype(np.uint32) for _ in range(5)]
    with pytest.raises(SecAggError, match="threshold"):
        _run(5, 4, inputs, drop_after_shares={1, 2})


def test_an_honest_device_refuses_to_reveal_both_shares_of_one_device() -> None:
    clients, keys = _cohort(4, 3)
    for c in clients:
        c.mask(np.zeros(10, np.uint32))
    with pytest.raises(SecAggError, match="both shares"):
        clients[0].reveal([1, 2, 3], [3, 4])
    clients[0].reveal([1, 2, 3], [4])
    with pytest.raises(SecAggError, match="already revealed"):
        clients[0].reveal([1, 2, 4], [3])  # the coordinator comes back for device 3's mask key
    with pytest.raises(SecAggError, match="cannot be named a dropout"):
        clients[1].reveal([1, 3, 4], [2])


def test_a_forged_or_misrouted_share_is_refused() -> None:
    clients = [MaskingClient(COHORT, i, 3, 2) for i in (1, 2, 3)]
    keys = [c.keys() for c in clients]
    sealed = [m for c in clients for m in c.share(keys)]
    to_2 = [m for m in sealed if m.receiver == 2]
    forged = to_2[0].__class__(to_2[0].sender, 2, to_2[0].nonce, bytes(b ^ 1 for b in to_2[0].box))
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[1].receive([forged])
    with pytest.raises(SecAggError, match="not for this device"):
        clients[1].receive([m for m in sealed if m.receiver == 3][:1])
    with pytest.raises(SecAggError, match="each device once"):
        clients[0].share(keys + keys[:1])


def test_one_devices_masked_vector_is_indistinguishable_from_uniform() -> None:
    clients, _keys = _cohort(5, 3)
    # A very non-uniform input: all zeros. Its masked form must not show it.
    y = clients[0].mask(np.zeros(200_000, np.uint32))
    counts = np.bincount((y >> np.uint32(24)).astype(np.int64), minlength=256)  # top byte, 256 bins
    expected = y.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: the 99.9th percentile is about 330.5.
    assert chi2 < 330.5, chi2
    low = np.bincount((y & np.uint32(0xFF)).astype(np.int64), minlength=256)
    assert float(((low - expected) ** 2 / expected).sum()) < 330.5


def test_the_prg_takes_a_32_byte_seed_and_bounds_its_output() -> None:
    a = prg(b"\x01" * 32, 1000)
    assert a.dtype == np.uint32 and a.size == 1000 and np.array_equal(a, prg(b"\x01" * 32, 1000))
    assert not np.array_equal(a, prg(b"\x02" * 32, 1000))
    with pytest.raises(SecAggError, match="32 bytes"):
        prg(b"\x01" * 4, 10)
    with pytest.raises(SecAggError, match="out of bounds"):
        prg(b"\x01" * 32, 1 << 40)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 12), st.data())
def test_any_t_shares_recover_the_secret_and_fewer_do_not(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = Shamir.split(secret, n, t)
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True))
    assert Shamir.combine({x: shares[x] for x in subset}, t) == secret
    if t > 1:
        with pytest.raises(SecAggError, match="cannot recover"):
            Shamir.combine({x: shares[x] for x in subset[: t - 1]}, t)


def test_the_quantized_sum_of_a_full_cohort_cannot_wrap() -> None:
    for k in (2, 10, 50, 100, 1000):
        q = Quantizer(clip=1.0, cohort=k)
        worst = np.int64(k) * ((1 << (q.value_bits - 1)) - 1)
        assert worst <= (1 << 31) - 1 and q.ring_bits == 32
        rng = np.random.default_rng(k)
        enc = [q.encode(np.full(4, 1.0), rng) for _ in range(k)]
        total = np.zeros(4, np.uint32)
        for e in enc:
            total += e
        np.testing.assert_allclose(q.decode_sum(total), k, rtol=1e-6)
        neg = np.zeros(4, np.uint32)
        for _ in range(k):
            neg += q.encode(np.full(4, -1.0), rng)
        np.testing.assert_allclose(q.decode_sum(neg), -k, rtol=1e-6)


def test_stochastic_rounding_is_unbiased() -> None:
    q = Quantizer(clip=1.0, cohort=1000)
    x = np.full(200_000, 0.3 / q.scale)  # a third of a unit: always rounds to 0 or 1
    mean = q.encode(x, np.random.default_rng(3)).view(np.int32).mean()
    assert mean == pytest.approx(0.3, abs=0.01)


def test_every_device_of_a_cohort_draws_the_same_shared_coordinates() -> None:
    a = shared_indices(b"seed-1", 10_000, 300)
    assert np.array_equal(a, shared_indices(b"seed-1", 10_000, 300)) and len(np.unique(a)) == 300
    assert not np.array_equal(a, shared_indices(b"seed-2", 10_000, 300))
    with pytest.raises(SecAggError):
        shared_indices(b"s", 10, 11)


@pytest.mark.parametrize(("k", "bits"), [(10, 8), (100, 8), (100, 12), (50, 0)])
def test_a_narrow_ring_sums_exactly_and_packs_to_its_bits(k: int, bits: int) -> None:
    q = Quantizer(clip=1.0, cohort=k, bits=bits)
    assert q.ring_bits <= 32 and k * ((1 << (q.value_bits - 1)) - 1) < 1 << (q.ring_bits - 1)
    rng = np.random.default_rng(k + bits)
    n = min(k, 12)
    q = Quantizer(clip=1.0, cohort=n, bits=bits if bits <= 32 - 4 else 0)
    floats = [rng.uniform(-1, 1, 257) for _ in range(n)]
    inputs = [q.encode(x, rng) for x in floats]
    clients, keys = _cohort(n, max(1, n // 2 + 1))
    masked = {c.index: unpack(pack(c.mask(x, q.ring_bits), q.ring_bits), q.ring_bits, 257) for c, x in zip(clients, inputs, strict=True)}
    assert len(pack(masked[1], q.ring_bits)) == (257 * q.ring_bits + 7) // 8
    reveals = [c.reveal(sorted(masked), []) for c in clients]
    total = unmask(COHORT, max(1, n // 2 + 1), keys, masked, reveals, 257, q.ring_bits)
    expect = sum(x.view(np.int32).astype(np.int64) for x in inputs)
    np.testing.assert_array_equal(np.round(q.decode_sum(total) * q.scale).astype(np.int64), expect)
    with pytest.raises(SecAggError, match="do not fit"):
        Quantizer(clip=1.0, cohort=k, bits=33 - int(np.ceil(np.log2(k))))
