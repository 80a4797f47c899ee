"""One table of rejection reasons: every code the code base raises is in it, and the docs list it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compression import errors as codec_errors
from compression.reasons import MEANINGS, Reason, reason_code
from coordinator.errors import Rejection

ROOT = Path(__file__).resolve().parents[1]


def test_every_rejection_in_the_source_uses_a_code_of_the_table() -> None:
    codes = set()
    for path in list((ROOT / "coordinator").rglob("*.py")) + list((ROOT / "compression").rglob("*.py")):
        codes |= set(re.findall(r'Rejection\(\s*"([a-z_]+)"', path.read_text()))
    assert codes, "no Rejection(...) found: the pattern is stale"
    assert codes <= {r.value for r in Reason}, codes - {r.value for r in Reason}


def test_codec_errors_carry_codes_of_the_table() -> None:
    for obj in vars(codec_errors).values():
        if isinstance(obj, type) and issubclass(obj, Exception) and hasattr(obj, "reason"):
            assert Reason(obj.reason)


def test_an_unknown_code_is_a_bug_not_a_new_reason() -> None:
    with pytest.raises(ValueError):
        Rejection("made_up", "detail")
    assert Rejection(Reason.TOO_STALE, "x").reason == "too_stale" == reason_code("too_stale")


def test_every_reason_has_a_meaning_and_a_row_in_the_docs() -> None:
    assert set(MEANINGS) == set(Reason)
    trust = (ROOT / "docs" / "trust.md").read_text()
    for r in Reason:
        assert f"| `{r.value}` |" in trust, r
