"""The content hash of a base model's weights, as the fleet spec carries it (``base.sha256``).

Both sides compute it from what they load: the coordinator when it makes version 0, each
agent from its own model source. A device whose base has the same shape as the fleet's but
other weights would otherwise train against the wrong model, and its updates would poison
the fleet.

- A ``.gguf`` file: the sha256 of the file.
- A model directory: the sha256 of one line per weight file (``*.safetensors``,
  ``pytorch_model*.bin``, ``*.gguf``), sorted by name: ``<name> <sha256 of the file>\\n``.

It reads the files in 1 MiB pieces (about 0.3 s for SmolLM2's 98 MB GGUF here).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
_PIECE = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while piece := fh.read(_PIECE):
            h.update(piece)
    return h.hexdigest()


def weight_files(source: Path) -> list[Path]:
    """The files whose bytes are the base's weights: the GGUF itself, or a directory's weight files."""
    if source.is_file():
        return [source]
    return sorted({p for pattern in WEIGHT_PATTERNS for p in source.glob(pattern) if p.is_file()}, key=lambda p: p.name)


def base_sha256(source: Path) -> str | None:
    """The content hash of the base at ``source`` (a file or a model directory); ``None``
    when it holds no weight files (a directory with only a config)."""
    files = weight_files(source)
    if not files:
        return None
    if source.is_file():
        return file_sha256(source)
    return hashlib.sha256("".join(f"{p.name} {file_sha256(p)}\n" for p in files).encode()).hexdigest()


def short(digest: str | None) -> str:
    """A digest as logs and errors show it (the first 12 hex digits)."""
    return digest[:12] if digest else "none"
