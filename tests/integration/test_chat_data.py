"""Chat and prompt/completion data end to end: check reports each format, the agent trains on
the assistant's and the completion's tokens only, over a real Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import parse_config
from fedge_lab.broker import MosquittoBroker
from fedge_lab.corpus import pydoc_domains
from tests.integration.conftest import ThreadedCoordinator, agent_config_dict, coordinator_config, run_agent_to_end, write_toml

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]


def _chat_data(path: Path) -> Path:
    """Chats and prompt/completion pairs made of pydoc topics, one malformed line of each kind."""
    path.mkdir()
    topics = list(pydoc_domains()["statements"].items())[:12]
    chats = [
        {"messages": [{"role": "user", "content": f"What does the {name} statement do?"}, {"role": "assistant", "content": text[:600]}]}
        for name, text in topics
    ]
    pairs = [{"prompt": f"Explain {name}:\n", "completion": text[:400]} for name, text in topics]
    lines = [json.dumps(r) for r in chats] + ['{"messages": [{"role": "user", "content": "no answer"}]}']
    (path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    (path / "pairs.jsonl").write_text("\n".join([json.dumps(r) for r in pairs] + ['{"prompt": 3, "completion": "x"}']) + "\n")
    return path


def test_check_reports_records_tokens_and_blocks_per_format(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    data = _chat_data(tmp_path / "data")
    cfg = write_toml(tmp_path / "agent.toml", agent_config_dict(broker, tiny_model, data, tmp_path / "state", "pi-chat"))
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "12 chat, 12 completion records; 2 skipped, first: " in out.stdout and "chats.jsonl:13: no assistant message" in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if "blocks of 32 tokens" in ln)
    for kind in ("chat: 12 records (1 skipped)", "completion: 12 records (1 skipped)"):
        assert kind in line, line
    assert "of them targets" in line and "train /" in line and "held-out blocks" in line


def test_an_agent_trains_on_chat_and_completion_data_and_its_loss_counts_targets_only(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    data = _chat_data(tmp_path / "data")
    cfg = parse_config(agent_config_dict(broker, tiny_model, data, tmp_path / "agent", "pi-chat", max_rounds=2), "test", environ={})
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        agent = run_agent_to_end(cfg, service, versions=2)
        assert agent.counters.updates_sent == 2
    local = agent._data
    assert local is not None and set(local.stats) == {"chat", "completion"}
    assert local.stats["chat"].skipped == 1 and local.stats["completion"].skipped == 1
    blocks = np.concatenate([local.train, local.heldout])
    # The prompts and user turns are in the blocks as inputs, never as targets.
    assert (blocks < 0).mean() > 0.1 and (blocks >= 0).mean() > 0.3
    assert np.isfinite(agent.counters.eval_loss_base)
