"""Local data: files to token blocks, a stable held-out split, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.data import build_blocks, read_texts
from edge_agent.errors import DataError


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + (ord(c) % 50) for c in text]}


def test_reads_txt_md_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.md").write_text("beta")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\nnot json\n" + json.dumps({"x": 1}) + "\n")
    (tmp_path / "d.bin").write_bytes(b"\x00\x01")
    assert read_texts(tmp_path) == ["alpha", "beta", "gamma"]


def test_missing_or_empty_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "nope")
    with pytest.raises(DataError, match="no usable records"):
        read_texts(tmp_path)


def test_split_is_deterministic_and_disjoint() -> None:
    texts = ["".join(chr(65 + (i * 7 + j) % 26) for j in range(400)) for i in range(10)]
    a = build_blocks(texts, CharTokenizer(), 32, 0.2, seed=1)
    b = build_blocks(texts, CharTokenizer(), 32, 0.2, seed=1)
    np.testing.assert_array_equal(a.heldout, b.heldout)
    assert a.train.shape[1] == 33 and len(a.heldout) >= 1
    train_rows = {r.tobytes() for r in a.train}
    assert not any(r.tobytes() in train_rows for r in a.heldout)


def test_too_little_text_is_refused() -> None:
    with pytest.raises(DataError, match="at least"):
        build_blocks(["tiny"], CharTokenizer(), 128, 0.1, seed=0)
