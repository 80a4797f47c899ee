"""A personal adapter over Mosquitto: the fleet receives exactly the same updates whether a device
keeps one or not (its weights never leave), and the device reports the personal held-out loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from compression import state_digest
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.personal import PERSONAL
from fedge_lab.broker import MosquittoBroker
from tests.integration.conftest import ThreadedCoordinator, agent_config_dict, coordinator_config, run_agent_to_end

pytestmark = pytest.mark.broker


def _run(tmp_path: Path, broker: MosquittoBroker, model: Path, data: Path, personal: str) -> tuple[str, Agent]:
    extra = {"max_rounds": 2}
    raw = agent_config_dict(broker, model, data, tmp_path / "agent", "pi-own", **extra)
    raw["train"] = {**raw["train"], "personal": personal, "eval_every": 1}
    cfg = parse_config(raw, "test", environ={})
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", model)) as service:
        agent = run_agent_to_end(cfg, service, versions=2)
        return state_digest(service.state), agent


def test_the_fleet_gets_the_same_updates_with_or_without_a_personal_adapter(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    data = device_data(0)
    plain, _ = _run(tmp_path / "plain", broker, tiny_model, data, "off")
    with_personal, agent = _run(tmp_path / "ditto", broker, tiny_model, data, "ditto")
    assert with_personal == plain
    assert (tmp_path / "ditto" / "agent" / PERSONAL).is_file() and not (tmp_path / "plain" / "agent" / PERSONAL).exists()
    status = agent._status("idle").decode()
    assert '"eval_loss_personal"' in status
