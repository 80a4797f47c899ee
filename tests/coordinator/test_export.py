"""Export: the adapter loads with PeftModel.from_pretrained; the merged model gives the same logits."""

from pathlib import Path

import pytest
import torch

from coordinator.config import ModelSpecConfig
from coordinator.errors import ConfigError
from coordinator.export import PROBE, export
from tests.coordinator.fleets import fleet_state


def _fleet_state(tmp_path: Path, model: Path, embedding: bool = False) -> Path:
    return fleet_state(tmp_path, ModelSpecConfig(source=str(model), lora_r=4, lora_alpha=8, embedding=embedding))


def test_adapter_and_merged_model_reproduce_the_global_model(tmp_path: Path, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = _fleet_state(tmp_path, tiny_model)
    report = export(state, tmp_path / "out", str(tiny_model), merged=True)
    assert report["version"] == 1 and report["merged"]["max_logit_diff"] < 1e-3
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = torch.tensor([tok.encode(PROBE)])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, plain)  # the adapter does something


def test_embedding_fleet_exports_the_table_beside_the_adapter(tmp_path: Path, tiny_model: Path) -> None:
    state = _fleet_state(tmp_path, tiny_model, embedding=True)
    export(state, tmp_path / "out", str(tiny_model), merged=True)
    assert (tmp_path / "out" / "embedding_delta.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged"))
    assert merged.get_input_embeddings().weight.data_ptr() != merged.get_output_embeddings().weight.data_ptr()


def test_export_refuses_a_non_empty_directory(tmp_path: Path, tiny_model: Path) -> None:
    state = _fleet_state(tmp_path, tiny_model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        export(state, tmp_path / "out", str(tiny_model))
    assert (tmp_path / "out" / "x").read_text() == "keep me"


@pytest.mark.slow
def test_onnx_export_of_a_global_version_matches_torch(tmp_path: Path, tiny_model: Path) -> None:
    import json

    state = _fleet_state(tmp_path, tiny_model)
    report = export(state, tmp_path / "out", str(tiny_model), onnx=True, onnx_quantize=False)
    onnx_dir = tmp_path / "out" / "onnx"
    assert report["onnx"]["out"] == str(onnx_dir) and (onnx_dir / "model.onnx").is_file()
    check = json.loads((onnx_dir / "fedge-onnx.json").read_text())["check"]
    assert check["top1_agreement"] >= 0.99 and check["greedy_equal"]
    assert (tmp_path / "out" / "merged" / "config.json").is_file()  # --format onnx implies --merged
