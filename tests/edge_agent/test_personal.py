"""Ditto's personal adapter: it learns the device's data, is pulled toward the global adapter by
lambda, is stored atomically, and a damaged or mismatched file is set aside, never trusted."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from compression.protocol import TrainableSpec
from edge_agent.config import TrainConfig
from edge_agent.data import build_blocks, read_texts
from edge_agent.errors import ConfigError
from edge_agent.model import attach_lora, get_trainable, load_base
from edge_agent.personal import PERSONAL, PersonalAdapter

CFG = TrainConfig(batch_size=4, seq_len=32, local_steps=6, lr=1e-2, threads=1, personal="ditto", eval_blocks=4)


@pytest.fixture
def setup(tiny_model: Path, device_data):  # type: ignore[no-untyped-def]
    model, tok = load_base(str(tiny_model), "none")
    model = attach_lora(model, TrainableSpec(r=4, alpha=8, targets=("q_proj", "v_proj")))
    data = build_blocks(read_texts(device_data(0)), tok, 32, 0.1, seed=0)
    return model, data, get_trainable(model)


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_the_personal_adapter_learns_is_stored_and_leaves_the_model_on_the_global(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    model, data, w = setup
    p = PersonalAdapter(tmp_path, CFG)
    assert p.evaluate(model, data, w) is None  # nothing trained yet
    result = p.train(model, data, w, np.random.default_rng(0))
    assert result.steps == 6 and (tmp_path / PERSONAL).is_file()
    assert _distance(get_trainable(model), w) == 0.0  # the model holds the global adapter again
    loss = p.evaluate(model, data, w)
    from edge_agent.train import evaluate

    assert loss is not None and loss < evaluate(model, data, 4, 4)  # it learned this device's data
    again = PersonalAdapter(tmp_path, CFG)  # a restart reads it back
    assert again.tensors is not None and _distance(again.tensors, p.tensors) == 0.0  # type: ignore[arg-type]


def test_lambda_pulls_the_personal_adapter_toward_the_global_one(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    model, data, w = setup
    far = PersonalAdapter(tmp_path / "a", replace(CFG, personal_lambda=0.0))
    near = PersonalAdapter(tmp_path / "b", replace(CFG, personal_lambda=10.0))
    far.train(model, data, w, np.random.default_rng(0))
    near.train(model, data, w, np.random.default_rng(0))
    assert _distance(near.tensors, w) < 0.5 * _distance(far.tensors, w)  # type: ignore[arg-type]


@pytest.mark.parametrize("damage", ["garbage", "other tensors", "nan"])
def test_a_damaged_or_foreign_personal_file_is_set_aside_and_training_starts_from_the_global(tmp_path: Path, setup, damage: str) -> None:  # type: ignore[no-untyped-def]
    from safetensors.numpy import save

    model, data, w = setup
    path = tmp_path / PERSONAL
    if damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "other tensors":
        path.write_bytes(save({"something.else": np.zeros((3, 3), np.float32)}))
    else:
        path.write_bytes(save({k: np.full_like(v, np.nan) for k, v in w.items()}))
    p = PersonalAdapter(tmp_path, CFG)
    assert _distance(p.start(w), w) == 0.0
    assert not path.exists() and (tmp_path / (PERSONAL + ".bad")).is_file()  # moved aside, not deleted
    p.train(model, data, w, np.random.default_rng(0))
    assert path.is_file()


def test_personal_needs_the_lora_tier_and_a_sane_lambda() -> None:
    with pytest.raises(ConfigError, match="train.personal"):
        TrainConfig(personal="ditto", tier="embedding")
    with pytest.raises(ConfigError, match="personal_lambda"):
        TrainConfig(personal="ditto", personal_lambda=-1)
    with pytest.raises(ConfigError, match="personal_lr"):
        TrainConfig(personal="finetune", personal_lr=2.0)
    with pytest.raises(ConfigError, match="'off', 'ditto' or 'finetune'"):
        TrainConfig(personal="fedrep")  # type: ignore[arg-type]


def test_finetune_starts_from_the_global_every_round_and_ditto_carries_on(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    model, data, w = setup
    runs = {}
    for method in ("finetune", "ditto"):
        p = PersonalAdapter(tmp_path / method, replace(CFG, personal=method))
        p.train(model, data, w, np.random.default_rng(0))
        first = p.tensors
        p.train(model, data, w, np.random.default_rng(0))
        runs[method] = _distance(p.tensors, first)  # type: ignore[arg-type]
    assert runs["finetune"] == 0.0  # the same w and batches: the same adapter again
    assert runs["ditto"] > 0.0  # a second round from where the first ended
