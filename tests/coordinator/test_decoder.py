"""The decoder process gives exactly what decoding in-process gives, and its loss costs nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compression import CodecConfig, CodecError, FrameKind, compress_dense, compress_update, decode_frame, protocol
from compression.frame import FrameLimits
from compression.protocol import UpdateHeader
from coordinator import decoder as decoder_mod
from coordinator.config import CoordinatorConfig, LimitsConfig
from coordinator.decoder import Decoder
from coordinator.influence import InfluenceTracker
from coordinator.intake import Intake
from coordinator.store import Store

SHAPES = {"a.lora_A.weight": (8, 64), "a.lora_B.weight": (64, 8), "b.lora_A.weight": (8, 64)}


def _frames(n: int) -> list[bytes]:
    rng = np.random.default_rng(n)
    return [
        compress_update({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}, CodecConfig(topk_fraction=0.1)).frame
        for _ in range(n)
    ]


def _same(a: object, b: object) -> None:
    ta, tb = a.tensors, b.tensors  # type: ignore[attr-defined]
    assert a.kind is b.kind and a.sumsq == b.sumsq and list(ta) == list(tb)  # type: ignore[attr-defined]
    for name in ta:
        assert ta[name].shape == tb[name].shape
        np.testing.assert_array_equal(ta[name].indices, tb[name].indices)
        np.testing.assert_array_equal(ta[name].values, tb[name].values)
        assert ta[name].values.dtype == tb[name].values.dtype
        assert (ta[name].indices is None) == (tb[name].indices is None)
        assert ta[name].indices is None or ta[name].indices.dtype == tb[name].indices.dtype


def _outcome(decode: object, frame: bytes, limits: FrameLimits) -> object:
    try:
        return decode(frame, limits)  # type: ignore[operator]
    except CodecError as exc:
        return type(exc), str(exc)


def _started(d: Decoder) -> Decoder:
    d.start()
    deadline = time.monotonic() + 30
    while not d._is_ready():
        assert time.monotonic() < deadline, "the decoder process never said it was ready"
        time.sleep(0.01)
    return d


@pytest.fixture
def dec() -> Decoder:
    d = _started(Decoder())
    yield d
    d.close()


def test_the_child_decodes_exactly_as_the_worker_would_valid_damaged_and_other_frames(
    dec: Decoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    here: list[bytes] = []
    monkeypatch.setattr(decoder_mod, "decode_frame", lambda f, lim: here.append(f) or decode_frame(f, lim))
    limits = FrameLimits.for_shapes(SHAPES, 1 << 20)
    frames = _frames(6)
    damaged = bytearray(frames[1])
    damaged[40] ^= 0xFF  # a checksum error
    snapshot = compress_dense({k: np.ones(s, np.float32) for k, s in SHAPES.items()}, FrameKind.SNAPSHOT)  # not packed: decoded here
    batch = [*frames, bytes(damaged), snapshot, frames[0][:-7]]
    dec.submit(batch, limits)
    for frame in batch:
        got, want = _outcome(dec.decode, frame, limits), _outcome(decode_frame, frame, limits)
        if isinstance(want, tuple):
            assert got == want
        else:
            _same(got, want)
    assert dec._proc is not None and dec._proc.poll() is None
    assert here == [snapshot]  # only the frame that is not of the default codec was decoded in the worker


def test_tighter_limits_than_submitted_are_not_answered_from_the_child(dec: Decoder) -> None:
    frame = _frames(1)[0]
    dec.submit([frame], FrameLimits.for_shapes(SHAPES, 1 << 20))
    with pytest.raises(CodecError, match="above the limit"):
        dec.decode(frame, FrameLimits(max_numel=10))
    dec.submit([frame], FrameLimits.for_shapes(SHAPES, 1 << 20))
    _same(dec.decode(frame, FrameLimits.for_shapes(SHAPES, 1 << 20)), decode_frame(frame))
    assert not dec._replies and not dec._forgotten  # the first answer, asked for by no one, was dropped


def test_what_a_batch_did_not_ask_for_is_dropped_and_the_next_batch_is_answered(dec: Decoder) -> None:
    limits = FrameLimits.for_shapes(SHAPES, 1 << 20)
    first, second = _frames(4), _frames(3)
    dec.submit(first, limits)
    dec.decode(first[0], limits)
    dec.forget()
    dec.submit(second, limits)
    for frame in second:
        _same(dec.decode(frame, limits), decode_frame(frame, limits))
    assert not dec._replies and not dec._sent


def test_a_killed_child_costs_no_update_and_is_replaced_later(dec: Decoder, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = FrameLimits.for_shapes(SHAPES, 1 << 20)
    frames = _frames(3)
    dec.submit(frames[:1], limits)
    _same(dec.decode(frames[0], limits), decode_frame(frames[0], limits))
    assert dec._proc is not None
    os.kill(dec._proc.pid, signal.SIGKILL)
    dec._proc.wait()
    dec.submit(frames[1:], limits)  # it is dead: not sent, decoded in the worker
    for frame in frames[1:]:
        _same(dec.decode(frame, limits), decode_frame(frame, limits))
    assert dec._proc is None
    monkeypatch.setattr(decoder_mod, "RESTART_S", 0.0)
    dec.submit(frames, limits)
    assert dec._proc is not None and not dec._sent  # a new child, not used before it is ready
    for frame in frames:
        _same(dec.decode(frame, limits), decode_frame(frame, limits))
    _started(dec).submit(frames, limits)
    assert len(dec._sent) == 3
    for frame in frames:
        _same(dec.decode(frame, limits), decode_frame(frame, limits))


def test_a_child_that_never_says_it_is_ready_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoder_mod, "CHILD_ARGV", ["sleep", "60"])
    monkeypatch.setattr(decoder_mod, "WAIT_S", 0.3)
    d = Decoder()
    d.start()
    child = d._proc
    limits = FrameLimits.for_shapes(SHAPES, 1 << 20)
    frames = _frames(2)
    try:
        d.submit(frames, limits)
        assert not d._sent  # not ready: each frame is decoded in the worker, at once
        for frame in frames:
            _same(d.decode(frame, limits), decode_frame(frame, limits))
        time.sleep(0.4)
        d.submit(frames, limits)
        assert d._proc is None and not d._sent  # given up on, and killed
        assert child is not None and child.wait(timeout=5) == -signal.SIGKILL
    finally:
        d.close()


def test_a_child_that_stops_answering_is_given_up_on(dec: Decoder, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = FrameLimits.for_shapes(SHAPES, 1 << 20)
    frame = _frames(1)[0]
    dec.submit([frame], limits)
    dec.decode(frame, limits)
    assert dec._proc is not None
    os.kill(dec._proc.pid, signal.SIGSTOP)
    monkeypatch.setattr(decoder_mod, "WAIT_S", 0.5)
    dec.submit([frame], limits)
    _same(dec.decode(frame, limits), decode_frame(frame, limits))  # decoded here after 0.5 s
    assert dec._proc is None  # and the stopped child killed


def test_off_decodes_in_the_worker() -> None:
    d = Decoder(enabled=False)
    frame = _frames(1)[0]
    limits = FrameLimits.for_shapes(SHAPES, 1 << 20)
    d.submit([frame], limits)
    assert d._proc is None
    _same(d.decode(frame, limits), decode_frame(frame, limits))


def test_requests_the_pipe_cannot_take_wait_unsent_and_a_forgotten_batch_leaves_nothing(dec: Decoder) -> None:
    shapes = {"w.lora_A.weight": (512, 512)}
    rng = np.random.default_rng(7)
    frames = [
        compress_update({"w.lora_A.weight": rng.normal(size=(512, 512)).astype(np.float32)}, CodecConfig(topk_fraction=0.5)).frame
        for _ in range(4)
    ]
    limits = FrameLimits.for_shapes(shapes, 1 << 24)
    copies = max(2, (3 << 20) // sum(len(f) for f in frames) + 1)
    first = [bytes(bytearray(f)) for _ in range(copies) for f in frames]  # well over the child's 1 MiB pipe
    assert dec._proc is not None
    os.kill(dec._proc.pid, signal.SIGSTOP)
    dec.submit(first, limits)  # returns at once: what the pipe does not take waits
    assert dec._unsent
    dec.forget()  # the batch ends: its unsent requests are dropped, not sent
    assert len(dec._unsent) <= 1 and len(dec._forgotten) < len(first)
    os.kill(dec._proc.pid, signal.SIGCONT)
    second = [bytes(bytearray(f)) for _ in range(copies) for f in frames]
    dec.submit(second, limits)
    for frame in reversed(second):  # the last one's request is written while the worker waits for it
        _same(dec.decode(frame, limits), decode_frame(frame, limits))
    assert dec._proc is not None and not dec._sent and not dec._unsent
    assert not dec._replies and not dec._forgotten  # every reply of the forgotten batch came and was dropped


def test_the_intake_reads_ahead_for_enrolled_devices_only(tmp_path: Path) -> None:
    store = Store(tmp_path, create=True)
    store.enroll("known", b"\1" * 32)
    intake = Intake(CoordinatorConfig(state_dir=str(tmp_path)), store, InfluenceTracker(LimitsConfig(), [], {}, 0.0))
    _started(intake.decoder)
    frames = _frames(2)
    payloads = []
    for device, frame in zip(("known", "stranger"), frames, strict=True):
        header = UpdateHeader(
            device=device,
            seq=1,
            update_id=device,
            base_version=0,
            num_samples=4,
            timestamp=1.0,
            frame_sha256=hashlib.sha256(frame).hexdigest(),
        )
        payloads.append(protocol.encode_envelope(header, frame))
    try:
        intake.prefetch(payloads, SHAPES)
        assert [f for _, f, _ in intake.decoder._sent.values()] == [frames[0]]  # the stranger's frame is not decoded ahead
        assert intake.envelope(payloads[1]).frame == frames[1]
        intake.done()
        assert not intake.decoder._sent
    finally:
        intake.decoder.close()
        store.close()


_READY = "o.write(struct.pack('<IQ', 9, 0) + b'R'); o.flush()"
_DAMAGED_CHILDREN = {
    # Each says it is ready, waits for a request, then answers it wrongly; and why it is given up on.
    "huge": ("o.write(struct.pack('<I', 1 << 31) + b'K' * 64)", "a reply of 2147483648 bytes"),
    "garbage": ("o.write(struct.pack('<IQ', 14, 1) + b'K' + b'\\xff' * 5)", "a reply is unreadable"),
    "truncated": ("o.write(struct.pack('<IQ', 1000, 1) + b'K'); o.flush(); sys.exit(0)", "its replies ended"),
}


@pytest.mark.parametrize("answer", sorted(_DAMAGED_CHILDREN))
def test_a_child_whose_answer_is_huge_garbage_or_cut_short_is_given_up_on(
    answer: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong, why = _DAMAGED_CHILDREN[answer]
    script = f"import struct, sys, time; o = sys.stdout.buffer; {_READY}; sys.stdin.buffer.read(4); {wrong}; o.flush(); time.sleep(30)"
    monkeypatch.setattr(decoder_mod, "CHILD_ARGV", [sys.executable, "-c", script])
    d = _started(Decoder())
    limits = FrameLimits.for_shapes(SHAPES, 1 << 20)
    frames = _frames(3)
    try:
        d.submit(frames, limits)
        assert len(d._sent) == 3
        for frame in frames:  # the first answer loses the child; every frame is still decoded, here
            _same(d.decode(frame, limits), decode_frame(frame, limits))
        assert d._proc is None and not d._sent and not d._unsent
        assert why in caplog.text
    finally:
        d.close()


def test_a_child_whose_coordinator_is_gone_exits_quietly() -> None:
    """A coordinator killed with -9 leaves its child a broken pipe: it exits 0, with no traceback in the log it shares."""
    proc = subprocess.Popen(decoder_mod.CHILD_ARGV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    proc.stdout.close()  # no one will read its ready message
    err = proc.stderr.read()
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert err == b"", err.decode(errors="replace")
