"""The global LoRA adapter as a GGUF adapter, which llama.cpp loads beside its base (``--lora``).

llama.cpp reads a LoRA adapter as a GGUF file of ``general.type = "adapter"``,
``adapter.type = "lora"`` and ``adapter.lora.alpha``, holding for every adapted base tensor
``blk.N.attn_q.weight`` a pair ``blk.N.attn_q.weight.lora_a`` (PEFT's A, ``r x in``) and
``.lora_b`` (PEFT's B, ``out x r``); it applies ``B @ A * alpha / r``, as PEFT does.

One thing differs from PEFT's layout: llama.cpp's converter reorders the rows of a Llama
base's ``q_proj`` and ``k_proj`` (within each head, the two rotary halves are interleaved),
so the B of those projections gets the same reordering; A, and the other projections, are
unchanged. The base tensors' names and shapes are read from the base GGUF itself and every
pair is checked against them, so an adapter that llama.cpp would refuse, or apply to the
wrong rows, is never written. The file is then read back and compared with the global state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.errors import ConfigError, StoreError

ARCHITECTURES = ("llama",)
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def to_gguf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's row order of a q/k projection (each head: first rotary half, then second) -> GGUF's (pairs interleaved)."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def from_gguf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`to_gguf_rows`."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


@dataclass
class GGUFBase:
    """What an adapter must match in its base: the architecture, the heads, and each tensor's ``(out, in)``."""

    path: Path
    arch: str
    heads: int
    kv_heads: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        raise ConfigError(f"the base GGUF lacks {key!r}")
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0]


def read_base(path: Path) -> GGUFBase:
    """The base GGUF's architecture, heads and tensor shapes (numpy order, ``(out, in)``)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in the reader's own ways (struct, numpy, index errors)
        raise ConfigError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = str(_field(reader, "general.architecture"))
    if arch not in ARCHITECTURES:
        raise ConfigError(f"GGUF adapters are exported for {ARCHITECTURES} bases; {path.name} is {arch!r}")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_key = f"{arch}.attention.head_count_kv"
    base = GGUFBase(path, arch, heads, int(_field(reader, kv_key)) if kv_key in reader.fields else heads)
    for t in reader.tensors:
        base.shapes[t.name] = tuple(int(d) for d in reversed(list(t.shape)))
    return base


def adapter_tensors(state: dict[str, np.ndarray], base: GGUFBase) -> dict[str, np.ndarray]:
    """The GGUF pairs of a PEFT-named LoRA state, checked against the base's tensors."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m is None or m.group(2) not in GGUF_NAMES:
            raise ConfigError(f"{key!r} is not a LoRA tensor of a Llama projection; it has no GGUF adapter form")
        layer, proj, half = int(m.group(1)), m.group(2), m.group(3)
        pairs.setdefault(f"blk.{layer}.{GGUF_NAMES[proj]}.weight", {})[half] = value.astype(np.float32)
    out: dict[str, np.ndarray] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ConfigError(f"{name}: the global state holds only lora_{''.join(pair)}; both halves are needed")
        a, b = pair["A"], pair["B"]
        shape = base.shapes.get(name)
        if shape is None:
            raise ConfigError(f"the base {base.path.name} has no tensor {name!r} for this adapter")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != shape:
            raise ConfigError(f"{name}: LoRA A {a.shape} and B {b.shape} do not fit the base's {shape}")
        if name.endswith(".attn_q.weight"):
            b = to_gguf_rows(b, base.heads)
        elif name.endswith(".attn_k.weight"):
            b = to_gguf_rows(b, base.kv_heads)
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return out


def write_adapter(path: Path, tensors: dict[str, np.ndarray], alpha: float, arch: str, version: int) -> None:
    """Write the adapter file (fp32 tensors), fsynced."""
    import os

    from gguf import GGUFType, GGUFWriter, Keys

    writer = GGUFWriter(str(path), arch)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(f"fedge global version {version}")
    writer.add_uint32("fedge.version", int(version))
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def check_adapter(path: Path, tensors: dict[str, np.ndarray], alpha: float, arch: str) -> None:
    """Read the written file back: its type, alpha, architecture and every tensor, bit for bit."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    got_alpha = float(_field(reader, "adapter.lora.alpha"))
    kind = (_field(reader, "general.type"), _field(reader, "adapter.type"), _field(reader, "general.architecture"))
    if kind != ("adapter", "lora", arch) or got_alpha != float(np.float32(alpha)):
        raise StoreError(f"{path.name} reads back as {kind} with alpha {got_alpha}, not a {arch} LoRA adapter with alpha {alpha}")
    back = {t.name: np.asarray(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in reader.tensors}
    wrong = [k for k in tensors if k not in back or not np.array_equal(back[k], tensors[k])]
    if wrong or len(back) != len(tensors):
        raise StoreError(f"{path.name} does not read back as written (first mismatches: {wrong[:3]})")


def export_adapter(out: Path, state: dict[str, np.ndarray], alpha: float, base_gguf: Path, version: int) -> dict[str, Any]:
    """``out`` (a new file): the GGUF adapter of ``state`` for ``base_gguf``; a report of what was written."""
    base = read_base(base_gguf)
    tensors = adapter_tensors(state, base)
    write_adapter(out, tensors, alpha, base.arch, version)
    check_adapter(out, tensors, alpha, base.arch)
    return {"file": str(out), "base": str(base_gguf), "pairs": len(tensors) // 2, "bytes": out.stat().st_size}
