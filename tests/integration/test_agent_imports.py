"""An agent install is `fedge[agent]`: a running agent, lean runtime and all, never imports the
coordinator's, the exporter's or the lab's dependencies (nor transformers, peft or quanto
once its model cache exists), and the extras say so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import modelcache
from fedge_lab.broker import MosquittoBroker
from tests.conftest import wait_until
from tests.integration.conftest import ThreadedCoordinator, agent_config_dict, coordinator_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
NOT_ON_A_DEVICE = ("coordinator", "fedge_lab", "onnx", "onnxscript", "dp_accounting", "prometheus_client", "matplotlib", "rich", "amqtt")
NOT_AT_RUN_TIME = ("transformers", "peft", "optimum")


def test_a_running_agent_imports_nothing_of_the_coordinator_the_exporter_or_the_lab(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "agent" / "model-cache"
    modelcache.ensure(str(tiny_model), cache, in_subprocess=True)  # built once, as `fedge-agent check` does
    raw = agent_config_dict(broker, tiny_model, device_data(0), tmp_path / "agent", "pi-lean", max_rounds=2)
    raw["model"] = {**raw["model"], "cache_dir": str(cache)}
    script = f"""
import json, sys
from edge_agent.agent import Agent
from edge_agent.config import parse_config
agent = Agent(parse_config(json.loads({json.dumps(json.dumps(raw))}), "test", environ={{}}))
agent.run()
print(json.dumps({{"modules": sorted({{m.split(".")[0] for m in sys.modules}}), "updates": agent.counters.updates_sent,
                  "runtime": type(agent._model).__name__}}))
"""
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        wait_until(lambda: service.version >= 2, 30, "the agent's two updates applied")
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["updates"] == 2 and doc["runtime"] == "LeanCausalLM"
    loaded = set(doc["modules"])
    assert not loaded & set(NOT_ON_A_DEVICE), sorted(loaded & set(NOT_ON_A_DEVICE))
    assert not loaded & set(NOT_AT_RUN_TIME), sorted(loaded & set(NOT_AT_RUN_TIME))


def test_the_agent_extra_holds_no_dependency_of_the_coordinator_or_the_exporter() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip().lower() for r in reqs}

    base = names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    agent = base | names(extras["agent"])
    for dep in ("onnx", "onnxscript", "dp-accounting", "prometheus-client", "matplotlib", "rich", "amqtt"):
        assert dep not in agent, dep
    assert {"torch", "safetensors", "tokenizers"} <= agent
    assert "dp-accounting" in names(extras["privacy"]) and {"onnx", "onnxscript"} <= names(extras["export"])
