"""Durable agent state: sequence number, error-feedback residual and the update outbox.

Every file is written atomically (temp file, fsync, rename, fsync of the directory),
so a ``kill -9`` at any moment leaves either the old or the new content, never a mix.

A round is committed in three atomic steps, so that the residual and the outbox never
disagree (which would lose an update's values, or send them twice):

1. ``outbox/<seq>.residual``: the residual *after* this update;
2. ``outbox/<seq>.update``: the envelope to publish. From here the round exists;
3. ``residual.safetensors`` (tagged with ``seq``) replaces the old residual, and the
   ``.residual`` side file goes.

On start, a ``.residual`` without its ``.update`` is a round that never happened (the
crash came before step 2) and is deleted; one with its ``.update`` is newer than
``residual.safetensors`` (the crash came before step 3) and is installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from compression import ErrorFeedback
from edge_agent.errors import StateError

log = logging.getLogger(__name__)

RESIDUAL = "residual.safetensors"


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _residual_bytes(feedback: ErrorFeedback, seq: int) -> bytes:
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feedback.residual.items()}
    return save(tensors, metadata={"seq": str(seq)})


def _read_residual(path: Path) -> tuple[int, ErrorFeedback]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            seq = int((fh.metadata() or {}).get("seq", "0"))
            residual = {k: fh.get_tensor(k).astype(np.float32) for k in fh.keys()}
    except (OSError, ValueError, SafetensorError) as exc:
        raise StateError(f"{path} is unreadable ({exc}); move it away to restart without the residual") from None
    if not all(np.all(np.isfinite(v)) for v in residual.values()):
        raise StateError(f"{path} holds non-finite values; move it away to restart without the residual")
    return seq, ErrorFeedback(residual)


STATUS = "status.json"


def pid_alive(pid: object) -> bool:
    """Whether a process with this PID runs (one we may not signal still counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_status(root: Path, status_json: bytes, **extra: object) -> None:
    """The last heartbeat, for ``fedge-agent status``. Replaced atomically but not fsynced:
    it is rewritten every heartbeat and need not survive a power cut (spares SD cards)."""
    doc = json.loads(status_json)
    doc.update(extra, pid=os.getpid())
    tmp = root / f".{STATUS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, root / STATUS)


def read_status(root: Path) -> dict[str, object] | None:
    try:
        doc = json.loads((root / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class AgentState:
    """The agent's state directory."""

    def __init__(self, root: str | Path, *, readonly: bool = False) -> None:
        """Open the state directory. The agent that owns it opens it writable, which finishes or
        undoes a round a crash interrupted; anything else (``status``, ``check``, a test) opens
        it ``readonly``, which changes nothing, so that it never removes a running agent's
        half-written file."""
        self.root = Path(root)
        self.outbox = self.root / "outbox"
        self.rejected = self.outbox / "rejected"
        self.readonly = readonly
        if not readonly:
            self.outbox.mkdir(parents=True, exist_ok=True)
            for stale in self.root.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)  # left by a kill -9 during atomic_write
        self._meta_path = self.root / "state.json"
        self.seq = 0
        self.dp_rounds = 0
        self.dpsgd_steps = 0
        if self._meta_path.exists():
            try:
                meta = json.loads(self._meta_path.read_text())
                self.seq = int(meta["seq"])
                self.dp_rounds = int(meta.get("dp_rounds", 0))
                self.dpsgd_steps = int(meta.get("dpsgd_steps", 0))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StateError(f"{self._meta_path} is corrupt ({exc}); move it away to start over") from None
        if readonly:
            # The sequence number is persisted before its round's files exist: it covers them.
            self.residual_seq, self._feedback = 0, ErrorFeedback()
            self.seq = max([self.seq, *(int(p.stem) for p in self.pending())])
            return
        self._recover()
        # Never reuse a sequence number that an outbox entry or the residual already carries.
        self.seq = max([self.seq, self.residual_seq, *(int(p.stem) for p in self.pending())])

    def _recover(self) -> None:
        """Finish or undo a round that a crash interrupted (see the module docstring)."""
        self.residual_seq = 0
        self._feedback = ErrorFeedback()
        path = self.root / RESIDUAL
        if path.exists():
            self.residual_seq, self._feedback = _read_residual(path)
        for side in sorted(self.outbox.glob("*.residual")):
            seq = int(side.stem)
            if not (self.outbox / f"{seq:012d}.update").exists():
                log.info("discarding round %d: the agent stopped before its update was written", seq)
                side.unlink()
                continue
            if seq > self.residual_seq:
                log.info("finishing round %d: installing its residual", seq)
                os.replace(side, path)
                _fsync_dir(self.root)
                self.residual_seq, self._feedback = _read_residual(path)
            else:
                side.unlink()

    def next_seq(self, dp_round: bool = False) -> int:
        """Reserve and persist the next update sequence number (and count a locally noised round).

        The round is counted before its update exists: a crash afterwards over-counts the
        privacy spent, never under-counts it."""
        self._writable()
        self.seq += 1
        self.dp_rounds += int(dp_round)
        self._write_meta()
        return self.seq

    def count_dpsgd(self, steps: int) -> None:
        """Persist ``steps`` more DP-SGD steps, before anything trained with them leaves the device."""
        self._writable()
        self.dpsgd_steps += steps
        self._write_meta()

    def _write_meta(self) -> None:
        meta = {"seq": self.seq, "dp_rounds": self.dp_rounds, "dpsgd_steps": self.dpsgd_steps}
        atomic_write(self._meta_path, json.dumps(meta).encode())

    def load_feedback(self) -> ErrorFeedback:
        """The residual of the last committed round."""
        return self._feedback

    def commit_round(self, seq: int, envelope: bytes, feedback: ErrorFeedback) -> Path:
        """Durably record one round: its update in the outbox and the residual after it."""
        self._writable()
        data = _residual_bytes(feedback, seq)
        side = self.outbox / f"{seq:012d}.residual"
        atomic_write(side, data)
        entry = self.outbox / f"{seq:012d}.update"
        atomic_write(entry, envelope)
        atomic_write(self.root / RESIDUAL, data)
        side.unlink(missing_ok=True)
        self.residual_seq, self._feedback = seq, feedback
        return entry

    def _writable(self) -> None:
        if self.readonly:
            raise StateError(f"{self.root} was opened read-only (only the agent that owns it writes to it)")

    def pending(self) -> list[Path]:
        """Outbox entries not yet acknowledged by the broker, oldest first."""
        return sorted(self.outbox.glob("*.update"))

    def delivered(self, entry: Path) -> None:
        self._writable()
        entry.unlink(missing_ok=True)

    def dead_letter(self, entry: Path, reason: str) -> None:
        """Move an update the broker refused for good out of the way, with the reason beside it."""
        self._writable()
        self.rejected.mkdir(exist_ok=True)
        shutil.move(str(entry), self.rejected / entry.name)
        atomic_write(self.rejected / f"{entry.stem}.reason", reason.encode())
