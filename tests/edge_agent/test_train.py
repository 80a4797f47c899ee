"""Memory-saving training paths give the same numbers as the plain ones."""

from pathlib import Path

import numpy as np
import pytest
import torch

from compression.protocol import TrainableSpec
from edge_agent.config import TrainConfig
from edge_agent.data import build_blocks, read_texts
from edge_agent.model import attach_lora, get_trainable, load_base
from edge_agent.train import causal_lm, lm_loss, set_gradient_checkpointing, train_round

SPEC = TrainableSpec(r=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture
def lora_model(tiny_model: Path, device_data):  # type: ignore[no-untyped-def]
    model, tok = load_base(str(tiny_model), "int8")
    peft_model = attach_lora(model, SPEC)
    # Non-zero B, so that gradients reach both A and B.
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    data = build_blocks(read_texts(device_data(0)), tok, 32, 0.1, seed=0)
    return peft_model, data


def _grads(model: torch.nn.Module, batch: np.ndarray, chunk: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.train()
    loss = lm_loss(model, batch, chunk)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(lora_model, chunk: int) -> None:  # type: ignore[no-untyped-def]
    model, data = lora_model
    batch = data.train[:3]
    loss_full, g_full = _grads(model, batch, 0)
    loss_chunk, g_chunk = _grads(model, batch, chunk)
    assert loss_chunk == pytest.approx(loss_full, rel=1e-5)
    for n in g_full:
        torch.testing.assert_close(g_chunk[n], g_full[n], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(lora_model) -> None:  # type: ignore[no-untyped-def]
    model, data = lora_model
    batch = data.train[:2]
    set_gradient_checkpointing(model, False)
    _, plain = _grads(model, batch, 16)
    set_gradient_checkpointing(model, True)
    assert causal_lm(model).is_activation_checkpointing
    _, ckpt = _grads(model, batch, 16)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)


def test_fedprox_keeps_the_adapter_closer_to_the_global(lora_model) -> None:  # type: ignore[no-untyped-def]
    model, data = lora_model
    start = get_trainable(model)

    def drift(mu: float) -> float:
        from edge_agent.model import set_trainable

        set_trainable(model, start)
        cfg = TrainConfig(batch_size=4, seq_len=32, local_steps=15, lr=2e-2, threads=1, fedprox_mu=mu)
        result = train_round(model, data, cfg, np.random.default_rng(0))
        assert np.isfinite(result.train_loss)
        end = get_trainable(model)
        return float(sum(np.sum((end[k] - start[k]) ** 2) for k in start))

    assert drift(5.0) < 0.8 * drift(0.0)
