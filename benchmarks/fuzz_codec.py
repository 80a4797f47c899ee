"""Fuzz the frame and message decoders: every input must decode or raise ``CodecError``.

    python -m benchmarks.fuzz_codec [--cases 100000] [--seed 0] [--json]

Inputs: random bytes; valid frames (every value type and index coding) truncated or with
random bit flips; random bodies behind a valid header and checksum (to reach the record
parser); mutated envelopes and JSON messages. Any other exception is a crash: it is
printed with the input in hex, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import zstandard
from rich.console import Console
from rich.table import Table

from compression import CodecError, FrameKind, decode_frame, encode_frame, protocol
from compression.frame import SparseTensor
from compression.indices import IndexCoding
from compression.protocol import DeviceStatus, GlobalMeta
from compression.quantize import ValueType


def _valid_frames(rng: np.random.Generator) -> list[bytes]:
    frames = []
    for vtype in ValueType:
        for coding in IndexCoding:
            shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
            n = shape[0] * shape[1]
            idx = np.sort(rng.choice(n, size=min(n, int(rng.integers(1, 30))), replace=False))
            tensors = {
                "a.lora_A.weight": SparseTensor(shape, rng.normal(size=idx.size).astype(np.float32), idx),
                "b.dense": SparseTensor((3, 5), rng.normal(size=15).astype(np.float32)),
            }
            frames.append(encode_frame(FrameKind.UPDATE, tensors, values=vtype, int8_block=4, index_coding=coding))
    return frames


def _with_valid_checksum(body: bytes, version: int) -> bytes:
    comp = zstandard.ZstdCompressor().compress(body)
    header = struct.pack("<4sBBHII", b"FEDG", version, 1, 0, len(body), len(comp))
    return header + comp + struct.pack("<I", zlib.crc32(comp, zlib.crc32(header)))


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    op = rng.integers(0, 3)
    if op == 0 and b:
        return bytes(b[: int(rng.integers(0, len(b)))])
    for _ in range(int(rng.integers(1, 9))):
        if b:
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    if op == 2:
        b += rng.bytes(int(rng.integers(1, 16)))
    return bytes(b)


def run(cases: int, seed: int, progress: Callable[[int], None] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    frames = _valid_frames(rng)
    bodies = [zstandard.ZstdDecompressor().decompress(f[16:-4]) for f in frames]
    env = protocol.encode_envelope(protocol.UpdateHeader("d", 1, "u", 0, 1, 1.0, hashlib.sha256(frames[0]).hexdigest()), frames[0])
    meta = GlobalMeta(1, "a" * 64, 10, 1.0, "b" * 64, 0, "c" * 64, 5).to_json()
    status = DeviceStatus("idle", 3, 1.0, "laptop", {"eval_loss": 2.0}).to_json()
    outcomes: Counter[str] = Counter()
    crashes: list[dict] = []
    generators: list[tuple[str, Callable[[], bytes], Callable[[bytes], object]]] = [
        ("random bytes", lambda: rng.bytes(int(rng.integers(0, 300))), decode_frame),
        ("mutated frame", lambda: _mutate(frames[int(rng.integers(len(frames)))], rng), decode_frame),
        (
            "mutated body, valid checksum",
            lambda: _with_valid_checksum(_mutate(bodies[int(rng.integers(len(bodies)))], rng), int(rng.integers(1, 3))),
            decode_frame,
        ),
        ("mutated envelope", lambda: _mutate(env, rng), protocol.decode_envelope),
        ("mutated meta", lambda: _mutate(meta, rng), GlobalMeta.from_json),
        ("mutated status", lambda: _mutate(status, rng), DeviceStatus.from_json),
    ]
    for i in range(cases):
        name, make, decode = generators[i % len(generators)]
        data = make()
        try:
            decode(data)
            outcomes[f"{name}: accepted"] += 1
        except CodecError:
            outcomes[f"{name}: rejected"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of a fuzzer is to catch anything else
            outcomes[f"{name}: CRASH"] += 1
            if len(crashes) < 20:
                crashes.append({"generator": name, "error": repr(exc), "input_hex": data.hex()})
        if progress is not None and i % 5000 == 0:
            progress(i)
    return {
        "cases": cases,
        "seed": seed,
        "crashes": sum(v for k, v in outcomes.items() if k.endswith("CRASH")),
        "outcomes": dict(sorted(outcomes.items())),
        "examples": crashes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_codec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    t0 = time.monotonic()
    with console.status("fuzzing") as status:
        report = run(args.cases, args.seed, lambda i: status.update(f"fuzzing: {i:,} / {args.cases:,}"))
    report["seconds"] = time.monotonic() - t0
    table = Table(title=f"decoder fuzzing: {args.cases:,} cases, seed {args.seed}, {report['seconds']:.0f}s")
    table.add_column("generator: outcome")
    table.add_column("count", justify="right")
    for k, v in report["outcomes"].items():
        table.add_row(k, f"{v:,}")
    Console(width=120).print(table)
    for ex in report["examples"]:
        print(f"CRASH in {ex['generator']}: {ex['error']}\n  input: {ex['input_hex']}")
    print(f"crashes: {report['crashes']}")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "examples"} | {"examples": report["examples"]}))
    return 1 if report["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
