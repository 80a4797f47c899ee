"""Export a global version: a PEFT adapter directory, and optionally the merged model.

The adapter directory loads with ``PeftModel.from_pretrained(base, DIR)``. A fleet with an
embedding tier also writes ``embedding_delta.safetensors`` (PEFT has no place for it); the
merged model includes it: the input embedding becomes ``base + delta`` and is untied from
the output head, which keeps the base weights, exactly as devices train it.

Before it returns, the export reloads what it wrote and checks it against the state it
came from, so a directory that does not reproduce the global model is never left behind
as a success.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from compression.protocol import EMBED_DELTA, TrainableSpec
from coordinator.errors import ConfigError, StoreError
from coordinator.store import Store

log = logging.getLogger(__name__)

PROBE = "def parse(self, text):\n    return self.grammar.match(text)\n"


ONNX_ARCHS = ("llama",)
"""What ``edge_agent.onnx_export`` builds a KV-cache graph for (it refuses anything else too)."""


def _base_location(source: str) -> tuple[Path, str | None]:
    """The base's directory, and its GGUF file's name where the base is one."""
    from coordinator.initial import source_path

    path = source_path(source)
    return (path.parent, path.name) if path.is_file() else (path, None)


def _load_base(source: str) -> tuple[Any, Any]:
    """The fp32 base model and its tokenizer (GGUF files are dequantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = _base_location(source)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, **kwargs)
    model.eval()
    return model, tokenizer


def _logits(model: Any, tokenizer: Any) -> np.ndarray:
    import torch

    ids = torch.tensor([tokenizer.encode(PROBE)])
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


def _export_onnx(merged_dir: Path, out: Path, quantize: bool) -> dict[str, Any]:
    """Run the agent's ONNX exporter in a child process on the merged model (see ``edge_agent.onnx_export``).

    A child process keeps the packages independent and returns the exporter's memory (a second
    copy of the model, the ONNX graph) to the system when it ends.
    """
    import subprocess
    import sys

    argv = [sys.executable, "-m", "edge_agent.onnx_export", "--model", str(merged_dir), "--out", str(out)]
    proc = subprocess.run(argv + ([] if quantize else ["--no-quantize"]), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise StoreError(f"ONNX export failed, nothing was written: {tail}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def export(
    state_dir: str | Path,
    out: str | Path,
    source: str,
    *,
    version: int | None = None,
    merged: bool = False,
    onnx: bool = False,
    onnx_quantize: bool = True,
    gguf: bool = False,
) -> dict[str, Any]:
    """Write the adapter (and the merged model, and its ONNX export) of ``version`` (default: the latest) to ``out``.

    ``onnx`` implies ``merged``: ``out/onnx`` holds the merged model with a KV cache and 8-bit
    weights, published only if it matched torch on held-out text (see ``edge_agent.onnx_export``).
    ``gguf`` also writes ``out/adapter.gguf``, the adapter for llama.cpp over the base GGUF
    (see :mod:`coordinator.gguf_export`).
    """
    merged = merged or onnx
    import torch
    from peft import LoraConfig, PeftModel
    from safetensors.torch import save_file

    store = Store(state_dir, readonly=True)
    try:
        version = store.current_version() if version is None else version
        if version is None:
            raise StoreError(f"{state_dir} holds no version yet")
        state, _ = store.load_version(version)
        spec_json = store.get_meta("spec")
        if spec_json is None:
            raise StoreError(f"{state_dir} lacks the trainable spec")
        spec = TrainableSpec.from_dict(json.loads(spec_json))
    finally:
        store.close()
    base_gguf: Path | None = None
    if gguf:
        directory, gguf_file = _base_location(source)
        if gguf_file is None:
            raise ConfigError(
                f"a GGUF adapter is made for a GGUF base, and {source!r} is a transformers directory: "
                "convert it with llama.cpp's convert_hf_to_gguf.py and pass --source FILE.gguf"
            )
        if EMBED_DELTA in state:
            raise ConfigError(
                "this fleet trains the embedding table, which a llama.cpp LoRA adapter cannot hold; "
                "export --merged and convert out/merged with llama.cpp's convert_hf_to_gguf.py"
            )
        base_gguf = directory / gguf_file
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new directory")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = {k: v for k, v in state.items() if k != EMBED_DELTA}
    table = state.get(EMBED_DELTA)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=source,
    )
    config.save_pretrained(str(tmp))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sorted(lora.items())}, str(tmp / "adapter_model.safetensors"))
    if table is not None:
        save_file({EMBED_DELTA: torch.from_numpy(np.ascontiguousarray(table))}, str(tmp / "embedding_delta.safetensors"))
    (tmp / "fedge-export.json").write_text(
        json.dumps({"version": version, "source": source, "spec": spec.to_dict(), "embedding_delta": table is not None}, indent=1)
    )

    # Check: the adapter as PEFT loads it reproduces the global state exactly.
    base, tokenizer = _load_base(source)
    arch = getattr(base.config, "model_type", None)
    if onnx and arch not in ONNX_ARCHS:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(
            f"ONNX export supports {', '.join(ONNX_ARCHS)} models and this fleet's base is {arch!r}: "
            "export the adapter (--format peft) or the merged model (--merged) instead"
        )
    peft_model = PeftModel.from_pretrained(base, str(tmp))
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(peft_model)
    wrong = [k for k in lora if k not in loaded or not np.array_equal(loaded[k].detach().numpy(), lora[k])]
    if wrong or len(loaded) != len(lora):
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"the exported adapter does not reload exactly (first mismatches: {wrong[:3]})")
    report: dict[str, Any] = {"version": version, "out": str(out), "tensors": len(lora), "merged": None}
    if base_gguf is not None:
        from coordinator.gguf_export import export_adapter

        try:
            report["gguf"] = export_adapter(tmp / "adapter.gguf", lora, spec.alpha, base_gguf, version)
        except (ConfigError, StoreError):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        report["gguf"]["file"] = str(out / "adapter.gguf")
    if merged:
        reference = _logits(peft_model, tokenizer) if table is None else None
        model = peft_model.merge_and_unload()
        if table is not None:
            emb = model.get_input_embeddings()
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie: the head keeps the base
            emb.weight = torch.nn.Parameter(emb.weight.detach() + torch.from_numpy(table))
            model.config.tie_word_embeddings = False
        # A GGUF-loaded model cannot save itself ("not serializable"): rebuild it from its config.
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict(), strict=True)
        merged_dir = tmp / "merged"
        fresh.save_pretrained(str(merged_dir))
        tokenizer.save_pretrained(str(merged_dir))
        reloaded = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        got = _logits(reloaded, tokenizer)
        expect = reference if reference is not None else _logits(fresh.eval(), tokenizer)
        diff = float(np.abs(got - expect).max())
        if diff > 1e-3:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"the merged model differs from base + adapter by {diff:.2e} in its logits; nothing was written")
        report["merged"] = {"dir": str(out / "merged"), "max_logit_diff": diff}
        if onnx:
            del peft_model, model, fresh, reloaded, base  # the exporter loads its own copy
            try:
                report["onnx"] = _export_onnx(merged_dir, tmp / "onnx", onnx_quantize)
            except StoreError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            report["onnx"]["out"] = str(out / "onnx")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log.info("exported version %d to %s", version, out)
    return report
