"""The one rule for following global versions: delta chains, the snapshot, digests, bounds, any arrival order."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import CodecConfig, FrameKind, apply_delta, compress_dense, compress_update, state_digest
from compression.follower import Follower
from compression.protocol import GlobalMeta

LOSSLESS = CodecConfig(topk_fraction=1.0, values="fp32", error_feedback=False)


def _chain(n: int, seed: int = 0) -> list[tuple[GlobalMeta, bytes | None, bytes]]:
    """``n`` versions after version 0: (meta, delta frame, snapshot frame) each; version 0 has no delta."""
    rng = np.random.default_rng(seed)
    state = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(5, np.float32)}
    out = []
    for v in range(n + 1):
        delta_frame = None
        if v > 0:
            step = {"a": rng.normal(size=(3, 4)).astype(np.float32) * 0.1, "b": rng.normal(size=5).astype(np.float32)}
            delta_frame = compress_update(step, LOSSLESS, kind=FrameKind.GLOBAL_DELTA).frame
            state = apply_delta(state, compress_update(step, LOSSLESS, kind=FrameKind.GLOBAL_DELTA).sent)
        snap = compress_dense(state, FrameKind.SNAPSHOT)
        meta = GlobalMeta(
            version=v,
            snapshot_sha256=hashlib.sha256(snap).hexdigest(),
            snapshot_bytes=len(snap),
            created=0.0,
            state_sha256=state_digest(state),
            delta_base_version=v - 1 if v > 0 else None,
            delta_sha256=hashlib.sha256(delta_frame).hexdigest() if delta_frame else None,
            delta_bytes=len(delta_frame) if delta_frame else None,
        )
        out.append((meta, delta_frame, snap))
    return out


def test_it_takes_the_snapshot_first_then_follows_the_delta_chain() -> None:
    chain = _chain(3)
    f = Follower()
    meta0, _, snap0 = chain[0]
    f.add_meta(meta0)
    assert f.follow().behind  # nothing held, no snapshot yet
    f.add_snapshot(snap0)
    r = f.follow()
    assert r.moved and r.via_snapshot and r.version == 0 and not r.behind
    for meta, delta, _snap in chain[1:]:
        f.add_delta(delta)  # type: ignore[arg-type]
        f.add_meta(meta)
    r = f.follow()
    assert r.moved and not r.via_snapshot and r.deltas_applied == 3 and r.version == 3
    assert state_digest(f.tensors) == chain[3][0].state_sha256


def test_a_broken_chain_falls_back_to_the_snapshot() -> None:
    chain = _chain(3)
    f = Follower()
    f.add_meta(chain[0][0])
    f.add_snapshot(chain[0][2])
    f.follow()
    f.add_delta(chain[1][1])  # type: ignore[arg-type]
    for meta, _, _ in chain[1:]:
        f.add_meta(meta)  # the delta to v2 never arrives
    r = f.follow()
    assert r.version == 1 and r.behind
    f.add_snapshot(chain[3][2])
    r = f.follow()
    assert r.version == 3 and r.via_snapshot and not r.behind


def test_a_corrupt_delta_or_snapshot_is_named_and_never_adopted() -> None:
    chain = _chain(1)
    f = Follower()
    f.add_meta(chain[0][0])
    f.add_snapshot(chain[0][2][:-3] + b"xyz")
    r = f.follow()
    assert r.version is None and r.behind  # the sha256 differs: it waits for the snapshot the meta names
    f.add_snapshot(chain[0][2])
    f.follow()
    bad = bytearray(chain[1][1])  # type: ignore[arg-type]
    bad[-1] ^= 0xFF
    meta1 = chain[1][0]
    f.add_meta(GlobalMeta(**{**meta1.__dict__, "delta_sha256": hashlib.sha256(bytes(bad)).hexdigest()}))
    f.add_delta(bytes(bad))
    r = f.follow()
    assert r.version == 0 and r.behind and r.problems and "v1" in r.problems[0]


def test_a_delta_that_does_not_reach_the_digest_is_refused() -> None:
    chain = _chain(1)
    f = Follower()
    f.add_meta(chain[0][0])
    f.add_snapshot(chain[0][2])
    f.follow()
    f.add_meta(GlobalMeta(**{**chain[1][0].__dict__, "state_sha256": "0" * 64}))
    f.add_delta(chain[1][1])  # type: ignore[arg-type]
    r = f.follow()
    assert r.version == 0 and "does not match" in r.problems[0]


def test_vet_can_refuse_a_snapshot() -> None:
    chain = _chain(0)
    f = Follower()
    f.add_meta(chain[0][0])
    f.add_snapshot(chain[0][2])

    def refuse(meta: GlobalMeta, tensors: dict[str, np.ndarray]) -> None:
        raise RuntimeError(f"cannot train v{meta.version}")

    with pytest.raises(RuntimeError, match="cannot train v0"):
        f.follow(vet=refuse)
    assert f.version is None


def test_what_it_keeps_is_bounded() -> None:
    f = Follower(keep=4)
    for i in range(20):
        f.add_delta(bytes([i]) * 10)
        f.add_meta(GlobalMeta(version=i, snapshot_sha256="0" * 64, snapshot_bytes=1, created=0.0))
    assert len(f.metas) == 4 and len(f._deltas) == 4 and max(f.metas) == 19


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(9))), st.integers(0, 2**16))
def test_any_arrival_order_ends_at_the_newest_version_exactly(order: list[int], seed: int) -> None:
    chain = _chain(2, seed)
    items: list[tuple[str, object]] = []
    for meta, delta, snap in chain:
        items += [("meta", meta), ("delta", delta), ("snap", snap)]
    f = Follower()
    for i in order:
        kind, obj = items[i]
        if obj is None:
            continue
        getattr(f, {"meta": "add_meta", "delta": "add_delta", "snap": "add_snapshot"}[kind])(obj)
        f.follow()
    # The broker keeps the newest retained snapshot: after everything arrived, it is re-delivered.
    f.add_snapshot(chain[-1][2])
    f.follow()
    assert f.version == 2 and state_digest(f.tensors) == chain[-1][0].state_sha256


def test_a_delta_that_spans_versions_is_followed() -> None:
    """The coordinator publishes the versions one batch made as one delta from the last version it
    published: v3's delta applies to v1, and v2 is never seen."""
    chain = _chain(1)
    meta0, _, snap0 = chain[0]
    rng = np.random.default_rng(7)
    f = Follower()
    f.add_meta(meta0)
    f.add_snapshot(snap0)
    f.follow()
    f.add_meta(chain[1][0])
    f.add_delta(chain[1][1])  # type: ignore[arg-type]
    assert f.follow().version == 1
    step = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    down = compress_update(step, LOSSLESS, kind=FrameKind.GLOBAL_DELTA)
    state = apply_delta(f.tensors, down.sent)
    snap = compress_dense(state, FrameKind.SNAPSHOT)
    meta3 = GlobalMeta(
        version=3,
        snapshot_sha256=hashlib.sha256(snap).hexdigest(),
        snapshot_bytes=len(snap),
        created=0.0,
        state_sha256=state_digest(state),
        delta_base_version=1,
        delta_sha256=hashlib.sha256(down.frame).hexdigest(),
        delta_bytes=len(down.frame),
    )
    f.add_meta(meta3)
    f.add_delta(down.frame)
    r = f.follow()
    assert r.version == 3 and r.deltas_applied == 1 and not r.via_snapshot and not r.behind
    assert state_digest(f.tensors) == meta3.state_sha256
