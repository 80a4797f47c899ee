"""``fedge-coordinator export``: the global adapter as a PEFT directory (and a GGUF adapter), and optionally the merged model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from coordinator.cli.common import add_state_args, state_dir


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write a global version as a PEFT adapter directory (and a merged model)")
    add_state_args(p)
    p.add_argument("--out", required=True, help="new directory to write")
    p.add_argument("--version", type=int, help="global version (default: the latest)")
    p.add_argument("--merged", action="store_true", help="also write out/merged: the base with the adapter merged in")
    p.add_argument(
        "--format",
        choices=["peft", "onnx", "gguf"],
        default="peft",
        help="onnx: also out/onnx, the merged model with a KV cache and 8-bit weights for onnxruntime (implies --merged); "
        "gguf: also out/adapter.gguf, the adapter for llama.cpp (llama-cli -m BASE.gguf --lora out/adapter.gguf)",
    )
    p.add_argument("--no-quantize", action="store_true", help="with --format onnx: keep fp32 weights")
    p.add_argument("--source", help="base model (default: the config's model.source, else smollm2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.export import export

    source = args.source
    if source is None and args.config:
        from coordinator.config import load_config

        source = load_config(args.config).model.source
    report = export(
        state_dir(args),
        args.out,
        source or "smollm2",
        version=args.version,
        merged=args.merged,
        onnx=args.format == "onnx",
        onnx_quantize=not args.no_quantize,
        gguf=args.format == "gguf",
    )
    print(json.dumps(report))
    return 0
