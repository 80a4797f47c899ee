"""The local text pipeline: files -> token blocks -> a train split and a held-out split.

The text never leaves this module as text: the rest of the agent sees token ids only,
and only parameter deltas are ever published.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
MAX_FILE_BYTES = 32 << 20


@dataclass(frozen=True)
class LocalData:
    """Token blocks of ``seq_len + 1`` ids, split deterministically into train and held-out."""

    train: np.ndarray
    heldout: np.ndarray
    num_files: int

    def batches(self, rng: np.random.Generator, batch_size: int, steps: int, replace: bool = True) -> list[np.ndarray]:
        """``steps`` random batches drawn from the train split; with ``replace=False`` each batch
        is ``batch_size`` distinct blocks drawn uniformly (all of them, if there are fewer)."""
        if replace:
            idx = rng.integers(0, len(self.train), size=(steps, batch_size))
            return [self.train[row] for row in idx]
        k = min(batch_size, len(self.train))
        return [self.train[np.sort(rng.choice(len(self.train), size=k, replace=False))] for _ in range(steps)]


def read_texts(data_dir: str | Path) -> list[str]:
    """All documents under ``data_dir``: .txt and .md files whole, .jsonl lines' ``text`` field."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    texts: list[str] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        if path.suffix in TEXT_SUFFIXES:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix == ".jsonl":
            texts.extend(_read_jsonl(path))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"no text in {root}: expected .txt, .md or .jsonl files (with a 'text' field)")
    return texts


def _read_jsonl(path: Path) -> list[str]:
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON, skipped", path, lineno)
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            out.append(obj["text"])
        else:
            log.warning("%s:%d: no string 'text' field, skipped", path, lineno)
    return out


def build_blocks(texts: list[str], tokenizer: Any, seq_len: int, heldout_fraction: float, seed: int) -> LocalData:
    """Tokenize, concatenate with EOS separators and cut into blocks; hold out a fixed fraction."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    block = seq_len + 1
    n = len(ids) // block
    if n < 2:
        raise DataError(f"local data has {len(ids)} tokens; at least {2 * block} are needed for seq_len {seq_len}")
    blocks = np.asarray(ids[: n * block], dtype=np.int64).reshape(n, block)
    # The split depends only on block content and the seed, so it is stable across restarts.
    keys = np.array([int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little") + b.tobytes()).digest()[:8], "little") for b in blocks])
    order = np.argsort(keys)
    n_held = min(max(1, round(n * heldout_fraction)), n - 1)
    return LocalData(train=blocks[np.sort(order[n_held:])], heldout=blocks[np.sort(order[:n_held])], num_files=len(texts))
