"""Score global versions on held-out text: the child process of the coordinator's ``[eval]``.

    python -m edge_agent.scorer --source SOURCE --data-dir DIR --spec SPEC_JSON [--seq-len 128]
        [--blocks 32] [--batch-size 4] [--threads 1] [--quantize int8|none] [--cache-root DIR]

It loads the base once (the devices' int8 base by default, through the model cache), cuts the
data directory into blocks with the agents' own pipeline (every format the agents read,
chat and prompt/completion records masked as they are), and then reads one JSON request per
line on stdin, ``{"version": N, "frame": PATH}``: PATH is a snapshot frame of that version's
global state (``compression``'s format, decoded with the state's own limits). For each it
prints one JSON line on stdout: ``{"version": N, "loss": L, "blocks": B, "seconds": S}``, or
``{"version": N, "error": "..."}`` when that version cannot be scored. It ends at the end of
stdin. A problem with the model or the data exits with the agent's exit codes before any
request is read (its message on stderr), so the coordinator can tell a setup error from a
crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from compression import CodecError, FrameLimits, decode_frame
from compression.exitcodes import ExitCode
from compression.protocol import EMBED_DELTA, TrainableSpec
from edge_agent.errors import AgentError

log = logging.getLogger("edge_agent.scorer")

LIMITS = FrameLimits()
"""The decoder's default bounds: a frame that claims more is refused before anything is allocated."""


def _blocks(args: argparse.Namespace, tokenizer: Any) -> Any:
    from edge_agent.data import LocalData, build_blocks, describe, read_corpus

    data = build_blocks(read_corpus(args.data_dir), tokenizer, args.seq_len, 0.1, seed=0)
    # Every block is held-out text here: the coordinator never trains on it.
    every = np.concatenate([data.heldout, data.train])[: args.blocks]
    log.info("scoring on %d blocks of %s (%s)", len(every), args.data_dir, describe(data))
    return LocalData(train=every[:1], heldout=every, num_files=data.num_files, stats=data.stats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_agent.scorer", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--spec", required=True, help="the fleet's trainable spec, as JSON")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quantize", choices=["int8", "none"], default="int8")
    p.add_argument("--cache-root", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import torch

        from edge_agent.model import attach_trainable, load_base, load_global
        from edge_agent.train import evaluate

        torch.set_num_threads(args.threads)
        spec = TrainableSpec.from_dict(json.loads(args.spec))
        runtime = "auto" if not spec.embedding else "transformers"
        base, tokenizer = load_base(args.source, args.quantize, args.cache_root if args.quantize == "int8" else None, runtime=runtime)
        data = _blocks(args, tokenizer)
        del tokenizer
        model = attach_trainable(base, spec, "lora")
    except AgentError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except ImportError as exc:
        log.error("scoring needs the agent's packages on this machine (pip install 'fedge[coordinator,agent]'): %s", exc)
        return ExitCode.MODEL
    except (CodecError, ValueError) as exc:  # the spec argument
        log.error("--spec: %s", exc)
        return ExitCode.CONFIG
    for line in sys.stdin:
        version: Any = None
        try:
            request = json.loads(line)
            version, path = int(request["version"]), Path(str(request["frame"]))
            if path.stat().st_size > LIMITS.max_frame_bytes:
                raise ValueError(f"{path} is larger than {LIMITS.max_frame_bytes} bytes")
            tensors = decode_frame(path.read_bytes(), LIMITS).dense()
            if not spec.embedding:
                tensors.pop(EMBED_DELTA, None)
            t0 = time.monotonic()
            load_global(model, tensors)
            loss = evaluate(model, data, len(data.heldout), args.batch_size)
            if not np.isfinite(loss):
                raise ValueError(f"the loss is not finite ({loss})")
            out: dict[str, Any] = {"version": version, "loss": loss, "blocks": len(data.heldout), "seconds": time.monotonic() - t0}
        except Exception as exc:  # noqa: BLE001 - one version that cannot be scored is reported, and the next is read
            out = {"version": version, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
