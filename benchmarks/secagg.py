"""Secure aggregation's costs with real cryptography, and what it costs in learning.

    python -m benchmarks.secagg [--cohorts 10 50 100] [--fraction 0.03] [--bits 12] [--json]

**Costs.** For each cohort size K, one cohort's four rounds run as the daemons run them, in
one process: K devices (:class:`compression.secagg_device.DeviceSession`: X25519 keys,
Shamir shares sealed with ChaCha20-Poly1305, ChaCha20 masks) and the coordinator's
:class:`coordinator.secure.SecureCohort`, every message encoded on the wire format,
Ed25519-signed and verified. The vector is SmolLM2's LoRA size (r = 8 on q,v: 460,800
values), of which the cohort's shared rand-k coordinates (``--fraction``) are quantized to
``--bits``-bit values in a ring of ``bits + ceil(log2 K)`` bits; the threshold is the
product's default (``t = ceil(0.6 K)``). Reported per device: the bytes of every message it
sends (keys, sealed shares, masked vector, reveal), against one update of the plain default
codec (top-2% int4, zstd, envelope) on a delta of the same size; its CPU per cohort (all
four rounds, median over the cohort) against one training step (``step_ms`` of
``benchmarks/results/codec.json``, SmolLM2, one thread). Also the coordinator's CPU
(verifying, routing, unmasking) and the wall time of the whole cohort in this one process.

**Learning.** A seeded FedAvg run on the tiny model and the pydoc corpus (10 devices,
``--rounds`` rounds, lock step): once with the plain default uplink, and with each round a
cohort under secure aggregation (shared coordinates with error feedback, quantized,
masked, unmasked), for each way of choosing the shared coordinates (``SELECTIONS``:
rand-k from the cohort's seed, or the largest entries of the last global step). All apply
each round's mean uncompressed, so only the uplink differs.
"""

from __future__ import annotations

import argparse
import hashlib
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
from compression.keys import ed25519_verifier
from compression.secagg import MaskingClient, Quantizer, shared_indices, unmask
from coordinator.secure import SecureConfig

LORA_PARAMS = 460_800
ENVELOPE = 345
"""The signed update envelope's bytes around a frame (README, codec table)."""
STEP_MS_FILE = Path(__file__).parent / "results" / "codec.json"


def plain_update_bytes(n: int, seed: int = 0) -> int:
    """One plain default-codec update of an ``n``-value delta, envelope included."""
    delta = {"lora": np.random.default_rng(seed).normal(0, 1e-3, n).astype(np.float32)}
    return len(compress_update(delta, CodecConfig()).frame) + ENVELOPE


def cohort_costs(k_devices: int, fraction: float, bits: int, seed: int = 0) -> dict[str, Any]:
    """One cohort's four rounds as the daemons run them: K :class:`DeviceSession` devices and the
    coordinator's :class:`SecureCohort`, every message encoded, Ed25519-signed and verified. A
    device's CPU counts its own work (its crypto, encoding, signing, verifying what it receives);
    the coordinator's counts verifying, routing and unmasking. Bytes are the encoded messages."""
    from collections import deque

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from compression.protocol import CohortInvite
    from compression.secagg_device import DeviceSession
    from compression.secagg_wire import DOWN_KINDS, UP_KINDS, decode
    from coordinator.cohorts import Cohort
    from coordinator.secure import SecureCohort

    cfg = SecureConfig(enabled=True, fraction=fraction, bits=bits, clip=1.0)
    names = [f"d{i:04d}" for i in range(k_devices)]
    cohort = Cohort(f"c{seed + 1:08d}", seed + 1, 0, tuple(names), 0.0, 3600.0, k_devices)
    sc = SecureCohort(cfg, cohort, LORA_PARAMS, hashlib.sha256(cohort.cohort.encode()).digest(), 0.0)
    keys = {d: Ed25519PrivateKey.generate() for d in names}
    publics = {d: k.public_key() for d, k in keys.items()}
    fleet = Ed25519PrivateKey.generate()
    sessions = {d: DeviceSession(CohortInvite(cohort.cohort, d, 0, 3600.0, 0.0, secagg=sc.params(d))) for d in names}
    cpu = dict.fromkeys(names, 0.0)
    sent = dict.fromkeys(names, 0)
    coordinator_cpu = 0.0
    work: deque[tuple[str, str, bytes]] = deque()

    def device_send(d: str, msg: Any) -> None:
        if msg is not None:
            wire = msg.encode(keys[d].sign)
            sent[d] += len(wire)
            work.append(("up", d, wire))

    def run() -> None:
        nonlocal coordinator_cpu
        while work:
            direction, d, wire = work.popleft()
            t0 = time.process_time()
            if direction == "up":
                outs = sc.receive(decode(wire, lambda dev: ed25519_verifier(publics[dev]), UP_KINDS), 0.0)
                downs = [o.encode(fleet.sign) for o in outs]
                coordinator_cpu += time.process_time() - t0
                work.extend(("down", o.device, w) for o, w in zip(outs, downs, strict=True))
            else:
                msg = sessions[d].handle(decode(wire, lambda dev: ed25519_verifier(fleet.public_key()), DOWN_KINDS))
                device_send(d, msg)
                cpu[d] += time.process_time() - t0

    wall0 = time.monotonic()
    rng = np.random.default_rng(seed)
    for d in names:
        t0 = time.process_time()
        device_send(d, sessions[d].start())
        cpu[d] += time.process_time() - t0
    run()
    for d in names:
        x = rng.normal(0, 0.1, LORA_PARAMS)
        t0 = time.process_time()
        msg, _residual = sessions[d].submit(x, rng)
        device_send(d, msg)
        cpu[d] += time.process_time() - t0
        run()
    if sc.total is None:
        raise RuntimeError(f"cohort of {k_devices} did not unmask: {sc.failed}")
    return {
        "cohort": k_devices,
        "threshold": sc.t,
        "shared_coordinates": sc.k,
        "ring_bits": sc.quantizer.ring_bits,
        "bytes_up_per_device": int(median(sent.values())),
        "masked_vector_bytes": (sc.k * sc.quantizer.ring_bits + 7) // 8,
        "device_cpu_s": median(cpu.values()),
        "coordinator_cpu_s": coordinator_cpu,
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
    t = max(2, int(np.ceil(SecureConfig().threshold * devices)))
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
    parser.add_argument(
        "--fraction", type=float, default=SecureConfig().fraction, help="shared rand-k coordinates, as a fraction of the vector"
    )
    parser.add_argument("--bits", type=int, default=SecureConfig().bits, help="bits per quantized value (the ring adds ceil(log2 K))")
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
