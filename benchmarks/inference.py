"""On-device inference: torch fp32 against the ONNX exports (fp32 and 8-bit weights), with a KV cache.

    python -m benchmarks.inference [--model auto|smollm2|tiny] [--threads 2] [--new-tokens 64] [--json]

The model is SmolLM2-135M as the fleet starts from it (version 0: the base; pass
``--merged DIR`` for a merged global model). Each runtime is measured in a fresh process,
so that its peak RSS is its own:

* prefill ms/token over a 128-token prompt, and decode ms/token over greedy generation;
* next-token NLL and argmax on held-out text (pydoc domains, teacher-forced);
* top-1 agreement with torch where decoding sees it: torch continues each held-out text's
  first 32 tokens greedily for 32 tokens, and each runtime, fed the same tokens, names its
  next token at every generated step (``top1_agreement``); also teacher-forced over the
  whole text (``top1_agreement_text``), which counts positions where torch's two best tokens
  are nearly tied;
* greedy text of the README example prompt.

The ONNX exports come from :func:`edge_agent.onnx_export.export_onnx`, which checks them
against torch before writing them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_agent.onnx_export import EXAMPLE_PROMPT, token_nll

RUNTIMES = ("torch-fp32", "ort-fp32", "ort-int8", "llamacpp")
CONFIDENT_MARGIN = 0.5
"""Logits between torch's two best tokens for a position to count in ``confident_top1_agreement``:
8-bit weights flip near-ties (every flip measured had a gap under 0.19), which mean nothing."""
MIN_CONFIDENT_TOP1 = 0.995
MAX_REL_NLL = 0.01


def heldout_texts(n: int = 8) -> list[str]:
    from fedge_lab.corpus import pydoc_domains

    texts = [t for topics in pydoc_domains().values() for t in topics.values()]
    rng = np.random.default_rng(7)
    picks = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[int(i)][:2000] for i in picks]


def prepare_model(kind: str, out: Path) -> Path:
    """A merged Hugging Face directory of the base model (what version 0 merges to)."""
    import torch
    from transformers import AutoModelForCausalLM

    from coordinator.export import _load_base

    if kind == "tiny":
        from edge_agent.tiny import build_tiny_model
        from fedge_lab.corpus import pydoc_domains

        texts = [t for topics in pydoc_domains().values() for t in topics.values()]
        return build_tiny_model(out, texts)
    model, tokenizer = _load_base("smollm2")
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


# -- one runtime, in its own process ---------------------------------------------------


def _nll_argmax(logits: np.ndarray, ids: list[int]) -> tuple[list[float], list[int]]:
    z = logits[:-1].astype(np.float64)
    return token_nll(z, np.asarray(ids[1:])).tolist(), z.argmax(-1).tolist()


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux ``clear_refs``), so a later phase's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _quality(forward: Callable[[list[int]], np.ndarray], shared: dict[str, Any]) -> dict[str, Any]:
    """Teacher-forced NLL and argmax over the held-out texts, and the next-token picks along torch's greedy decoding."""
    nll: list[float] = []
    argmax: list[int] = []
    for ids in shared["texts"]:
        a, b = _nll_argmax(forward(ids), ids)
        nll += a
        argmax += b
    picks: list[int] = []
    margins: list[float] = []
    for prompt, cont in shared["sequences"]:
        logits = forward(prompt + cont[:-1])[len(prompt) - 1 :]
        picks += logits.argmax(-1).tolist()
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margins += (top2[:, 1] - top2[:, 0]).tolist()
    return {"nll": float(np.mean(nll)), "argmax": argmax, "positions": len(argmax), "decode_picks": picks, "decode_margins": margins}


def _speed(
    forward: Callable[[list[int]], Any], greedy: Callable[[list[int], int, int | None], list[int]], shared: dict[str, Any], new_tokens: int
) -> dict[str, Any]:
    """Prefill ms/token over the prompt, decode ms/token over greedy generation, and the example's greedy tokens."""
    prompt_ids = shared["prompt"]
    forward(prompt_ids[:16])  # warm-up
    reps = 3
    t = time.perf_counter()
    for _ in range(reps):
        forward(prompt_ids)
    prefill_ms = (time.perf_counter() - t) / reps / len(prompt_ids) * 1000
    greedy(prompt_ids[:32], 4, None)  # warm-up of the decode path
    t = time.perf_counter()
    gen = greedy(prompt_ids, new_tokens, None)
    total = time.perf_counter() - t
    # Decode time: the whole greedy loop less one prefill of the prompt.
    decode_ms = max(total - prefill_ms * len(prompt_ids) / 1000, 0.0) / max(len(gen) - 1, 1) * 1000
    return {
        "prefill_ms_per_token": prefill_ms,
        "decode_ms_per_token": decode_ms,
        "example_tokens": greedy(shared["example"], 24, shared["eos"]),
    }


def _llamacpp(gguf: Path, adapter: Path | None, threads: int, shared: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) on the GGUF as it ships: quality with every position's logits,
    then, in a fresh context that keeps only the last position's (as serving does), the timings
    and the peak RSS."""
    import llama_cpp

    def make(logits_all: bool) -> Any:
        kwargs: dict[str, Any] = {"lora_path": str(adapter)} if adapter is not None else {}
        return llama_cpp.Llama(
            model_path=str(gguf), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
            logits_all=logits_all, verbose=False, **kwargs,
        )  # fmt: skip

    llm = make(True)

    def forward_all(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    quality = _quality(forward_all, shared)
    llm.close()
    _reset_peak()
    server = make(False)
    vocab = server.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(server.ctx, -1), shape=(vocab,))

    def forward_last(ids: list[int]) -> np.ndarray:
        server.reset()
        server.eval(ids)
        return last_logits()

    def greedy(ids: list[int], n: int, stop: int | None) -> list[int]:
        logits, out = forward_last(ids), []
        for _ in range(n):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if stop is not None and nxt == stop:
                break
            server.eval([nxt])
            logits = last_logits()
        return out

    speed = _speed(forward_last, greedy, shared, new_tokens)
    text = server.detokenize(speed["example_tokens"]).decode("utf-8", "replace")
    server.close()
    return {**quality, **speed, "example_text": text}


def measure(
    runtime: str,
    model_dir: Path,
    onnx_dir: Path | None,
    threads: int,
    new_tokens: int,
    prompt_tokens: int,
    inputs: Path | None,
    gguf: tuple[Path, Path | None] | None = None,
) -> dict[str, Any]:
    """One runtime in this process. The torch run tokenizes the held-out text and writes the token
    ids (and its greedy continuations) that the other runs then read, so that those import
    neither torch nor transformers: their peak RSS is what serving costs on a device."""
    if runtime == "llamacpp":
        assert gguf is not None and inputs is not None
        shared = json.loads(inputs.read_text())
        return {
            "runtime": runtime,
            **_llamacpp(gguf[0], gguf[1], threads, shared, new_tokens),
            "peak_rss_mb": peak_rss_mb(),
            "shared": None,
        }
    if runtime == "torch-fp32":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edge_agent.onnx_export import greedy_torch

        torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        texts = heldout_texts()
        shared: dict[str, Any] = {
            "texts": [tokenizer.encode(t)[:256] for t in texts],
            "prompt": tokenizer.encode(" ".join(texts))[:prompt_tokens],
            "example": tokenizer.encode(EXAMPLE_PROMPT),
            "eos": tokenizer.eos_token_id,
        }
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        decode = tokenizer.decode

        def forward(ids: list[int]) -> np.ndarray:
            with torch.no_grad():
                return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

        def greedy(ids: list[int], n: int, stop: int | None) -> list[int]:
            return greedy_torch(model, ids, n, stop)

        # Decoding fidelity: torch continues each text's first 32 tokens greedily; every runtime,
        # fed those tokens, names its next token at each generated step.
        shared["sequences"] = [[ids[:32], greedy(ids[:32], 32, None)] for ids in shared["texts"]]
    else:
        from tokenizers import Tokenizer

        from edge_agent.inference import OnnxSession
        from edge_agent.onnx_export import greedy_onnx

        assert onnx_dir is not None and inputs is not None
        shared = json.loads(inputs.read_text())
        session = OnnxSession(onnx_dir / "model.onnx", threads)
        decode = Tokenizer.from_file(str(onnx_dir / "tokenizer.json")).decode

        def forward(ids: list[int]) -> np.ndarray:
            return session.step(ids, session.empty_cache())[0]

        def greedy(ids: list[int], n: int, stop: int | None) -> list[int]:
            return greedy_onnx(session, ids, n, stop)

    quality = _quality(forward, shared)
    speed = _speed(forward, greedy, shared, new_tokens)
    return {
        "runtime": runtime,
        **quality,
        **speed,
        "example_text": decode(speed["example_tokens"]),
        "peak_rss_mb": peak_rss_mb(),
        "shared": shared if runtime == "torch-fp32" else None,
    }


def run_child(
    runtime: str,
    args: argparse.Namespace,
    model_dir: Path,
    onnx_dir: Path | None,
    sequences: Path | None,
    gguf: tuple[Path, Path | None] | None,
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.inference", "--measure", runtime, "--merged", str(model_dir)]
    if sequences is not None:
        argv += ["--sequences", str(sequences)]
    if runtime == "llamacpp" and gguf is not None:
        argv += ["--gguf", str(gguf[0])] + (["--gguf-adapter", str(gguf[1])] if gguf[1] is not None else [])
    argv += ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
    if onnx_dir is not None:
        argv += ["--onnx-dir", str(onnx_dir)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} measurement failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--merged", help="a merged model directory to use instead of the base model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--workdir", help="keep the model and exports here (default: a temp dir)")
    parser.add_argument("--gguf", help="the base GGUF for the llama.cpp row (default: SmolLM2's, with the base model)")
    parser.add_argument("--gguf-adapter", help="with --merged and --gguf: the version's adapter.gguf (export --format gguf)")
    parser.add_argument("--measure", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", help=argparse.SUPPRESS)
    parser.add_argument("--sequences", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.measure:
        onnx_dir = Path(args.onnx_dir) if args.onnx_dir else None
        seqs = Path(args.sequences) if args.sequences else None
        gguf = (Path(args.gguf), Path(args.gguf_adapter) if args.gguf_adapter else None) if args.gguf else None
        print(json.dumps(measure(args.measure, Path(args.merged), onnx_dir, args.threads, args.new_tokens, args.prompt_tokens, seqs, gguf)))
        return 0
    from benchmarks.fedsim import smollm2_available
    from edge_agent.onnx_export import export_onnx

    console = Console(stderr=True, width=130)
    t0 = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedge-inference-"))
    work.mkdir(parents=True, exist_ok=True)
    kind = args.model if args.model != "auto" else ("smollm2" if smollm2_available() else "tiny")
    if args.merged:
        model_dir, kind = Path(args.merged), "merged"
    else:
        model_dir = work / f"{kind}-merged"
        if not (model_dir / "config.json").is_file():
            console.print(f"preparing the {kind} model ...")
            prepare_model(kind, model_dir)
    exports: dict[str, Any] = {}
    for name, quantize in (("ort-fp32", False), ("ort-int8", True)):
        out = work / name
        if not (out / "model.onnx").is_file():
            console.print(f"exporting {name} (checked against torch before it is written) ...")
            # The tiny random-init model is only a smoke test: its near-uniform logits make argmax ties.
            # Real models go through the product's own gate (export_onnx's defaults).
            loose = {"min_top1": 0.0, "min_top1_text": 0.0, "max_rel_nll": 1.0, "require_greedy_equal": False} if kind == "tiny" else {}
            export_onnx(model_dir, out, quantize=quantize, threads=args.threads, **loose)  # type: ignore[arg-type]
        exports[name] = out
    gguf = _gguf_for(kind, args, console)
    results: dict[str, dict[str, Any]] = {}
    seq_file = work / "inputs.json"
    for runtime in RUNTIMES:
        if runtime == "llamacpp" and gguf is None:
            continue
        console.print(f"measuring {runtime} in a fresh process ...")
        results[runtime] = run_child(runtime, args, model_dir, exports.get(runtime), seq_file if runtime != "torch-fp32" else None, gguf)
        if runtime == "torch-fp32":
            seq_file.write_text(json.dumps(results[runtime]["shared"]))
    ref = results["torch-fp32"]
    chosen = np.asarray([t for _, cont in ref["shared"]["sequences"] for t in cont])
    confident = np.asarray(ref["decode_margins"]) >= CONFIDENT_MARGIN
    for r in results.values():
        same = np.asarray(r["decode_picks"]) == chosen
        r["top1_agreement"] = float(np.mean(same))
        r["confident_top1_agreement"] = float(np.mean(same[confident])) if confident.any() else 1.0
        r["confident_positions"] = int(confident.sum())
        r["top1_agreement_text"] = float(np.mean(np.asarray(r["argmax"]) == np.asarray(ref["argmax"])))
        r["rel_nll_increase"] = (r["nll"] - ref["nll"]) / ref["nll"]
        r["same_example_text"] = r["example_tokens"] == ref["example_tokens"]
        r["speedup_decode"] = ref["decode_ms_per_token"] / r["decode_ms_per_token"]
        r["speedup_prefill"] = ref["prefill_ms_per_token"] / r["prefill_ms_per_token"]
        path = exports.get(r["runtime"])
        if path is not None:
            r["size_mb"] = round((path / "model.onnx").stat().st_size / 2**20, 1)
        else:
            r["size_mb"] = round(gguf[0].stat().st_size / 2**20, 1) if r["runtime"] == "llamacpp" and gguf else None
        r["passes_gate"] = r["confident_top1_agreement"] >= MIN_CONFIDENT_TOP1 and r["rel_nll_increase"] <= MAX_REL_NLL
    # The recommendation: the fastest decoder among those that pass the quality gate.
    passing = [r for r in results.values() if r["passes_gate"]]
    best = min(passing, key=lambda r: r["decode_ms_per_token"]) if passing else None
    table = Table(title=f"{kind}, {args.threads} threads, prompt {args.prompt_tokens} tokens, greedy {args.new_tokens} new tokens")
    for col in (
        "runtime",
        "prefill ms/token",
        "decode ms/token",
        "decode speedup",
        "file MB",
        "peak RSS MB",
        "top-1 (decode)",
        "top-1 confident",
        "top-1 (text)",
        "NLL",
        "NLL vs torch",
    ):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in results.values():
        table.add_row(
            r["runtime"],
            f"{r['prefill_ms_per_token']:.2f}",
            f"{r['decode_ms_per_token']:.1f}",
            f"{r['speedup_decode']:.2f}x",
            "-" if r["size_mb"] is None else f"{r['size_mb']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['top1_agreement']:.2%}",
            f"{r['confident_top1_agreement']:.2%}",
            f"{r['top1_agreement_text']:.2%}",
            f"{r['nll']:.4f}",
            f"{r['rel_nll_increase']:+.2%}",
        )
    console.print(table)
    console.print(
        f"top-1 confident: decode positions where torch's two best tokens are >= {CONFIDENT_MARGIN} logits apart "
        f"({ref['confident_positions']} of {len(chosen)}); gate: >= {MIN_CONFIDENT_TOP1:.1%} there and NLL within {MAX_REL_NLL:.0%}"
    )
    q = results["ort-int8"]
    console.print(f"example prompt {EXAMPLE_PROMPT!r}: torch {ref['example_text']!r}")
    for r in results.values():
        if r is not ref:
            console.print(f"  {r['runtime']}: {r['example_text']!r} ({'same tokens' if r['same_example_text'] else 'DIFFERENT tokens'})")
    console.print(f"recommended on-device runtime: {best['runtime'] if best else 'none passes the gate'}")
    cpp = results.get("llamacpp")
    out = {
        "model": kind,
        "threads": args.threads,
        "speedup_decode": q["speedup_decode"],
        "speedup_prefill": q["speedup_prefill"],
        "top1_agreement": q["top1_agreement"],
        "top1_agreement_text": q["top1_agreement_text"],
        "rel_nll_increase": q["rel_nll_increase"],
        "size_mb": q["size_mb"],
        "peak_rss_mb": q["peak_rss_mb"],
        "same_example_text": q["same_example_text"],
        "example_prompt": EXAMPLE_PROMPT,
        "example_text": q["example_text"],
        "llamacpp_decode_ms_per_token": cpp["decode_ms_per_token"] if cpp else None,
        "llamacpp_confident_top1_agreement": cpp["confident_top1_agreement"] if cpp else None,
        "llamacpp_rel_nll_increase": cpp["rel_nll_increase"] if cpp else None,
        "recommended_runtime": best["runtime"] if best else None,
        "confident_top1_agreement": best["confident_top1_agreement"] if best else None,
        "confident_margin": CONFIDENT_MARGIN,
        "runtimes": {
            k: {kk: vv for kk, vv in r.items() if kk not in ("argmax", "example_tokens", "decode_picks", "decode_margins", "shared")}
            for k, r in results.items()
        },
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json:
        print(json.dumps(out))
    return 0 if best is not None or kind == "tiny" else 1


def _gguf_for(kind: str, args: argparse.Namespace, console: Console) -> tuple[Path, Path | None] | None:
    """The GGUF (and adapter) llama.cpp runs, the same model as torch's; None (with the reason shown) where there is none."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        console.print("[yellow]llama-cpp-python is not installed (make llamacpp): no llama.cpp row[/]")
        return None
    if args.gguf:
        if args.merged and not args.gguf_adapter:
            console.print("[yellow]--merged with --gguf needs --gguf-adapter (the same version's adapter.gguf): no llama.cpp row[/]")
            return None
        return Path(args.gguf), Path(args.gguf_adapter) if args.gguf_adapter else None
    if kind != "smollm2":
        console.print(f"[yellow]the {kind} model has no GGUF (pass --gguf): no llama.cpp row[/]")
        return None
    from coordinator.export import _base_location

    directory, name = _base_location("smollm2")
    assert name is not None
    return directory / name, None


if __name__ == "__main__":
    sys.exit(main())
