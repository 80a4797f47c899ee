"""The lean runtime: a Llama-family causal LM for training LoRA on an int8 base, in torch alone.

``model.runtime = "lean"`` trains without importing transformers, peft or quanto at run
time (they cost about 160 MB of RSS before any weight is loaded). It reads the agent's
model cache, where :func:`write_lean` stored, once, at cache build:

- every linear layer's weight as int8 with one fp32 scale per output row (symmetric
  absmax, as quanto's qint8), kept int8 in memory and dequantized one layer at a time
  inside a custom autograd function, so that neither the forward pass nor the backward
  pass ever keeps a dequantized weight alive;
- the input embedding as int8 with one scale per group of ``EMBED_GROUP`` values of a row:
  30 MB instead of SmolLM2's 113 MB fp32 table (one scale per row loses 3% of held-out
  loss through the tied head; groups lose nothing measurable). The output head, tied to
  it, is fused with the cross-entropy: the loss is computed in vocabulary blocks with a
  running log-sum-exp, so that neither the logits nor a dequantized table ever exist
  whole, and the table is dequantized twice a step (forward and backward);
- the norms in fp32, the config and the tokenizer (``tokenizers``).

The model behaves as the transformers one the agent trains (:mod:`edge_agent.train`):
``model.model(input_ids).last_hidden_state``, ``get_output_embeddings()``, ``labels`` for
the loss, activation checkpointing per decoder layer. LoRA goes on the same modules with
the same names, scaling and state-dict keys as peft's, so the fleet's tensors are the same
whichever runtime a device uses (``tests/edge_agent/test_lean.py`` checks both against
transformers and peft).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from edge_agent.errors import ModelError

LEAN_WEIGHTS = "lean.safetensors"
LEAN_CONFIG = "lean-config.json"
HEAD_BLOCK = 2048
"""Vocabulary rows the tied head dequantizes at once (2048 x 576 fp32 = 4.7 MB for SmolLM2). Each
block's logits and softmax are ``tokens x HEAD_BLOCK``: measured on the Pi 4 profile, 8192 rows
peaked 50 MB higher than 2048 at the same speed."""
EMBED_GROUP = 32
"""Values of an embedding row that share one int8 scale."""
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
SUPPORTED = ("llama",)


# -- int8 weights ------------------------------------------------------------------------


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``w ~ q * scale[:, None]``, ``scale = max|w_row| / 127``."""
    w = w.detach().to(torch.float32)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_groups(w: torch.Tensor, group: int = EMBED_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of ``group`` values of a row: scales of shape ``[rows, cols // group]``."""
    rows, cols = w.shape
    if cols % group:
        return quantize_rows(w)
    g = w.detach().to(torch.float32).reshape(rows, cols // group, group)
    scale = g.abs().amax(dim=2).clamp(min=1e-12) / 127.0
    q = torch.round(g / scale[:, :, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, cols).contiguous(), scale.contiguous()


class _Scratch(threading.local):
    """Per-thread fp32 buffers for temporaries that live inside one operation: a dequantized
    weight (slot 0), a block of the head's logits (1), a gradient scaled on its way into a
    matmul (2).

    None of them is ever saved for the backward, so one buffer per slot serves every layer
    in turn. A fresh tensor per call would cost a fresh mapping of 1-5 MB each time (the
    agent fixes glibc's mmap threshold at 128 KiB, see :mod:`edge_agent.memory`) and a page
    fault for every 4 KiB of it: measured on the Pi 4 profile, these buffers and the in-place
    LoRA, RoPE and head arithmetic took a step from 648k page faults to 440k, fewer than the
    fp32 transformers step's 594k.
    """

    def __init__(self) -> None:
        self.bufs = [torch.empty(0), torch.empty(0), torch.empty(0)]

    def take(self, rows: int, cols: int, slot: int = 0) -> torch.Tensor:
        """A ``rows x cols`` fp32 view of buffer ``slot``: 0 for weights, 1 for the head's logits blocks,
        2 for a gradient scaled on its way into a matmul."""
        if self.bufs[slot].numel() < rows * cols:
            self.bufs[slot] = torch.empty(rows * cols)
        return self.bufs[slot][: rows * cols].view(rows, cols)


_SCRATCH = _Scratch()


def _widen(q: torch.Tensor) -> torch.Tensor:
    """``q`` as fp32 in this thread's scratch buffer (the same contract as :func:`_dequant`)."""
    return _SCRATCH.take(*q.shape).copy_(q)


def _dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in fp32: one scale per row (``scale`` 1-D) or per group of a row (2-D).

    The result is a view of this thread's scratch buffer, valid until the next call: use it
    at once, and never keep it (``ctx.save_for_backward`` keeps ``q`` and ``scale`` instead)."""
    rows, cols = q.shape
    out = _widen(q)  # widen, then scale in place: one mixed int8 x fp32 mul is about 3x slower
    if scale.dim() == 1:
        return out.mul_(scale[:, None])
    groups = scale.shape[1]
    out.view(rows, groups, cols // groups).mul_(scale[:, :, None])
    return out


class _Int8Linear(torch.autograd.Function):
    """``x @ (q * scale)^T = (x @ q^T) * scale``; saves only the int8 weight.

    A row scale commutes with the matmul, so it is applied to the output (``tokens x out``
    values) rather than to the weight (``out x in``): the weight is only widened to fp32,
    forward and backward, which halves what dequantizing costs a step."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, _widen(q)).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        q, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g = grad.reshape(-1, grad.shape[-1])
        scaled = torch.mul(g, scale, out=_SCRATCH.take(g.shape[0], g.shape[1], slot=2))  # consumed at once, by the matmul
        return (scaled @ _widen(q)).view(*grad.shape[:-1], q.shape[1]), None, None


class _Int8Head(torch.autograd.Function):
    """Logits ``h @ (q * scale)^T`` over the vocabulary, ``HEAD_BLOCK`` rows of the table at a time."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        out = h.new_empty((*h.shape[:-1], q.shape[0]))
        for s in range(0, q.shape[0], HEAD_BLOCK):
            out[..., s : s + HEAD_BLOCK] = h @ _dequant(q[s : s + HEAD_BLOCK], scale[s : s + HEAD_BLOCK]).T
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        q, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dh = grad.new_zeros((*grad.shape[:-1], q.shape[1]))
        for s in range(0, q.shape[0], HEAD_BLOCK):
            dh += grad[..., s : s + HEAD_BLOCK] @ _dequant(q[s : s + HEAD_BLOCK], scale[s : s + HEAD_BLOCK])
        return dh, None, None


class _Int8HeadLoss(torch.autograd.Function):
    """``sum_i CE(h_i @ W^T, y_i)`` for ``W = q * scale``, in vocabulary blocks (online log-sum-exp).

    Each block's logits are computed into scratch buffer 1 and worked on in place (exp,
    softmax, its gradient), so a step allocates nothing per block: with glibc's fixed mmap
    threshold each fresh ``tokens x HEAD_BLOCK`` temporary (2 MB on the Pi 4 profile) is a
    new mapping and 512 page faults, and a step's 48 blocks made two or three each."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        run_max = h.new_full((n,), -math.inf)
        run_sum = h.new_zeros(n)
        target = h.new_zeros(n)
        rows = torch.arange(n)
        for s in range(0, q.shape[0], HEAD_BLOCK):
            w = _dequant(q[s : s + HEAD_BLOCK], scale[s : s + HEAD_BLOCK])
            logits = torch.mm(h, w.T, out=_SCRATCH.take(n, w.shape[0], slot=1))
            inside = (y >= s) & (y < s + w.shape[0])
            target[inside] = logits[rows[inside], y[inside] - s]
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(h, q, scale, y, lse)
        return (lse - target).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        h, q, scale, y, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        n = h.shape[0]
        dh = torch.zeros_like(h)
        rows = torch.arange(n)
        for s in range(0, q.shape[0], HEAD_BLOCK):
            w = _dequant(q[s : s + HEAD_BLOCK], scale[s : s + HEAD_BLOCK])
            p = torch.mm(h, w.T, out=_SCRATCH.take(n, w.shape[0], slot=1)).sub_(lse[:, None]).exp_()  # this block's softmax
            inside = (y >= s) & (y < s + w.shape[0])
            p[rows[inside], y[inside] - s] -= 1.0
            dh.addmm_(p.mul_(grad), w)
        return dh, None, None, None


class LoRA(torch.nn.Module):
    """peft's LoRA on one linear layer: ``B(A(x)) * alpha / r`` (A: kaiming-uniform, B: zeros)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = torch.nn.Linear(in_features, r, bias=False)
        self.lora_B = torch.nn.Linear(r, out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scaling goes on B (out x r values), not on the output (tokens x out): the same
        # product, one activation-sized temporary fewer.
        return F.linear(self.lora_A(x), self.lora_B.weight * self.scaling)


class _Frozen(torch.nn.Module):
    """A frozen table: int8 values and their scales (``weight_scale`` empty: fp32 values)."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_q", q, persistent=False)
        self.register_buffer("weight_scale", scale if scale is not None else torch.empty(0), persistent=False)


class QLinear(_Frozen):
    """A frozen linear layer (int8 weight and row scales, or fp32), with an optional LoRA."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__(q, scale)
        self.out_features, self.in_features = q.shape
        self.lora: LoRA | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale.numel():
            y = _Int8Linear.apply(x, self.weight_q, self.weight_scale)
        else:
            y = F.linear(x, self.weight_q)
        return y if self.lora is None else y.add_(self.lora(x))  # in place: the base output is not saved for the backward


class RMSNorm(torch.nn.Module):
    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float32), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions as transformers' Llama applies them, ``x cos + rotate_half(x) sin``, with
    ``rotate_half(x) sin = roll(x, half) * signed_sin`` (``signed_sin``: the first half negated):
    two temporaries instead of five."""
    return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: SimpleNamespace, linears: dict[str, QLinear], norms: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.mlp = torch.nn.Module()
        for name, module in linears.items():
            setattr(getattr(self, PROJECTIONS[name]), name, module)
        self.input_layernorm = RMSNorm(norms[0], cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(norms[1], cfg.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a: Any = self.self_attn
        m: Any = self.mlp
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = a.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        x = x + a.o_proj(att.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


class Embedding(_Frozen):
    """The frozen input embedding (int8 rows and group scales, or fp32); also the tied output head."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_q)
        if not self.weight_scale.numel():
            return rows
        scale = self.weight_scale[ids]
        if scale.dim() == ids.dim():  # one scale per row
            return rows.to(torch.float32) * scale.unsqueeze(-1)
        groups = scale.shape[-1]
        out = rows.to(torch.float32).view(*rows.shape[:-1], groups, rows.shape[-1] // groups) * scale.unsqueeze(-1)
        return out.view(rows.shape)


class Head(torch.nn.Module):
    """hidden -> logits, from an int8 (or fp32) table of ``[vocab, hidden]``."""

    def __init__(self, table: Embedding | QLinear) -> None:
        super().__init__()
        self.table = table

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, scale = self.table.weight_q, self.table.weight_scale
        return _Int8Head.apply(h, q, scale) if scale.numel() else h @ q.T

    def loss_sum(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The summed next-token cross-entropy of hidden states ``h`` ``[N, H]`` against ``y`` ``[N]``."""
        q, scale = self.table.weight_q, self.table.weight_scale
        if scale.numel():
            return _Int8HeadLoss.apply(h, q, scale, y)
        return F.cross_entropy(h @ q.T, y, reduction="sum")


class Backbone(torch.nn.Module):
    def __init__(self, cfg: SimpleNamespace, embed: Embedding, layers: list[DecoderLayer], norm: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed
        self.layers = torch.nn.ModuleList(layers)
        self.norm = RMSNorm(norm, cfg.rms_norm_eps)
        self.checkpointing = False
        dim = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        t = input_ids.shape[1]
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        half = sin.shape[-1] // 2
        cos, sin = emb.cos()[None, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[None, None]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return SimpleNamespace(last_hidden_state=self.norm(x))


class LeanCausalLM(torch.nn.Module):
    """What :mod:`edge_agent.train` needs of a causal LM, without transformers."""

    def __init__(self, cfg: SimpleNamespace, backbone: Backbone, head: Head) -> None:
        super().__init__()
        self.config = cfg
        self.model = backbone
        self.lm_head = head
        self.lora_names: dict[str, torch.Tensor] = {}

    def get_input_embeddings(self) -> Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> Head:
        return self.lm_head

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.model.checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        self.model.checkpointing = True

    def activation_checkpointing_disable(self) -> None:
        self.model.checkpointing = False

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, use_cache: bool = False) -> SimpleNamespace:
        hidden = self.model(input_ids).last_hidden_state
        if labels is None:
            return SimpleNamespace(logits=self.lm_head(hidden), loss=None)
        y = labels[:, 1:].reshape(-1)
        loss = self.lm_head.loss_sum(hidden[:, :-1].reshape(-1, hidden.shape[-1]), y) / y.numel()
        return SimpleNamespace(logits=None, loss=loss)

    # -- LoRA, as peft names it ----------------------------------------------------------

    def attach_lora(self, r: int, alpha: float, targets: list[str], seed: int = 0) -> None:
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown:
            raise ModelError(f"cannot attach LoRA to {unknown}: the lean runtime's Llama layers have {sorted(PROJECTIONS)}")
        torch.manual_seed(seed)
        self.lora_names = {}
        for i, layer in enumerate(self.model.layers):
            for name in targets:
                lin: QLinear = getattr(getattr(layer, PROJECTIONS[name]), name)
                lin.lora = LoRA(lin.in_features, lin.out_features, r, alpha)
                prefix = f"base_model.model.model.layers.{i}.{PROJECTIONS[name]}.{name}"
                self.lora_names[f"{prefix}.lora_A.weight"] = lin.lora.lora_A.weight
                self.lora_names[f"{prefix}.lora_B.weight"] = lin.lora.lora_B.weight

    def get_trainable(self) -> dict[str, np.ndarray]:
        return {k: p.detach().to(torch.float32).numpy().copy() for k, p in self.lora_names.items()}

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        missing, extra = sorted(set(self.lora_names) - set(tensors)), sorted(set(tensors) - set(self.lora_names))
        if missing or extra:
            raise ModelError(f"global state does not match this model's adapters: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, p in self.lora_names.items():
            arr = tensors[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise ModelError(f"global tensor {name!r} has shape {tuple(arr.shape)}, model has {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))


# -- the cache's lean files ---------------------------------------------------------------


def _config(raw: Any) -> SimpleNamespace:
    if not isinstance(raw, dict):
        raise ModelError(f"a lean model config must be a JSON object, not {type(raw).__name__}")
    try:
        return _fields(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"the lean model config lacks or mangles a field ({type(exc).__name__}: {exc})") from None


def _fields(raw: dict[str, Any]) -> SimpleNamespace:
    if raw.get("model_type") not in SUPPORTED:
        raise ModelError(
            f"the lean runtime runs {SUPPORTED} models, this one is {raw.get('model_type')!r}; set model.runtime = 'transformers'"
        )
    # transformers >= 5 keeps RoPE's settings in rope_parameters; older configs in rope_theta / rope_scaling.
    params = raw.get("rope_parameters") or {}
    rope = raw.get("rope_scaling") or params
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise ModelError(f"the lean runtime supports plain RoPE only, this model has {rope}; set model.runtime = 'transformers'")
    theta = params.get("rope_theta") or raw.get("rope_theta") or 10000.0
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ModelError("the lean runtime supports Llama layers without biases; set model.runtime = 'transformers'")
    heads = int(raw["num_attention_heads"])
    return SimpleNamespace(
        model_type=raw["model_type"],
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_id=raw.get("eos_token_id"),
        fedge_eos_token_id=raw.get("fedge_eos_token_id"),
    )


def write_lean(hf_model: Any, out: Path, quantize: bool = True, eos_token_id: int | None = None) -> None:
    """The lean files of a loaded fp32 transformers Llama, into ``out`` (its config stays raw JSON,
    with the tokenizer's end-of-text id, which may differ from the config's)."""
    from safetensors.torch import save_file

    raw = hf_model.config.to_dict()
    _config(raw)  # refuse what the runtime cannot run, at build time
    if eos_token_id is not None:
        raw["fedge_eos_token_id"] = int(eos_token_id)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and raw.get("tie_word_embeddings"):
            continue
        t = t.detach().to(torch.float32).contiguous()
        if quantize and t.dim() == 2:
            quantizer = quantize_groups if name == "model.embed_tokens.weight" else quantize_rows
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = quantizer(t)
        else:
            tensors[name] = t
    save_file(tensors, str(out / LEAN_WEIGHTS))
    (out / LEAN_CONFIG).write_text(json.dumps(raw, sort_keys=True, default=str))


def load_lean(path: Path) -> LeanCausalLM:
    """The lean model from a cache directory; raises :class:`ModelError` for a file that is damaged,
    truncated, or holds tensors of other shapes than its config says (the agent's disk is not trusted)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = json.loads((path / LEAN_CONFIG).read_text())
        state = load_file(str(path / LEAN_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"the lean weights in {path} are unreadable ({exc}); delete the cache to rebuild") from None
    cfg = _config(raw)

    def weight(name: str, *shape: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if f"{name}.q" in state:
            q, scale = state[f"{name}.q"], state.get(f"{name}.scale")
        elif name in state:
            q, scale = state[name], None
        else:
            raise ModelError(f"the lean weights in {path} lack {name!r}; delete the cache to rebuild")
        ok = tuple(q.shape) == shape and q.dtype == (torch.int8 if f"{name}.q" in state else torch.float32)
        if scale is not None:  # one scale per row, or per group of a row
            ok = ok and scale.dtype == torch.float32 and scale.dim() in (1, 2) and scale.shape[0] == shape[0]
            ok = ok and (scale.dim() == 1 or shape[1] % scale.shape[1] == 0)
        elif f"{name}.q" in state:
            ok = False
        if not ok:
            raise ModelError(
                f"the lean weights in {path} hold {name!r} in another shape or type than the config's {shape}; delete the cache"
            )
        return q, scale

    h, kv, ffn = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {
        "q_proj": (cfg.num_attention_heads * cfg.head_dim, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, cfg.num_attention_heads * cfg.head_dim),
        "gate_proj": (ffn, h),
        "up_proj": (ffn, h),
        "down_proj": (h, ffn),
    }
    embed = Embedding(*weight("model.embed_tokens.weight", cfg.vocab_size, h))
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        linears = {n: QLinear(*weight(f"{p}.{PROJECTIONS[n]}.{n}.weight", *shapes[n])) for n in PROJECTIONS}
        norms = (weight(f"{p}.input_layernorm.weight", h)[0], weight(f"{p}.post_attention_layernorm.weight", h)[0])
        layers.append(DecoderLayer(cfg, linears, norms))
    head = Head(embed if cfg.tie_word_embeddings else QLinear(*weight("lm_head.weight", cfg.vocab_size, h)))
    model = LeanCausalLM(cfg, Backbone(cfg, embed, layers, weight("model.norm.weight", h)[0]), head)
    model.eval()
    return model


class LeanTokenizer:
    """The part of a transformers tokenizer the agent uses, from ``tokenizer.json`` (``tokenizers``)."""

    def __init__(self, path: Path, eos_token_id: int | None) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - the Rust library raises its own exception type
            raise ModelError(f"{path / 'tokenizer.json'}: cannot load the tokenizer ({exc})") from None
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id
        config = _tokenizer_config(path)
        self.chat_template = _chat_template(path, config)
        self._special = _special_tokens(config)
        self._template: Any = None

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        """``messages`` rendered with the model's chat template, as transformers renders it
        (a sandboxed Jinja environment, blocks trimmed); the template is compiled once."""
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template")
        if tokenize:
            raise ValueError("the lean tokenizer renders chat templates to text only")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return str(self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._special))

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))


def _tokenizer_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The chat template transformers saved beside the tokenizer (``chat_template.jinja``, or
    the ``chat_template`` of ``tokenizer_config.json``), or ``None``."""
    try:
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    except OSError:
        pass
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The special tokens a chat template may name (``bos_token``, ``eos_token``)."""
    out = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def load(path: Path) -> tuple[LeanCausalLM, LeanTokenizer]:
    model = load_lean(path)
    eos = model.config.fedge_eos_token_id if model.config.fedge_eos_token_id is not None else model.config.eos_token_id
    return model, LeanTokenizer(path, int(eos[0] if isinstance(eos, list) else eos) if eos is not None else None)
