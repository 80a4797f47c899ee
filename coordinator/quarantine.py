"""A bounded directory of messages that could not be handled, kept for inspection.

A message whose handling raised is refused with a counted reason and acknowledged, so
that the broker never redelivers it forever; its payload lands here, beside a JSON note
of the topic and the error. The directory keeps at most ``max_files`` messages and
``max_bytes`` in all: the oldest go first, so a flood of poison cannot fill the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from coordinator.store import atomic_write

log = logging.getLogger(__name__)


class Quarantine:
    def __init__(self, root: str | Path, *, max_files: int = 100, max_bytes: int = 64 << 20) -> None:
        self.root = Path(root)
        self.max_files = max_files
        self.max_bytes = max_bytes

    def keep(self, topic: str, payload: bytes, error: str) -> Path | None:
        """Store one message; returns its path, or None when it cannot be written (never raises)."""
        digest = hashlib.sha256(payload).hexdigest()[:16]
        name = f"{time.time_ns():020d}-{digest}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if len(payload) <= self.max_bytes:
                atomic_write(self.root / f"{name}.bin", payload)
            note = {"topic": topic[:300], "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "error": error[:2000]}
            atomic_write(self.root / f"{name}.json", json.dumps(note, indent=1).encode())
            self._trim()
        except OSError as exc:
            log.error("cannot quarantine a message from %s: %s", topic, exc)
            return None
        return self.root / f"{name}.bin"

    def _trim(self) -> None:
        names = sorted({p.stem for p in self.root.glob("*.json")})
        sizes = {n: sum(p.stat().st_size for p in self.root.glob(f"{n}.*")) for n in names}
        total = sum(sizes.values())
        while names and (len(names) > self.max_files or total > self.max_bytes):
            oldest = names.pop(0)
            total -= sizes[oldest]
            for p in self.root.glob(f"{oldest}.*"):
                p.unlink(missing_ok=True)

    def entries(self) -> list[dict[str, object]]:
        """The notes of the quarantined messages, oldest first."""
        out = []
        for p in sorted(self.root.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return out
