"""The simulation API: real training and the real engine for virtual devices, seeded, bounded."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator.strategy import StrategyConfig
from fedge_lab.simulation import SimulationConfig, build_model, shard_corpus, simulate

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**kw: object) -> SimulationConfig:
    base = SimulationConfig()
    return replace(base, devices=24, versions=3, concurrency=6, train=replace(base.train, lr=1e-2), **kw)  # type: ignore[arg-type]


def test_fedbuff_makes_the_versions_asked_from_real_uploads_and_is_seeded() -> None:
    cfg = _cfg(strategy=StrategyConfig(kind="fedbuff", buffer_size=4))
    a = simulate(cfg)
    assert [v.version for v in a.versions] == [1, 2, 3]
    assert all(v.updates == 4 for v in a.versions) and a.updates == 12 and a.bytes_up > 0
    assert a.versions[-1].loss is not None and np.isfinite(a.versions[-1].loss) and a.final_loss != a.initial_loss
    assert any(v.mean_staleness > 0 for v in a.versions)  # devices of slower tiers report on older versions
    assert a.peak_rss_mb > 0 and a.seconds > 0
    b = simulate(cfg)
    assert [v.loss for v in b.versions] == [v.loss for v in a.versions]


def test_fedavg_rounds_hold_one_update_per_device() -> None:
    cfg = _cfg(strategy=StrategyConfig(kind="fedavg", min_participants=3, round_participants=3, round_deadline_s=1000.0))
    r = simulate(cfg)
    assert len(r.versions) == 3 and all(v.updates == 3 for v in r.versions)


def test_a_corpus_too_small_for_the_fleet_is_named(tmp_path: Path) -> None:
    _model, tokenizer, _v0 = build_model(_cfg(), tmp_path)
    with pytest.raises(ValueError, match="too many for corpus 'pydoc'"):
        shard_corpus("pydoc", tokenizer, 100_000, 64, 0)


def test_the_docs_examples_run() -> None:
    text = (ROOT / "docs" / "simulation.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(examples) == 2  # simulate(), and a schedule of one's own
    for code in examples:
        exec(compile(code, "docs/simulation.md", "exec"), {})
