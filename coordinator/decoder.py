"""Update frames decoded in a child process, ahead of the worker that validates them.

The coordinator's worker is one Python thread, and decoding a default-codec update is a third
of its work. With ``decoder_process = true`` (the default) the service hands each batch's
frames to a child (``python -m coordinator.decoder``) as the batch is taken, and the worker
finds them decoded, on the machine's other core, when validation reaches them.

The child runs :func:`~compression.frame.decode_frame`, the same decoder, under the limits the
worker gives: the result, or the error, is exactly what decoding in-process gives. Nothing
is pickled: requests and replies are length-prefixed bytes on the child's stdin and stdout.
Only frames that decode into one packed set of arrays (every record of the default codec)
come back; any other, and every frame while the child is down, is decoded in-process. The child
starts with the service and is used once it says it is ready (no batch waits for its imports);
one that dies or stops answering is replaced at the next batch, at most once every 30 s.

Request (written as the pipe takes it, never waiting): ``u32 length | u64 id | 5 × u64 limits |
frame``. Reply: ``u32 length | u64 id | tag``; the first is ``R`` (ready), with id 0. Then, for
``K`` (decoded): ``u8 kind | f64 sumsq | u32 records | u32 table | u32 json length | json (names
and shapes, only the first time a table is sent) | bounds (u64 each) | indices (u32 each) |
values (f32 each)``; for ``E`` (refused): the error's class and message; for ``U``: decode it yourself.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import select
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import astuple, dataclass
from typing import IO, Any

import numpy as np

from compression import errors
from compression.frame import Frame, FrameKind, FrameLimits, NonFiniteError, Packed, Tensors, decode_frame

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_REQ = struct.Struct("<Q5Q")
_ID = struct.Struct("<Qc")
_RID = struct.Struct("<Q")
_OK = struct.Struct("<BdIII")
WAIT_S = 5.0
"""Longest wait for one reply before the child is given up on."""
RESTART_S = 30.0
CHILD_ARGV = [sys.executable, "-m", "coordinator.decoder"]
PIPE_BYTES = 1 << 20
MAX_REPLY = 1 << 30
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, struct.error)  # reading a reply: each only loses the child
_ERRORS: dict[str, type[errors.CodecError]] = {
    c.__name__: c for c in (errors.CodecError, errors.FrameError, errors.ChecksumError, errors.LimitError, NonFiniteError)
}


@dataclass(frozen=True)
class _Table:
    """A record table the child sent, with what every frame of it shares."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    order: list[str]
    at: dict[str, int]


@dataclass(frozen=True)
class _Reply:
    frame: Frame | None
    error: errors.CodecError | None


class Decoder:
    """Frames submitted now, decoded by the child; :meth:`decode` gives each one's result.

    The worker reads the replies itself, when it needs one (a reply thread would wait for its
    hold on the interpreter at every read); the pipes are widened to 1 MiB, for the child to run ahead."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._proc: subprocess.Popen[bytes] | None = None
        self._down_since = -RESTART_S
        self._next = 0
        self._sent: dict[int, tuple[int, bytes, FrameLimits]] = {}
        """By the frame's id(): the request id, the frame (kept alive) and its limits."""
        self._replies: dict[int, _Reply] = {}
        self._forgotten: set[int] = set()
        self._tables: dict[int, _Table] = {}
        self._inbuf = bytearray()
        self._unsent: deque[tuple[int, bytes]] = deque()
        """Requests not yet in the child's pipe, by id; the first one's first ``_off`` bytes are."""
        self._off = 0
        self._ready = False
        self._started = 0.0

    # -- the worker's side -------------------------------------------------------------

    def start(self) -> None:
        """Start the child now (it is otherwise started at the first batch), so that it is ready by then."""
        if self.enabled:
            self._running()

    def submit(self, frames: list[bytes], limits: FrameLimits) -> None:
        """Send ``frames`` to the child to be decoded under ``limits`` (while the worker does other work)."""
        if not self.enabled or not frames or not self._running() or not self._is_ready():
            return
        head = astuple(limits)
        for frame in frames:
            if id(frame) in self._sent:
                continue
            rid = self._next = self._next + 1
            self._sent[id(frame)] = (rid, frame, limits)
            self._unsent.append((rid, _LEN.pack(_REQ.size + len(frame)) + _REQ.pack(rid, *head) + frame))
        self._push()

    def decode(self, frame: bytes, limits: FrameLimits) -> Frame:
        """``decode_frame(frame, limits)``, from the child when it was submitted and the child answers."""
        sent = self._sent.pop(id(frame), None)
        if sent is not None and sent[1] is frame and sent[2] == limits:
            reply = self._wait(sent[0])
            if reply is not None:
                if reply.error is not None:
                    raise reply.error
                if reply.frame is not None:
                    return reply.frame
        elif sent is not None:
            self._drop({sent[0]})  # asked under other limits: the child's answer is not this one
        return decode_frame(frame, limits)

    def forget(self) -> None:
        """Drop what was submitted and not asked for (the batch is over): its replies are dropped as they come."""
        asked = {rid for rid, _, _ in self._sent.values()}
        self._sent.clear()
        self._drop(asked)

    def _drop(self, rids: set[int]) -> None:
        """No one will ask for these requests: unsent ones are not sent, and replies are dropped
        (one partly written is finished, and its reply dropped as it comes)."""
        never_sent: set[int] = set()
        if self._unsent:
            first = [self._unsent.popleft()] if self._off else []
            never_sent = {rid for rid, _ in self._unsent if rid in rids}
            self._unsent = deque(first + [r for r in self._unsent if r[0] not in rids])
        for rid in rids - never_sent:
            if self._replies.pop(rid, None) is None:
                self._forgotten.add(rid)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        self._unsent.clear()
        if proc is not None:
            _stop(proc)

    # -- the child -----------------------------------------------------------------

    def _running(self) -> bool:
        if self._proc is not None and self._proc.poll() is None:
            return True
        if self._proc is not None:
            self._lost(f"it exited with {self._proc.returncode}")
        if time.monotonic() - self._down_since < RESTART_S:
            return False
        try:
            self._proc = subprocess.Popen(CHILD_ARGV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            self._down_since = time.monotonic()
            log.error("cannot start the decoder process (%s); decoding in the worker", exc)
            return False
        assert self._proc.stdin is not None and self._proc.stdout is not None
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # a smaller pipe only lets the child run less far ahead
        os.set_blocking(self._proc.stdin.fileno(), False)  # the worker writes what fits, and never waits
        self._replies.clear()
        self._forgotten.clear()
        self._tables.clear()
        self._inbuf.clear()
        self._ready = False
        self._started = time.monotonic()
        self._unsent.clear()
        self._off = 0
        return True

    def _lost(self, why: str) -> None:
        proc, self._proc = self._proc, None
        self._down_since = time.monotonic()
        self._sent.clear()
        self._unsent.clear()
        self._off = 0
        if proc is not None:
            proc.kill()
            _stop(proc)
        log.error("the decoder process is lost (%s); decoding in the worker, a new one in %.0f s", why, RESTART_S)

    def _is_ready(self) -> bool:
        """Whether the child said it is ready; read without waiting, and given up on after ``WAIT_S``."""
        if not self._ready and self._proc is not None and self._proc.stdout is not None:
            fd = self._proc.stdout.fileno()
            try:
                while not self._ready and select.select([fd], [], [], 0)[0]:
                    if not self._read(fd, "it exited before it was ready"):
                        return False
            except _UNREADABLE as exc:
                self._lost(f"a reply is unreadable: {exc}")
                return False
            if not self._ready and time.monotonic() - self._started > WAIT_S:
                self._lost(f"not ready in {WAIT_S:.0f} s")
        return self._ready

    def _push(self) -> None:
        """Write as many of the unsent requests as the child's pipe takes now, without waiting
        (a request thread would take the interpreter from the worker at every partial write)."""
        proc = self._proc
        if not self._unsent or proc is None or proc.stdin is None:
            return
        bufs = [memoryview(b) for _, b in itertools.islice(self._unsent, 16)]
        bufs[0] = bufs[0][self._off :]
        try:
            n = os.writev(proc.stdin.fileno(), bufs)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"its requests cannot be written: {exc}")
            return
        for buf in bufs:
            if n < len(buf):
                self._off += n
                return
            n -= len(buf)
            self._unsent.popleft()
            self._off = 0

    def _wait(self, rid: int) -> _Reply | None:
        """Read replies until ``rid``'s, writing the requests still unsent as the pipe takes
        them; None (and the child given up on) if it never comes."""
        proc = self._proc
        if proc is None or proc.stdout is None or proc.stdin is None:
            return None
        fd, wfd = proc.stdout.fileno(), proc.stdin.fileno()
        deadline = time.monotonic() + WAIT_S
        try:
            while rid not in self._replies:
                self._push()
                if self._proc is not proc:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    self._lost(f"no reply in {WAIT_S:.0f} s")
                    return None
                if not select.select([fd], [wfd] if self._unsent else [], [], left)[0]:
                    continue  # the pipe takes more requests, or the time is up
                if not self._read(fd, "its replies ended"):
                    return None
        except _UNREADABLE as exc:
            self._lost(f"a reply is unreadable: {exc}")
            return None
        return self._replies.pop(rid)

    def _read(self, fd: int, at_end: str) -> bool:
        """Read what the child has written and take its complete replies; False (and the child
        given up on, for ``at_end``) when its output has ended."""
        chunk = os.read(fd, PIPE_BYTES)
        if not chunk:
            self._lost(at_end)
            return False
        self._take(chunk)
        return True

    def _take(self, chunk: bytes) -> None:
        """The complete replies in what was read so far."""
        buf = self._inbuf
        buf += chunk
        at = 0
        while len(buf) - at >= _LEN.size:
            (n,) = _LEN.unpack_from(buf, at)
            if n > MAX_REPLY:
                raise ValueError(f"a reply of {n} bytes")
            if len(buf) - at - _LEN.size < n:
                break
            body = bytes(buf[at + _LEN.size : at + _LEN.size + n])
            at += _LEN.size + n
            rid, reply = _parse(body, self._tables)
            if reply is None:
                self._ready = True
            elif rid in self._forgotten:
                self._forgotten.discard(rid)
            else:
                self._replies[rid] = reply
        del buf[:at]


def _parse(body: bytes, tables: dict[int, _Table]) -> tuple[int, _Reply | None]:
    """One reply; None for the child's ready message."""
    rid, tag = _ID.unpack_from(body)
    at = _ID.size
    if tag == b"R":
        return rid, None
    if tag == b"U":
        return rid, _Reply(None, None)
    if tag == b"E":
        name, _, message = body[at:].decode("utf-8", "replace").partition("\0")
        return rid, _Reply(None, _ERRORS.get(name, errors.FrameError)(message))
    kind, sumsq, n, table, jlen = _OK.unpack_from(body, at)
    at += _OK.size
    if jlen:
        names, shapes = json.loads(body[at : at + jlen])
        names = tuple(names)
        tables[table] = _Table(names, tuple(tuple(s) for s in shapes), list(names), {n: k for k, n in enumerate(names)})
        at += jlen
    t = tables[table]
    bounds = np.frombuffer(body, dtype="<u8", count=n + 1, offset=at).astype(np.int64)
    at += 8 * (n + 1)
    total = int(bounds[-1])
    indices = np.frombuffer(body, dtype="<u4", count=total, offset=at).astype(np.int64)
    values = np.frombuffer(body, dtype="<f4", count=total, offset=at + 4 * total).copy()
    packed = Packed(t.names, t.shapes, bounds, indices, values)
    return rid, _Reply(Frame(FrameKind(kind), Tensors(None, packed, t.order, t.at), sumsq), None)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_message(stream: IO[bytes], limit: int) -> bytes | None:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    if n > limit:
        raise ValueError(f"a message of {n} bytes, above {limit}")
    body = stream.read(n)
    return body if len(body) == n else None


def _reply(frame: bytes, limits: FrameLimits, tables: dict[Any, int]) -> bytes:
    try:
        got = decode_frame(frame, limits)
    except errors.CodecError as exc:
        return b"E" + f"{type(exc).__name__}\0{exc}".encode()
    tensors = got.tensors
    packed = tensors.packed if isinstance(tensors, Tensors) else None
    if packed is None or int(packed.bounds[-1]) > 0 and int(packed.indices.max()) >= 1 << 32:
        return b"U"
    key = (packed.names, packed.shapes)
    table = tables.get(key)
    table_json = b""
    if table is None:
        table = tables[key] = len(tables)
        table_json = json.dumps([packed.names, packed.shapes]).encode()
    head = _OK.pack(int(got.kind), got.sumsq, len(packed.names), table, len(table_json))
    arrays = (packed.bounds.astype("<u8"), packed.indices.astype("<u4"), packed.values.astype("<f4"))
    return b"".join((b"K", head, table_json, *(a.tobytes() for a in arrays)))


def main() -> int:
    """The child: decode what arrives on stdin until it closes, or until the coordinator is gone."""
    try:
        return _serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # its coordinator was killed: no one to answer, and nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    tables: dict[Any, int] = {}
    ready = _RID.pack(0) + b"R"
    stdout.write(_LEN.pack(len(ready)) + ready)
    stdout.flush()
    while True:
        body = _read_message(stdin, (64 << 20) + _REQ.size)
        if body is None:
            return 0
        rid, *limits = _REQ.unpack_from(body)
        reply = _RID.pack(rid) + _reply(body[_REQ.size :], FrameLimits(*limits), tables)
        stdout.write(_LEN.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
