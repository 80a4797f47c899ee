"""A fleet over TLS against the shipped broker config: client certificates, identities as user
names and client ids, the rendered ACL, and both daemons' TLS settings."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from coordinator.broker_acl import render_acl
from coordinator.config import BrokerConfig, CoordinatorConfig, ModelSpecConfig
from coordinator.enrolment import enroll, issue_cert
from fedge_lab.broker import MosquittoBroker
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, ThreadedCoordinator

pytestmark = pytest.mark.broker

SHIPPED = Path(__file__).resolve().parents[2] / "devices" / "mosquitto" / "mosquitto.conf"


def shipped_config(tmp_path: Path, port: int, ca: Path) -> str:
    """devices/mosquitto/mosquitto.conf with this test's paths, on 127.0.0.1 only."""
    conf = SHIPPED.read_text()
    (tmp_path / "acl").write_text(render_acl(FLEET))
    data = tmp_path / "broker"
    data.mkdir(exist_ok=True)
    for old, new in (
        ("/etc/mosquitto/fedge/acl", str(tmp_path / "acl")),
        ("/etc/mosquitto/fedge/ca.crt", str(ca / "ca.crt")),
        ("/etc/mosquitto/fedge/server.crt", str(tmp_path / "server.crt")),
        ("/etc/mosquitto/fedge/server.key", str(tmp_path / "server.key")),
        ("/var/lib/mosquitto/", f"{data}/"),
        ("log_dest syslog", f"log_dest file {data / 'mosquitto.log'}"),
    ):
        assert old in conf, old
        conf = conf.replace(old, new)
    conf, n = re.subn(r"^listener 8883$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    assert n == 1
    return conf + ("user root\n" if os.geteuid() == 0 else "")


def test_a_fleet_runs_over_tls_with_the_shipped_broker_config(tmp_path: Path, mosquitto_binary: str, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    ca, state = tmp_path / "ca", tmp_path / "coord"
    enroll(state, "pi-tls", tmp_path / "pi-tls", fleet=FLEET, broker_host="127.0.0.1", broker_port=8883, ca_dir=ca)
    issue_cert(ca, "localhost", tmp_path / "server.key", tmp_path / "server.crt", server=True)
    issue_cert(ca, "coordinator", tmp_path / "coordinator.key", tmp_path / "coordinator.crt")
    broker = MosquittoBroker(tmp_path / "broker")
    broker.conf_path.write_text(shipped_config(tmp_path, broker.port, ca))
    broker.start()
    snippet = tmp_path / "pi-tls" / "agent.toml"
    text = snippet.read_text().replace("port = 8883\n", f"port = {broker.port}\n")
    text = text.replace('data_dir = "/srv/fedge-data"', f'data_dir = "{device_data(1)}"')
    text = text.replace('state_dir = "/var/lib/fedge-agent"', f'state_dir = "{tmp_path / "agent-state"}"')
    text = text.replace("[broker]", "max_rounds = 2\nsync_wait_s = 2.0\n\n[broker]")
    text += f'[model]\nsource = "{tiny_model}"\n[train]\nthreads = 1\nbatch_size = 4\nseq_len = 32\nlocal_steps = 2\n'
    snippet.write_text(text)
    assert "tls = true" in text and "certfile" in text
    cfg = CoordinatorConfig(
        state_dir=str(state),
        fleet=FLEET,
        heartbeat_s=1.0,
        broker=BrokerConfig(
            port=broker.port,
            tls=True,
            cafile=str(ca / "ca.crt"),
            certfile=str(tmp_path / "coordinator.crt"),
            keyfile=str(tmp_path / "coordinator.key"),
        ),
        model=ModelSpecConfig(source=str(tiny_model), lora_r=4, lora_alpha=8),
    )
    try:
        with ThreadedCoordinator(cfg) as service:
            agent = Agent(load_config(snippet))
            thread = threading.Thread(target=agent.run, daemon=True)
            thread.start()
            thread.join(180)
            assert not thread.is_alive()
            wait_until(lambda: service.version >= 2, 30, "two signed updates over TLS")
            assert service.rejections == {}
            assert agent.outbox.confirmed == 2 and not agent.state.pending()
    finally:
        broker.stop()
