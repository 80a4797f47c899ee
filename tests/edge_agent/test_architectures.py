"""Each architecture's int8 base: the model cache restores exactly what quantizing in memory gives
(non-persistent buffers included), GPT-2's Conv1D layers become the linears they are, and the
chunked loss (Gemma 2's logit soft-capping included) is the model's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.model import conv1d_as_linear, load_base
from edge_agent.tiny import ARCHS, build_tiny_model
from edge_agent.train import lm_loss
from fedge_lab.corpus import pydoc_domains


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    texts = [t for topics in pydoc_domains().values() for t in list(topics.values())[:8]]
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_tiny_model(root / arch, texts, arch=arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_int8_cache_gives_the_in_memory_int8_model(arch: str, models: dict[str, Path], tmp_path: Path) -> None:
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    direct, _ = load_base(str(models[arch]), "int8")
    cached, _ = load_base(str(models[arch]), "int8", tmp_path / "cache", in_subprocess=False)
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)


def test_gpt2_conv1d_layers_become_linears_with_the_same_function(models: dict[str, Path]) -> None:
    model, _ = load_base(str(models["gpt2"]), "none")
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert conv1d_as_linear(model) == 8  # c_attn, c_proj, c_fc and mlp.c_proj in each of 2 blocks
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_chunked_loss_is_the_model_s_own(arch: str, models: dict[str, Path]) -> None:
    model, _ = load_base(str(models[arch]), "none")
    if arch == "gemma2":
        model.config.final_logit_softcapping = 0.5  # a cap that bites on a tiny model's logits
    batch = np.random.default_rng(0).integers(0, 500, size=(2, 20))
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(model, batch, chunk_tokens=7), lm_loss(model, batch), rtol=1e-5, atol=1e-5)
