"""The int8 frozen base with LoRA: only adapters train, and the state exchanged is exact."""

from pathlib import Path

import numpy as np
import pytest
import torch

from compression.protocol import TrainableSpec
from edge_agent.config import TrainConfig
from edge_agent.data import build_blocks, read_texts
from edge_agent.errors import ModelError
from edge_agent.model import attach_lora, get_trainable, load_base, set_trainable
from edge_agent.train import evaluate, train_round


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A quanto int8 weight as the float tensor it stands for."""
    return t.dequantize() if hasattr(t, "dequantize") else t


SPEC = TrainableSpec(r=4, alpha=8, targets=("q_proj", "v_proj"))


def test_only_lora_tensors_train_on_the_int8_base(tiny_model: Path) -> None:
    model, _ = load_base(str(tiny_model), "int8")
    peft_model = attach_lora(model, SPEC)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any("QLinear" in type(m).__name__ for m in peft_model.modules())


def test_training_changes_only_the_adapters_and_lowers_loss(tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    model, tok = load_base(str(tiny_model), "int8")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = attach_lora(model, SPEC)
    data = build_blocks(read_texts(device_data(0)), tok, 32, 0.1, seed=0)
    before_state = get_trainable(peft_model)
    cfg = TrainConfig(batch_size=8, seq_len=32, local_steps=30, lr=2e-2, threads=1)
    before = evaluate(peft_model, data, 8, 8)
    train_round(peft_model, data, cfg, np.random.default_rng(0))
    after = evaluate(peft_model, data, 8, 8)
    assert after < before
    after_state = get_trainable(peft_model)
    assert any(not np.array_equal(before_state[k], after_state[k]) for k in before_state)
    for n, p in peft_model.base_model.model.named_parameters():
        if "lora_" not in n and n in frozen:
            assert torch.equal(_plain(p.detach()), _plain(frozen[n])), n


def test_set_trainable_round_trips_and_rejects_mismatches(tiny_model: Path) -> None:
    model, _ = load_base(str(tiny_model), "none")
    peft_model = attach_lora(model, SPEC)
    state = {k: np.full_like(v, 0.125) for k, v in get_trainable(peft_model).items()}
    set_trainable(peft_model, state)
    assert all(np.all(v == 0.125) for v in get_trainable(peft_model).values())
    name = next(iter(state))
    with pytest.raises(ModelError, match="shape"):
        set_trainable(peft_model, {**state, name: np.zeros((1, 1), np.float32)})
    with pytest.raises(ModelError, match="missing"):
        set_trainable(peft_model, {k: v for k, v in state.items() if k != name})


def test_a_different_base_is_refused(tiny_model: Path) -> None:
    model, _ = load_base(str(tiny_model), "none")
    with pytest.raises(ModelError, match="fleet trains base"):
        attach_lora(model, TrainableSpec(r=4, alpha=8, targets=("q_proj",), base={"model_type": "llama", "vocab_size": 3}))


def test_an_unknown_source_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither"):
        load_base(str(tmp_path / "missing"), "int8")
