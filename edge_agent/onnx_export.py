"""Export a merged Llama model to ONNX with a KV cache and 8-bit weights, checked against torch.

The graph is built from an explicit, export-friendly forward (:class:`KVLlama`) that reads
the merged model's own weights, rotary frequencies and norms, so it does not depend on how
a given transformers release traces its cache classes. One graph serves prefill and decode:

    inputs:  input_ids [1, q] int64, past_key_<i> / past_value_<i> [1, kv_heads, p, head_dim] fp32
    outputs: logits [1, q, vocab] fp32, present_key_<i> / present_value_<i> [1, kv_heads, p + q, head_dim]

Weights are quantized 8-bit weight-only with ``MatMulNBits`` (block 32, symmetric,
``accuracy_level=4``: int8 activations in the kernel). ``onnxruntime.quantization.quantize_dynamic``
is not used: it breaks this model (top-1 agreement with torch falls to 64%).

Nothing is published unless it passes the check on held-out text: along torch's greedy
continuations of the text's first tokens, the export must pick torch's token at ``min_top1``
of the steps; teacher-forced over the whole text, at ``min_top1_text`` of the positions.
Both are floors that catch a broken export (``quantize_dynamic`` scores 64%), not 100%:
positions where torch's two best tokens are within a few tenths of a logit flip under any
8-bit weights (SmolLM2: 96-97% with int8 activations, 98.5% even with fp32 activations);
its NLL must be within ``max_rel_nll`` of torch's; and greedy generation of the example
prompt must give the same tokens. The directory is written by temp dir and rename.

    python -m edge_agent.onnx_export --model MERGED_DIR --out OUT_DIR [--no-quantize]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ModelError
from edge_agent.inference import META_FILE, MODEL_FILE, OnnxSession

log = logging.getLogger(__name__)
EXAMPLE_PROMPT = "def fibonacci(n):\n"
MAX_POSITIONS = 8192
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Federated learning trains a shared model on many devices "
    "while the data stays where it was written, and only small updates travel over the network.",
    "import json\n\ndef load_config(path):\n    with open(path) as fh:\n        data = json.load(fh)\n"
    "    if 'name' not in data:\n        raise ValueError('config needs a name')\n    return data\n",
    "A Raspberry Pi draws a few watts, has four cores and a few gigabytes of memory. It can fine-tune a small "
    "language model overnight when it is idle and plugged in.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        print(i, 'is odd')\n",
)
"""Held-out text for the check when the caller has none of its own (not used for training)."""


class ExportError(ModelError):
    """The model could not be exported, or the export failed its check (nothing was written)."""


@dataclass(frozen=True)
class CheckResult:
    positions: int
    top1_agreement: float
    """Along torch's greedy continuations of the check prompts: how often the export's next-token
    argmax is the token torch chose (what decoding sees)."""
    top1_agreement_text: float
    """Teacher-forced over the check texts: also counts positions where torch's two best tokens
    are nearly tied, which any 8-bit weights flip now and then."""
    nll_torch: float
    nll_onnx: float
    rel_nll_increase: float
    greedy_equal: bool
    greedy_torch: str
    greedy_onnx: str


@dataclass(frozen=True)
class ExportReport:
    out: str
    quantized: bool
    size_mb: float
    seconds: float
    check: CheckResult
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    extra: dict[str, Any] = field(default_factory=dict)


def _torch() -> Any:
    import torch

    return torch


def build_kv_module(hf_model: Any) -> Any:
    """An export-friendly forward over ``hf_model``'s weights (a Llama causal LM, fp32, merged)."""
    torch = _torch()
    nn = torch.nn
    cfg = hf_model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ExportError(f"ONNX export supports Llama models, not {getattr(cfg, 'model_type', None)!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ExportError("ONNX export does not support attention or MLP biases")
    inner = hf_model.model
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", heads) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    class KVLlama(nn.Module):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.layers = inner.layers
            self.norm = inner.norm
            self.embed = nn.Parameter(inner.embed_tokens.weight.detach().clone(), requires_grad=False)
            # A separate, pre-transposed head weight even when tied: the head becomes its own
            # MatMul on an initializer (which the 8-bit quantizer takes) while the embedding
            # stays an fp32 Gather.
            head = hf_model.get_output_embeddings().weight.detach()
            self.head_t = nn.Parameter(head.t().contiguous(), requires_grad=False)
            rotary = inner.rotary_emb
            self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
            self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

        @staticmethod
        def _rotate(x: Any) -> Any:
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        def forward(self, input_ids: Any, *past: Any) -> Any:
            q_len = input_ids.shape[1]
            past_len = past[0].shape[2]
            pos = torch.arange(q_len, dtype=torch.float32) + past_len
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * self.rope_scale)[None, None]
            sin = (emb.sin() * self.rope_scale)[None, None]
            total = past_len + q_len
            allowed = torch.arange(total)[None, :] <= (torch.arange(q_len) + past_len)[:, None]
            mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
            h = torch.nn.functional.embedding(input_ids, self.embed)
            presents = []
            for i, layer in enumerate(self.layers):
                att = layer.self_attn
                x = layer.input_layernorm(h)
                q = att.q_proj(x).view(1, q_len, heads, head_dim).transpose(1, 2)
                k = att.k_proj(x).view(1, q_len, kv_heads, head_dim).transpose(1, 2)
                v = att.v_proj(x).view(1, q_len, kv_heads, head_dim).transpose(1, 2)
                q = q * cos + self._rotate(q) * sin
                k = k * cos + self._rotate(k) * sin
                k = torch.cat((past[2 * i], k), dim=2)
                v = torch.cat((past[2 * i + 1], v), dim=2)
                presents += [k, v]
                rep = heads // kv_heads
                kr = k[:, :, None].expand(1, kv_heads, rep, total, head_dim).reshape(1, heads, total, head_dim)
                vr = v[:, :, None].expand(1, kv_heads, rep, total, head_dim).reshape(1, heads, total, head_dim)
                scores = torch.matmul(q, kr.transpose(2, 3)) * (head_dim**-0.5) + mask
                out = torch.matmul(torch.softmax(scores, dim=-1), vr)
                h = h + att.o_proj(out.transpose(1, 2).reshape(1, q_len, heads * head_dim))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = torch.matmul(self.norm(h), self.head_t)
            return (logits, *presents)

    module = KVLlama().eval()
    module.n_layers = len(inner.layers)  # type: ignore[assignment]
    module.kv_heads = kv_heads  # type: ignore[assignment]
    module.head_dim = head_dim  # type: ignore[assignment]
    return module


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def _export_graph(module: Any, path: Path) -> None:
    """torch.export-based ONNX export with dynamic prompt and cache lengths (an empty cache included)."""
    torch = _torch()
    layers = module.n_layers
    ids = torch.tensor([[1, 2, 3]], dtype=torch.long)
    past = [torch.zeros(1, module.kv_heads, 2, module.head_dim) for _ in range(2 * layers)]
    inputs, outputs = io_names(layers)
    q = torch.export.Dim("q", min=1, max=MAX_POSITIONS)
    p = torch.export.Dim("past", min=0, max=MAX_POSITIONS)
    shapes = ({1: q}, tuple({2: p} for _ in range(2 * layers)))
    with torch.no_grad():
        torch.onnx.export(
            module,
            (ids, *past),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=shapes,
            dynamo=True,
            opset_version=18,
            external_data=False,
            verbose=False,
        )


def _quantize(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quant = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
    quant.process()
    quant.model.save_model_to_file(str(dst), use_external_data_format=False)


def greedy_onnx(session: OnnxSession, ids: list[int], max_new: int, eos: int | None) -> list[int]:
    logits, cache = session.step(ids, session.empty_cache())
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
        if eos is not None and nxt == eos:
            break
        logits, cache = session.step([nxt], cache)
    return out


def greedy_torch(model: Any, ids: list[int], max_new: int, eos: int | None) -> list[int]:
    torch = _torch()
    with torch.no_grad():
        res = model(input_ids=torch.tensor([ids]), use_cache=True)
        cache, logits = res.past_key_values, res.logits[0]
        out: list[int] = []
        for _ in range(max_new):
            nxt = int(torch.argmax(logits[-1]))
            out.append(nxt)
            if eos is not None and nxt == eos:
                break
            res = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            cache, logits = res.past_key_values, res.logits[0]
    return out


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]


def check_against_torch(
    model: Any, tokenizer: Any, onnx_path: Path, texts: tuple[str, ...] | list[str], *, threads: int = 2, new_tokens: int = 24
) -> CheckResult:
    """Compare the export with torch on ``texts`` (see :class:`CheckResult`) and on the example prompt."""
    torch = _torch()
    session = OnnxSession(onnx_path, threads)
    text_agree = text_total = dec_agree = dec_total = 0
    nll_t: list[np.ndarray] = []
    nll_o: list[np.ndarray] = []
    for text in texts:
        ids = tokenizer.encode(text)[:256]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        got, _ = session.step(ids, session.empty_cache())
        text_agree += int((ref[:-1].argmax(-1) == got[:-1].argmax(-1)).sum())
        text_total += len(ids) - 1
        target = np.asarray(ids[1:])
        nll_t.append(token_nll(ref[:-1].astype(np.float64), target))
        nll_o.append(token_nll(got[:-1].astype(np.float64), target))
        # Decoding: torch continues the first tokens greedily; the export, fed the same tokens,
        # must pick the token torch picked at each generated position.
        prompt = ids[: min(32, len(ids) - 1)]
        cont = greedy_torch(model, prompt, new_tokens, None)
        seq = prompt + cont
        logits, _ = session.step(seq[:-1], session.empty_cache())
        picks = logits[len(prompt) - 1 :].argmax(-1)
        dec_agree += int((picks == np.asarray(cont)).sum())
        dec_total += len(cont)
    if text_total == 0:
        raise ExportError("the check texts are empty after tokenization")
    nt, no = float(np.concatenate(nll_t).mean()), float(np.concatenate(nll_o).mean())
    prompt = tokenizer.encode(EXAMPLE_PROMPT)
    eos = getattr(tokenizer, "eos_token_id", None)
    g_t = greedy_torch(model, prompt, new_tokens, eos)
    g_o = greedy_onnx(session, prompt, new_tokens, eos)
    return CheckResult(
        positions=text_total,
        top1_agreement=dec_agree / dec_total,
        top1_agreement_text=text_agree / text_total,
        nll_torch=nt,
        nll_onnx=no,
        rel_nll_increase=(no - nt) / nt,
        greedy_equal=g_t == g_o,
        greedy_torch=tokenizer.decode(g_t),
        greedy_onnx=tokenizer.decode(g_o),
    )


def export_onnx(
    model_dir: str | Path,
    out: str | Path,
    *,
    quantize: bool = True,
    check_texts: tuple[str, ...] | list[str] = CHECK_TEXTS,
    min_top1: float = 0.95,
    min_top1_text: float = 0.9,
    max_rel_nll: float = 0.01,
    require_greedy_equal: bool = True,
    threads: int = 2,
) -> ExportReport:
    """Export the model in ``model_dir`` (a merged Hugging Face directory) to ``out``; see the module doc."""
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new directory")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a model directory (no config.json); export the merged model first")
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    module = build_kv_module(model)
    # The explicit forward must reproduce the model before anything is exported.
    probe = torch.tensor([tokenizer.encode(CHECK_TEXTS[1])[:48]])
    with torch.no_grad():
        ref = model(input_ids=probe).logits
        past = [torch.zeros(1, module.kv_heads, 0, module.head_dim) for _ in range(2 * module.n_layers)]
        mine = module(probe, *past)[0]
    diff = float((ref - mine).abs().max())
    if diff > 1e-3:
        raise ExportError(f"the export graph differs from the model by {diff:.2e} in its logits")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fp32 = tmp / ("model-fp32.onnx" if quantize else MODEL_FILE)
        log.info("exporting %d layers to ONNX ...", module.n_layers)
        _export_graph(module, fp32)
        if quantize:
            log.info("quantizing weights to 8 bits (MatMulNBits, block 32, accuracy_level 4) ...")
            _quantize(fp32, tmp / MODEL_FILE)
            fp32.unlink()
        log.info("checking the exported model against torch ...")
        check = check_against_torch(model, tokenizer, tmp / MODEL_FILE, check_texts, threads=threads)
        problems = []
        if check.top1_agreement < min_top1:
            problems.append(f"top-1 agreement along greedy decoding {check.top1_agreement:.2%} < {min_top1:.0%}")
        if check.top1_agreement_text < min_top1_text:
            problems.append(f"top-1 agreement on the text {check.top1_agreement_text:.2%} < {min_top1_text:.0%}")
        if check.rel_nll_increase > max_rel_nll:
            problems.append(f"NLL {check.nll_onnx:.4f} vs torch {check.nll_torch:.4f} (+{check.rel_nll_increase:.2%} > {max_rel_nll:.0%})")
        if require_greedy_equal and not check.greedy_equal:
            problems.append(f"greedy text differs: torch {check.greedy_torch!r}, onnx {check.greedy_onnx!r}")
        if problems:
            raise ExportError("the exported model failed its check, nothing was written: " + "; ".join(problems))
        tokenizer.save_pretrained(str(tmp))
        size_mb = (tmp / MODEL_FILE).stat().st_size / 2**20
        report = ExportReport(
            out=str(out),
            quantized=quantize,
            size_mb=round(size_mb, 1),
            seconds=round(time.monotonic() - t0, 1),
            check=check,
            layers=module.n_layers,
            kv_heads=module.kv_heads,
            head_dim=module.head_dim,
            vocab=int(model.config.vocab_size),
            extra={"source": str(model_dir), "example_prompt": EXAMPLE_PROMPT},
        )
        meta = tmp / META_FILE
        meta.write_text(json.dumps(asdict(report), indent=1))
        for path in tmp.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%.0f MB): top-1 %.2f%%, NLL %+.2f%%", out, size_mb, 100 * check.top1_agreement, 100 * check.rel_nll_increase)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a merged model to ONNX (KV cache, 8-bit weights), checked against torch.")
    parser.add_argument("--model", required=True, help="merged model directory (config.json, weights, tokenizer)")
    parser.add_argument("--out", required=True, help="new directory to write")
    parser.add_argument("--no-quantize", action="store_true", help="keep fp32 weights")
    parser.add_argument("--check-text", action="append", default=[], help="file of held-out text for the check (repeatable)")
    parser.add_argument("--min-top1", type=float, default=0.95, help="top-1 agreement along greedy decoding")
    parser.add_argument("--min-top1-text", type=float, default=0.9, help="teacher-forced top-1 agreement over the text")
    parser.add_argument("--max-rel-nll", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    texts: list[str] = []
    for f in args.check_text:
        try:
            texts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            log.error("cannot read --check-text %s: %s", f, exc.strerror)
            return 2
    try:
        report = export_onnx(
            args.model,
            args.out,
            quantize=not args.no_quantize,
            check_texts=texts or CHECK_TEXTS,
            min_top1=args.min_top1,
            min_top1_text=args.min_top1_text,
            max_rel_nll=args.max_rel_nll,
            threads=args.threads,
        )
    except ExportError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
