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


EMB_SPEC = TrainableSpec(r=4, alpha=8, targets=("q_proj", "v_proj"), embedding=True)


def _with_table(model: torch.nn.Module) -> dict[str, np.ndarray]:
    from compression.protocol import EMBED_DELTA

    state = get_trainable(model)
    emb = model.get_base_model().get_input_embeddings()
    state[EMBED_DELTA] = np.zeros(tuple(emb.global_delta.shape), np.float32)
    return state


def test_embedding_tier_trains_only_local_rows_and_keeps_the_head(tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    from compression.protocol import EMBED_DELTA
    from edge_agent.model import attach_trainable, load_global, round_delta

    model, tok = load_base(str(tiny_model), "int8")
    head_before = model.lm_head.weight.detach().clone()
    data = build_blocks(read_texts(device_data(0)), tok, 32, 0.1, seed=0)
    rows = np.unique(data.train)
    peft_model = attach_trainable(model, EMB_SPEC, "embedding", rows=rows)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable == [n for n in trainable if n.endswith(".local")] and len(trainable) == 1
    state = _with_table(peft_model)
    load_global(peft_model, state)
    before = evaluate(peft_model, data, 8, 8)
    train_round(peft_model, data, TrainConfig(batch_size=8, seq_len=32, local_steps=20, lr=2e-2, threads=1), np.random.default_rng(0))
    assert evaluate(peft_model, data, 8, 8) < before
    delta = round_delta(peft_model, state, "embedding")
    assert list(delta) == [EMBED_DELTA]
    changed = np.flatnonzero(np.abs(delta[EMBED_DELTA]).sum(axis=1))
    assert changed.size > 0 and set(changed) <= set(rows.tolist())
    assert torch.equal(peft_model.get_base_model().lm_head.weight, head_before)
    # The adapters were applied but did not train.
    assert all(np.array_equal(v, state[k]) for k, v in get_trainable(peft_model).items())


def test_a_lora_device_in_a_mixed_fleet_applies_the_embedding_table(tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    from compression.protocol import EMBED_DELTA
    from edge_agent.model import attach_trainable, load_global, round_delta

    model, tok = load_base(str(tiny_model), "none")
    peft_model = attach_trainable(model, EMB_SPEC, "lora")
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    data = build_blocks(read_texts(device_data(1)), tok, 32, 0.1, seed=0)
    state = _with_table(peft_model)
    load_global(peft_model, state)
    zero_table = evaluate(peft_model, data, 4, 4)
    state[EMBED_DELTA] = np.random.default_rng(0).normal(0, 0.5, state[EMBED_DELTA].shape).astype(np.float32)
    load_global(peft_model, state)
    assert evaluate(peft_model, data, 4, 4) != pytest.approx(zero_table)
    train_round(peft_model, data, TrainConfig(batch_size=4, seq_len=32, local_steps=2, lr=1e-2, threads=1), np.random.default_rng(0))
    assert EMBED_DELTA not in round_delta(peft_model, state, "lora")


def test_embedding_tier_needs_a_fleet_with_a_table(tiny_model: Path) -> None:
    from edge_agent.model import attach_trainable

    model, _ = load_base(str(tiny_model), "none")
    with pytest.raises(ModelError, match="model.embedding = true"):
        attach_trainable(model, SPEC, "embedding", rows=np.arange(10))
