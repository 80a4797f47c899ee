"""Shared fixtures: a real Mosquitto on a free loopback port, a tiny model, non-IID text."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from fedge_lab.broker import MosquittoBroker, mosquitto_path
from fedge_lab.corpus import pydoc_domains, write_device_corpus

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=200)
settings.load_profile("ci")


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def mosquitto_binary() -> str:
    """The Mosquitto binary; skips locally without it, fails in CI (FEDGE_REQUIRE_BROKER=1)."""
    path = mosquitto_path()
    if path is None:
        if os.environ.get("FEDGE_REQUIRE_BROKER"):
            pytest.fail("mosquitto is required (FEDGE_REQUIRE_BROKER is set) but not installed")
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    return path


@pytest.fixture
def broker(tmp_path: Path, mosquitto_binary: str) -> Iterator[MosquittoBroker]:
    """A private Mosquitto on 127.0.0.1, stopped by its PID at the end of the test."""
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a 512-token BPE trained on part of the pydoc corpus."""
    from edge_agent.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    texts = [t for topics in pydoc_domains().values() for t in list(topics.values())[:8]]
    return build_tiny_model(out, texts)


@pytest.fixture
def device_data(tmp_path: Path) -> Callable[[int], Path]:
    """``device_data(i)`` writes device ``i``'s domain of the pydoc corpus and returns its directory."""

    def make(i: int) -> Path:
        d = tmp_path / f"data{i}"
        write_device_corpus(d, i)
        return d

    return make
