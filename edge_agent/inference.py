"""Local inference with an exported ONNX model (see :mod:`edge_agent.onnx_export`): onnxruntime only.

No torch or transformers is imported here, so a device that only serves the model pays
for onnxruntime, numpy and the tokenizer alone.

    from edge_agent.inference import LocalModel
    lm = LocalModel("/var/lib/fedge/onnx")
    print(lm.generate("def fibonacci(n):\\n", max_new_tokens=40).text)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.errors import ModelError

MODEL_FILE = "model.onnx"
META_FILE = "fedge-onnx.json"
MAX_NEW_TOKENS = 4096


class OnnxSession:
    """Prefill and decode with the exported graph's KV cache (batch 1)."""

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load ONNX model {path}: {exc}") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        if len(self.inputs) < 3 or self.inputs[0] != "input_ids" or self.outputs[0] != "logits":
            raise ModelError(f"{path} is not a fedge KV-cache export (inputs {self.inputs[:3]})")
        first = self.session.get_inputs()[1]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.layers = (len(self.inputs) - 1) // 2

    def empty_cache(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]

    def step(self, ids: np.ndarray | list[int], cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``[q, vocab]`` for ``ids`` after ``cache``, and the cache including them."""
        feed = {"input_ids": np.asarray(ids, dtype=np.int64).reshape(1, -1)}
        feed |= dict(zip(self.inputs[1:], cache, strict=True))
        out = self.session.run(self.outputs, feed)
        return out[0][0], list(out[1:])


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_ms: float
    decode_ms_per_token: float
    stopped: str
    """``eos`` or ``length``."""


class LocalModel:
    """An exported model directory: ``model.onnx``, the tokenizer and ``fedge-onnx.json``."""

    def __init__(self, directory: str | Path, threads: int = 2) -> None:
        from tokenizers import Tokenizer

        d = Path(directory)
        if not (d / MODEL_FILE).is_file():
            raise ModelError(f"{d} has no {MODEL_FILE}; export one with `fedge-coordinator export --format onnx`")
        if not (d / "tokenizer.json").is_file():
            raise ModelError(f"{d} has no tokenizer.json")
        self.meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.eos = self._eos(d)
        self.session = OnnxSession(d / MODEL_FILE, threads)

    def _eos(self, d: Path) -> int | None:
        cfg = d / "tokenizer_config.json"
        token = json.loads(cfg.read_text()).get("eos_token") if cfg.is_file() else None
        if isinstance(token, dict):
            token = token.get("content")
        return self.tokenizer.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        on_token: Callable[[str], None] | None = None,
    ) -> Generation:
        """Greedy (``temperature = 0``) or sampled continuation of ``prompt``."""
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ModelError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
        if temperature < 0 or top_k < 0:
            raise ModelError("temperature and top_k must not be negative")
        ids = self.encode(prompt)
        if not ids:
            raise ModelError("the prompt is empty after tokenization")
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        logits, cache = self.session.step(ids, self.session.empty_cache())
        prefill = time.perf_counter() - t0
        out: list[int] = []
        stopped = "length"
        t1 = time.perf_counter()
        for i in range(max_new_tokens):
            nxt = self._pick(logits[-1], temperature, top_k, rng)
            out.append(nxt)
            if on_token is not None:
                on_token(self.decode([nxt]))
            if self.eos is not None and nxt == self.eos:
                stopped = "eos"
                break
            if i + 1 < max_new_tokens:
                logits, cache = self.session.step([nxt], cache)
        decode = (time.perf_counter() - t1) / max(len(out), 1)
        return Generation(self.decode(out), out, len(ids), prefill * 1000, decode * 1000, stopped)

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
        if temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        if top_k:
            cut = np.partition(z, -top_k)[-top_k]
            z = np.where(z >= cut, z, -np.inf)
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))
