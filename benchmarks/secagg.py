"""Secure aggregation's costs with real cryptography, and what it costs in learning.

    python -m benchmarks.secagg [--cohorts 10 50 100] [--fraction 0.03] [--bits 8] [--json]

**Costs.** For each cohort size K, K virtual devices run the device side of the protocol
(:class:`compression.secagg.MaskingClient`: X25519 keys, Shamir shares sealed with
ChaCha20-Poly1305, ChaCha20 masks) on a vector of SmolLM2's LoRA size (r = 8 on q,v:
460,800 values), of which the cohort's shared rand-k coordinates (``--fraction``) are
quantized to ``--bits``-bit values in a ring of ``bits + ceil(log2 K)`` bits; a third of
the devices' worth of threshold slack lets ``K - t`` drop out. The coordinator then
unmasks the sum. Reported per device: the bytes it sends in every round (its keys, its
sealed shares, its packed masked vector, its reveal, and an Ed25519 signature on each of
the four messages), against one update of the plain default codec (top-2% int4, zstd,
envelope) on a delta of the same size; and its CPU per cohort (all four rounds, median over
the cohort), against one training step (``step_ms`` of ``benchmarks/results/codec.json``,
SmolLM2, one thread). Also the coordinator's CPU to unmask, and the wall time of the
whole cohort in this one process.

**Learning.** A seeded FedAvg run on the tiny model and the pydoc corpus (10 devices,
``--rounds`` rounds, lock step): once with the plain default uplink, and with each round a
cohort under secure aggregation (shared coordinates with error feedback, quantized,
masked, unmasked), for each way of choosing the shared coordinates (``SELECTIONS``:
rand-k from the cohort's seed, or the largest entries of the last global step). All apply
each round's mean uncompressed, so only the uplink differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from compression import CodecConfig, compress_update
from compression.secagg import SHARE_BYTES, MaskingClient, Quantizer, pack, shared_indices, unmask, unpack

LORA_PARAMS = 460_800
SIGNATURE = 64
ENVELOPE = 345
"""The signed update envelope's bytes around a frame (README, codec table)."""
STEP_MS_FILE = Path(__file__).parent / "results" / "codec.json"


def plain_update_bytes(n: int, seed: int = 0) -> int:
    """One plain default-codec update of an ``n``-value delta, envelope included."""
    delta = {"lora": np.random.default_rng(seed).normal(0, 1e-3, n).astype(np.float32)}
    return len(compress_update(delta, CodecConfig()).frame) + ENVELOPE


def cohort_costs(k_devices: int, fraction: float, bits: int, seed: int = 0) -> dict[str, Any]:
    t = max(1, int(np.ceil(2 * k_devices / 3)))
    k = max(1, int(round(fraction * LORA_PARAMS)))
    q = Quantizer(clip=1.0, cohort=k_devices, bits=bits)
    rng = np.random.default_rng(seed)
    cohort = f"c{seed:08d}".encode()
    cpu = {i: 0.0 for i in range(1, k_devices + 1)}
    sent = {i: 0 for i in range(1, k_devices + 1)}

    def timed(i: int, fn: Any, *args: Any) -> Any:
        t0 = time.process_time()
        out = fn(*args)
        cpu[i] += time.process_time() - t0
        return out

    wall0 = time.monotonic()
    clients = [MaskingClient(cohort, i, k_devices, t) for i in range(1, k_devices + 1)]
    keys = [timed(c.index, c.keys) for c in clients]
    for c in clients:
        sent[c.index] += 8 + 64 + SIGNATURE
    sealed = []
    for c in clients:
        out = timed(c.index, c.share, keys)
        sealed += out
        sent[c.index] += sum(8 + len(m.nonce) + len(m.box) for m in out if m.receiver != c.index) + SIGNATURE
    for c in clients:
        timed(c.index, c.receive, [m for m in sealed if m.receiver == c.index])
    idx = shared_indices(cohort, LORA_PARAMS, k)
    masked = {}
    for c in clients:
        x = q.encode(rng.normal(0, 0.1, idx.size), rng)
        wire = timed(c.index, lambda c=c, x=x: pack(c.mask(x, q.ring_bits), q.ring_bits))
        sent[c.index] += len(wire) + SIGNATURE
        masked[c.index] = unpack(wire, q.ring_bits, idx.size)
    survivors = sorted(masked)
    reveals = []
    for c in clients:
        r = timed(c.index, c.reveal, survivors, [])
        reveals.append(r)
        sent[c.index] += (len(r.b_shares) + len(r.s_shares)) * (4 + SHARE_BYTES) + SIGNATURE
    t0 = time.process_time()
    unmask(cohort, t, {k.index: k for k in keys}, masked, reveals, idx.size, q.ring_bits)
    coord_cpu = time.process_time() - t0
    return {
        "cohort": k_devices,
        "threshold": t,
        "shared_coordinates": k,
        "ring_bits": q.ring_bits,
        "bytes_up_per_device": int(median(sent.values())),
        "masked_vector_bytes": (k * q.ring_bits + 7) // 8,
        "device_cpu_s": median(cpu.values()),
        "coordinator_cpu_s": coord_cpu,
        "wall_s": time.monotonic() - wall0,
    }


def quality(rounds: int, fraction: float, bits: int, clip: float, devices: int = 10) -> dict[str, Any]:
    """Held-out loss by round: the plain default uplink, and secure aggregation over the same
    seeded run with each way of choosing the cohort's shared coordinates (:data:`SELECTIONS`)."""
    from coordinator.strategy import StrategyConfig
    from fedge_lab.simulation import SimulationConfig, build_model, shard_corpus
    from fedge_lab.virtual import ModelIO, SimCoordinator, VirtualDevice

    cfg = SimulationConfig()
    train = replace(cfg.train, lr=1e-2, local_steps=4)
    model, tokenizer, v0 = build_model(cfg, Path(tempfile.mkdtemp(prefix="fedge-secagg-")))
    datas = shard_corpus("pydoc", tokenizer, devices, train.seq_len, seed=0)
    io = ModelIO(model)

    def loss(state: dict[str, np.ndarray]) -> float:
        from edge_agent.train import evaluate

        io.load(state)
        return float(np.mean([evaluate(model, d, 4, train.batch_size) for d in datas]))

    # Plain: the default codec, FedAvg rounds closing on every device.
    fleet = [VirtualDevice(f"d{i}", d, np.random.default_rng([0, i])) for i, d in enumerate(datas)]
    coord = SimCoordinator(StrategyConfig(kind="fedavg", round_participants=devices, min_participants=devices), v0, None)
    plain = [loss(coord.state)]
    plain_bytes = 0
    for _r in range(rounds):
        base, state = coord.version, coord.state
        for dev in fleet:
            up = dev.train(io, state, base, train, CodecConfig())
            plain_bytes += up.wire_bytes + ENVELOPE
            coord.submit(up, 0.0)
        plain.append(loss(coord.state))

    out: dict[str, Any] = {"rounds": rounds, "devices": devices, "plain_losses": plain}
    out["plain_bytes_per_update"] = plain_bytes / (rounds * devices)
    for selection in SELECTIONS:
        out[selection] = _secure_run(selection, rounds, fraction, bits, clip, devices, io, datas, v0, train, loss)
        out[selection]["final_rel_loss_vs_plain"] = (out[selection]["losses"][-1] - plain[-1]) / plain[-1]
    return out


SELECTIONS = ("random", "last_step")
"""How a cohort picks the coordinates every member sends: ``random`` (rand-k from the cohort's
seed), or ``last_step``: the k largest entries of the last global step, which every device
holds (it is the difference of two published versions), so the choice reveals nothing any
device's data alone decides. The first round, with no step yet, is random."""


def _secure_run(
    selection: str, rounds: int, fraction: float, bits: int, clip: float, devices: int, io: Any, datas: Any, v0: Any, train: Any, loss: Any
) -> dict[str, Any]:
    from fedge_lab.virtual import VirtualDevice

    fleet = [VirtualDevice(f"d{i}", d, np.random.default_rng([0, i])) for i, d in enumerate(datas)]
    names = sorted(v0)
    sizes = [v0[n].size for n in names]
    total = sum(sizes)
    k = max(1, int(round(fraction * total)))
    q = Quantizer(clip=clip, cohort=devices, bits=bits)
    state = {n: v.copy() for n, v in v0.items()}
    residual = [np.zeros(total, np.float64) for _ in fleet]
    rng = np.random.default_rng(7)
    losses = [loss(state)]
    last_step: np.ndarray | None = None
    t = max(1, devices // 2 + 1)
    for r in range(rounds):
        cohort = f"c{r + 1:08d}".encode()
        if selection == "last_step" and last_step is not None and np.any(last_step):
            idx = np.sort(np.argpartition(-np.abs(last_step), k - 1)[:k])
        else:
            idx = shared_indices(cohort, total, k)
        clients = [MaskingClient(cohort, i + 1, devices, t) for i in range(devices)]
        keys = [c.keys() for c in clients]
        sealed = [m for c in clients for m in c.share(keys)]
        for c in clients:
            c.receive([m for m in sealed if m.receiver == c.index])
        masked = {}
        for i, (dev, c) in enumerate(zip(fleet, clients, strict=True)):
            up = dev.train(io, state, r, train, None)
            flat = np.concatenate([np.asarray(up.tensors[n], dtype=np.float64).reshape(-1) for n in names]) + residual[i]
            enc = q.encode(flat[idx], rng)
            residual[i] = flat.copy()
            residual[i][idx] -= enc.view(np.int32) / q.scale  # what was sent leaves the residual
            masked[c.index] = c.mask(enc, q.ring_bits)
        reveals = [c.reveal(sorted(masked), []) for c in clients]
        summed = q.decode_sum(unmask(cohort, t, {k_.index: k_ for k_ in keys}, masked, reveals, k, q.ring_bits))
        step = np.zeros(total)
        step[idx] = summed / devices
        last_step = step
        off = 0
        for n, size in zip(names, sizes, strict=True):
            state[n] = (state[n] + step[off : off + size].reshape(state[n].shape)).astype(np.float32)
            off += size
        losses.append(loss(state))
    return {"trainable": total, "shared_coordinates": k, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.secagg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--fraction", type=float, default=0.03, help="shared rand-k coordinates, as a fraction of the vector")
    parser.add_argument("--bits", type=int, default=8, help="bits per quantized value (the ring adds ceil(log2 K))")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the learning comparison (0 = skip it)")
    parser.add_argument("--clip", type=float, default=0.05, help="the cohort's clipping bound in the learning comparison")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=args.json, width=130)
    t0 = time.monotonic()
    plain = plain_update_bytes(LORA_PARAMS)
    step_ms = float(json.loads(STEP_MS_FILE.read_text())["step_ms"]) if STEP_MS_FILE.exists() else float("nan")
    rows = []
    for k in args.cohorts:
        console.print(f"cohort of {k}: real keys, shares and masks ...")
        rows.append(cohort_costs(k, args.fraction, args.bits))
    table = Table(title=f"secure aggregation per cohort (vector of {LORA_PARAMS:,}, {args.fraction:.1%} shared, {args.bits}-bit values)")
    for col in ("K", "t", "ring bits", "bytes up / device", "× plain", "device CPU", "% of a step", "coordinator CPU", "wall"):
        table.add_column(col, justify="right")
    for r in rows:
        r["bytes_ratio"] = r["bytes_up_per_device"] / plain
        r["device_cpu_fraction"] = 1000 * r["device_cpu_s"] / step_ms
        table.add_row(
            str(r["cohort"]),
            str(r["threshold"]),
            str(r["ring_bits"]),
            f"{r['bytes_up_per_device']:,}",
            f"{r['bytes_ratio']:.2f}",
            f"{1000 * r['device_cpu_s']:.0f} ms",
            f"{r['device_cpu_fraction']:.1%}",
            f"{1000 * r['coordinator_cpu_s']:.0f} ms",
            f"{r['wall_s']:.1f} s",
        )
    console.print(table)
    console.print(f"plain default codec: {plain:,} B per update; a training step: {step_ms:.0f} ms ({STEP_MS_FILE.name})")
    out: dict[str, Any] = {"plain_update_bytes": plain, "step_ms": step_ms, "fraction": args.fraction, "bits": args.bits, "cohorts": rows}
    k100 = next((r for r in rows if r["cohort"] == 100), None)
    if k100 is not None:
        out["bytes_ratio_k100"] = k100["bytes_ratio"]
        out["device_cpu_fraction_k100"] = k100["device_cpu_fraction"]
    if args.rounds:
        console.print(f"learning: {args.rounds} FedAvg rounds of 10 devices on the tiny model, plain and under secure aggregation ...")
        qual = quality(args.rounds, args.fraction, args.bits, args.clip)
        out["quality"] = qual
        console.print("round  plain   " + "  ".join(f"secagg, {s:<9}" for s in SELECTIONS))
        for i, a in enumerate(qual["plain_losses"]):
            console.print(f"{i:>5}  {a:.4f}  " + "  ".join(f"{qual[s]['losses'][i]:<17.4f}" for s in SELECTIONS))
        l0 = qual["plain_losses"][0]
        for sel in SELECTIONS:
            kept = (l0 - qual[sel]["losses"][-1]) / max(l0 - qual["plain_losses"][-1], 1e-12)
            qual[sel]["kept_reduction_vs_plain"] = kept
            console.print(
                f"secure aggregation, {sel}: final loss {qual[sel]['final_rel_loss_vs_plain']:+.2%} against plain; "
                f"keeps {kept:.0%} of plain's loss reduction"
            )
    out["seconds"] = time.monotonic() - t0
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
