"""Five architectures through the whole loop (real Mosquitto, tiny models built from a config):
the coordinator makes version 0, an agent trains on the int8 base and follows the compressed
global deltas, the coordinator aggregates, and the fleet exports as a PEFT directory, and to
ONNX where the exporter supports the architecture (a clear error otherwise)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from compression import state_digest
from coordinator.errors import ConfigError
from coordinator.export import ONNX_ARCHS, export
from edge_agent.config import parse_config
from edge_agent.tiny import ARCHS, LORA_TARGETS, build_tiny_model
from fedge_lab.broker import MosquittoBroker
from fedge_lab.corpus import pydoc_domains
from tests.conftest import wait_until
from tests.integration.conftest import ThreadedCoordinator, agent_config_dict, coordinator_config, run_agent_to_end

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("arch", ARCHS)
def test_an_architecture_trains_aggregates_follows_and_exports(arch: str, tmp_path: Path, broker: MosquittoBroker, device_data) -> None:  # type: ignore[no-untyped-def]
    texts = [t for topics in pydoc_domains().values() for t in list(topics.values())[:8]]
    model = build_tiny_model(tmp_path / arch, texts, arch=arch)
    cfg = coordinator_config(broker, tmp_path / "coord", model)
    cfg = replace(cfg, model=replace(cfg.model, targets=LORA_TARGETS[arch]))
    agent_cfg = parse_config(
        agent_config_dict(broker, model, device_data(0), tmp_path / "agent", f"pi-{arch}", max_rounds=2), "test", environ={}
    )
    with ThreadedCoordinator(cfg) as service:
        assert service.spec.base["model_type"] == arch and service.spec.targets == LORA_TARGETS[arch]
        agent = run_agent_to_end(agent_cfg, service, versions=2)
        assert agent.counters.updates_sent == 2
        # The agent followed the compressed deltas to exactly the coordinator's state.
        wait_until(lambda: agent.global_model is not None and agent.global_model.version == service.version, 10, "the last version")
        assert state_digest(agent.global_model.tensors) == state_digest(service.state)  # type: ignore[union-attr]
        moved = sum(float(np.abs(service.state[k]).sum()) for k in service.state if "lora_B" in k)
        assert moved > 0, "LoRA B is still zero: nothing was aggregated"
    report = export(tmp_path / "coord", tmp_path / "peft", str(model))  # reloads the adapter with PEFT and compares it exactly
    assert report["version"] == 2 and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    if arch in ONNX_ARCHS:
        onnx = export(tmp_path / "coord", tmp_path / "onnx", str(model), onnx=True, onnx_quantize=False)
        assert (Path(onnx["onnx"]["out"]) / "model.onnx").is_file()
    else:
        with pytest.raises(ConfigError, match=f"ONNX export supports llama models and this fleet's base is '{arch}'"):
            export(tmp_path / "coord", tmp_path / "onnx", str(model), onnx=True)
        assert not (tmp_path / "onnx").exists()
