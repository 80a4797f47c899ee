"""Durable agent state: sequence number, error-feedback residual and the update outbox.

Every file is written atomically (temp file, fsync, rename, fsync of the directory),
so a ``kill -9`` at any moment leaves either the old or the new content, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from compression import ErrorFeedback

log = logging.getLogger(__name__)


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
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class AgentState:
    """The agent's state directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.outbox = self.root / "outbox"
        self.outbox.mkdir(parents=True, exist_ok=True)
        for stale in self.root.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)  # left by a kill -9 during atomic_write
        self._meta_path = self.root / "state.json"
        self.seq = 0
        if self._meta_path.exists():
            try:
                self.seq = int(json.loads(self._meta_path.read_text())["seq"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self._meta_path} is corrupt ({exc}); move it away to start over") from None

    def next_seq(self) -> int:
        """Reserve and persist the next update sequence number."""
        self.seq += 1
        atomic_write(self._meta_path, json.dumps({"seq": self.seq}).encode())
        return self.seq

    def load_feedback(self) -> ErrorFeedback:
        path = self.root / "residual.safetensors"
        if not path.exists():
            return ErrorFeedback()
        from safetensors.numpy import load_file

        return ErrorFeedback({k: v.astype(np.float32) for k, v in load_file(str(path)).items()})

    def save_feedback(self, feedback: ErrorFeedback) -> None:
        from safetensors.numpy import save

        atomic_write(self.root / "residual.safetensors", save({k: np.ascontiguousarray(v) for k, v in feedback.residual.items()}))

    def put_outbox(self, seq: int, payload: bytes) -> Path:
        path = self.outbox / f"{seq:012d}.update"
        atomic_write(path, payload)
        return path

    def pending(self) -> list[Path]:
        """Outbox entries not yet acknowledged by the broker, oldest first."""
        return sorted(self.outbox.glob("*.update"))
