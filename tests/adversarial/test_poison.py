"""The coordinator's guard: whatever a message makes its handling raise, the message is refused
(``handler_error``), quarantined and acknowledged, its writes are undone, and the service goes on."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedge_lab.broker import MosquittoBroker
from tests.conftest import wait_until
from tests.integration.conftest import DeviceClient, ThreadedCoordinator, coordinator_config

pytestmark = pytest.mark.broker


def test_a_message_whose_handling_raises_is_refused_and_quarantined(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    dev = DeviceClient(broker.port, "pi-poison")
    try:
        with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
            check = service.intake.verifier.check

            def exploding(env):  # type: ignore[no-untyped-def]  # stands for any bug a crafted message could reach
                if env.header.update_id == "poison":
                    raise RuntimeError("a handler bug")
                return check(env)

            service.intake.verifier.check = exploding  # type: ignore[method-assign]
            meta = dev.wait_meta(0)
            dev.publish(dev.update_payload(meta, uid="poison"))
            dev.publish(dev.update_payload(meta))
            wait_until(lambda: service.version == 1, 20, "the next update applied")
            assert service.rejections == {"handler_error": 1}
        notes = list((tmp_path / "coord" / "quarantine").glob("*.json"))
        assert len(notes) == 1 and "a handler bug" in notes[0].read_text()
        assert len(list((tmp_path / "coord" / "quarantine").glob("*.bin"))) == 1
    finally:
        dev.close()


def test_an_overflowing_downlink_residual_never_crashes_the_coordinator(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(cfg, limits=replace(cfg.limits, norm_bound="off"))
    dev = DeviceClient(broker.port, "pi-huge")
    try:
        with ThreadedCoordinator(cfg) as service:
            meta = dev.wait_meta(0)
            for _ in range(4):
                dev.publish(dev.update_payload(meta, scale=3e38))
            dev.publish(dev.update_payload(meta, scale=0.01))
            wait_until(lambda: sum(service.rejections.values()) + service.counts["accepted"] >= 5, 30, "every update processed")
            time.sleep(0.2)
            assert all(np.all(np.isfinite(v)) for v in service.state.values())
            assert set(service.rejections) <= {"non_finite"}
    finally:
        dev.close()
