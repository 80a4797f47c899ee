"""Version 0's spec names the base by content: its weight files' hash, the configured one, or
none (with a warning) for a source that holds only a config."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from compression.basehash import base_sha256
from coordinator.config import ModelSpecConfig
from coordinator.errors import ConfigError
from coordinator.initial import initial_state


def test_the_spec_carries_the_hash_of_the_weights_or_the_configured_one(tiny_model: Path) -> None:
    spec, _ = initial_state(ModelSpecConfig(source=str(tiny_model), lora_r=4, lora_alpha=8))
    assert spec.base_sha256 == base_sha256(tiny_model) and spec.base["model_type"] == "llama"
    spec, _ = initial_state(ModelSpecConfig(source=str(tiny_model), lora_r=4, lora_alpha=8, base_sha256="c0" * 32))
    assert spec.base_sha256 == "c0" * 32
    with pytest.raises(ConfigError, match="model.base_sha256 must be 64 lowercase hex"):
        ModelSpecConfig(base_sha256="C0" * 32)


def test_a_config_only_source_gives_no_hash_and_says_so(tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    only = tmp_path / "config-only"
    only.mkdir()
    shutil.copy(tiny_model / "config.json", only / "config.json")
    with caplog.at_level(logging.WARNING):
        spec, _ = initial_state(ModelSpecConfig(source=str(only), lora_r=4, lora_alpha=8))
    assert spec.base_sha256 == "" and "sha256" not in spec.base
    assert "checked by the base's shape only" in caplog.text


def test_wrong_targets_name_the_architecture_s_usual_ones(tmp_path: Path) -> None:
    from edge_agent.tiny import build_tiny_model

    gpt2 = build_tiny_model(tmp_path / "gpt2", ["def f(x):\n    return x\n" * 50], arch="gpt2")
    with pytest.raises(ConfigError, match=r"a gpt2 model's usual targets are \['c_attn'\]"):
        initial_state(ModelSpecConfig(source=str(gpt2), lora_r=4, lora_alpha=8))
