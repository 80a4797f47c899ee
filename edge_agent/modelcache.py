"""The pre-quantized int8 checkpoint of the frozen base, cached in the state directory.

Loading SmolLM2 from its GGUF dequantizes it to fp32 first: about 12 s and a 1.1 GB peak.
The agent does that once, in a child process, and keeps the int8 result (about 220 MB)
under ``<state_dir>/model-cache/<key>/``. Every later start loads the cache in well under
a second without the fp32 peak, and the daemon's own RSS never holds the fp32 copy.

The key covers the source file (path, size, mtime), the quantization and the library
versions that define the checkpoint's layout, so a changed model or an upgrade rebuilds
it. A cache directory appears by an atomic rename after every file in it is fsynced;
``kill -9`` during a build leaves only a temporary directory, removed on the next start.

    python -m edge_agent.modelcache --source smollm2 --cache-root STATE/model-cache
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from edge_agent.errors import ModelError
from edge_agent.state import pid_alive

log = logging.getLogger(__name__)

CACHE_FORMAT = 4
WEIGHTS = "model.safetensors"
QMAP = "quantization_map.json"
MANIFEST = "fedge-cache.json"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(source: str) -> str:
    """A key that changes when the source model or the checkpoint layout changes."""
    from edge_agent.model import resolve_source

    directory, gguf = resolve_source(source)
    files = [directory / gguf] if gguf else sorted(p for p in directory.iterdir() if p.is_file())
    ident: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "quantize": "int8",
        "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "versions": {d: _version(d) for d in ("torch", "transformers", "optimum-quanto")},
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir(source: str, root: str | Path) -> Path:
    return Path(root) / cache_key(source)


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / WEIGHTS).is_file() and (path / QMAP).is_file()


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in (path, path.parent):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build(source: str, root: str | Path) -> Path:
    """Quantize ``source`` to int8 and write it to the cache (no-op when already there)."""
    import torch
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    from edge_agent import lean
    from edge_agent.model import load_base, quantize_int8

    root = Path(root)
    final = cache_dir(source, root)
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".build-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        loaded, tokenizer = load_base(source, "none")
        model: Any = loaded
        try:  # the lean runtime's int8 files, from the fp32 weights (edge_agent.lean)
            lean.write_lean(model, tmp, eos_token_id=tokenizer.eos_token_id)
        except ModelError as exc:
            log.info("no lean weights for %s: %s", source, exc)
        quantize_int8(model)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if tied:
            # safetensors refuses shared storage; the head is re-tied to the embedding on load.
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / WEIGHTS))
        (tmp / QMAP).write_text(json.dumps(quantization_map(model)))
        model.config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        manifest = {"source": source, "key": final.name, "tied": tied, "built_s": round(time.monotonic() - t0, 2)}
        manifest["torch"] = torch.__version__
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # an incomplete directory from an older layout
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_tree(final)
    log.info("cached the int8 base of %s in %s (%.1fs)", source, final, time.monotonic() - t0)
    return final


def _builder_alive(tmp: Path) -> bool:
    """Whether the process that owns a ``.build-<key>-<pid>`` directory still runs (agents may share a cache)."""
    try:
        pid = int(tmp.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return False
    return pid != os.getpid() and pid_alive(pid)


def ensure(source: str, root: str | Path, *, in_subprocess: bool = True) -> Path:
    """The cache directory for ``source``, building it first if needed.

    ``in_subprocess`` builds in a child process, so that the fp32 load's peak never
    becomes this process's resident memory (freed heap is rarely returned to the OS).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".build-*"):
        if not _builder_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)  # left by a kill -9 during a build
    final = cache_dir(source, root)
    if is_complete(final):
        return final
    log.info("building the int8 cache of %s (once; later starts load it directly)", source)
    if in_subprocess:
        cmd = [sys.executable, "-m", "edge_agent.modelcache", "--source", source, "--cache-root", str(root)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not is_complete(final):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelError(f"building the int8 cache of {source} failed (exit {proc.returncode}): {' | '.join(tail)}")
    else:
        build(source, root)
    for other in root.iterdir():
        if other.is_dir() and other.name != final.name and not other.name.startswith("."):
            shutil.rmtree(other, ignore_errors=True)  # caches of an older model or library version
    return final


def load(path: Path) -> tuple[Any, Any]:
    """Load a cached int8 base: the model is built on the meta device and filled from the file."""
    import torch
    from optimum.quanto import requantize
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        manifest = json.loads((path / MANIFEST).read_text())
        config = AutoConfig.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        qmap = json.loads((path / QMAP).read_text())
        state = load_file(str(path / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"int8 cache {path} is unreadable ({exc}); delete it to rebuild") from None
    from edge_agent.model import conv1d_as_linear

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        conv1d_as_linear(model)  # as quantize_int8 did before the cache was written
    requantize(model, state, qmap, device=torch.device("cpu"))
    expected = set(model.state_dict())
    if manifest.get("tied"):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ModelError(f"int8 cache {path} lacks {missing[:3]}; delete it to rebuild")
    if manifest.get("tied"):
        model.tie_weights()
    _restore_buffers(model, config, path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _restore_buffers(model: Any, config: Any, path: Path) -> None:
    """Non-persistent buffers are not in the file, and the meta device left them uninitialized:
    rotary embeddings are rebuilt from the config, a scaled embedding's scale (Gemma) is set
    from its constructor's value. Any other such buffer is an architecture the cache cannot
    restore: refused, never left holding garbage."""
    import torch

    rebuilt: set[str] = set()
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=config))
            rebuilt.add(name)
        elif hasattr(module, "scalar_embed_scale") and isinstance(getattr(module, "embed_scale", None), torch.Tensor):
            module.embed_scale = torch.tensor(float(module.scalar_embed_scale))
            rebuilt.add(name)
    left = [key for key, _ in model.named_non_persistent_buffers() if key.rsplit(".", 1)[0] not in rebuilt]
    if left:
        raise ModelError(f"int8 cache {path}: cannot restore the buffers {left[:3]} of this architecture; set model.quantize = 'none'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.modelcache", description="Build the int8 cache of a base model.")
    parser.add_argument("--source", required=True, help="smollm2, a .gguf file or a model directory")
    parser.add_argument("--cache-root", required=True, help="usually <state_dir>/model-cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        print(build(args.source, args.cache_root))
    except ModelError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
