"""The lab corpora: non-IID domains from text that ships with Python and numpy."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge_lab.corpus import CORPORA, corpus_domains, write_device_corpus


@pytest.mark.parametrize("corpus", CORPORA)
def test_each_corpus_has_three_disjoint_domains_of_real_text(corpus: str) -> None:
    domains = corpus_domains(corpus)
    assert len(domains) == 3
    names = [set(topics) for topics in domains.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for topics in domains.values():
        assert sum(len(t) for t in topics.values()) > 50_000


@pytest.mark.parametrize("corpus", CORPORA)
def test_device_corpus_is_the_same_on_every_call(tmp_path: Path, corpus: str) -> None:
    a = write_device_corpus(tmp_path / "a", 1, corpus)
    b = write_device_corpus(tmp_path / "b", 4, corpus)  # device 4 of 3 domains wraps to domain 1
    assert a == b
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_an_unknown_corpus_is_named() -> None:
    with pytest.raises(ValueError, match="wiki"):
        corpus_domains("wiki")
