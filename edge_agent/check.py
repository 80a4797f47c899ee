"""``fedge-agent check`` and ``fedge-agent status``: plain answers for the person at the device.

``check`` runs every check it can, cheapest first, and prints one line each; the exit
code is that of the first failure (the same codes as ``run``), so that a provisioning
script can act on it. ``status`` reads the state directory only: it works while the
service runs, and when it does not.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import AgentError, ConfigError, TransportError


class _Waits(Exception):
    """A check that does not fail the device but means it will not train now (the schedule)."""


class _Report:
    def __init__(self) -> None:
        self.failed: AgentError | None = None
        self.waits: str | None = None

    def step(self, what: str, fn: Callable[[], str]) -> bool:
        t0 = time.monotonic()
        try:
            detail = fn()
        except _Waits as exc:
            print(f"WAITS {what}: {exc}", flush=True)
            self.waits = f"{what}: {exc}"
            return True
        except AgentError as exc:
            print(f"FAIL  {what}: {exc}", flush=True)
            self.failed = self.failed or exc
            return False
        except (OSError, ValueError) as exc:
            print(f"FAIL  {what}: {exc}", flush=True)
            self.failed = self.failed or AgentError(str(exc))
            return False
        print(f"ok    {what}: {detail} ({time.monotonic() - t0:.1f}s)", flush=True)
        return True


def _broker_check(cfg: Any, timeout: float) -> str:
    """Connect once with the agent's credentials and wait for the CONNACK."""
    import paho.mqtt.client as mqtt

    from compression.mqtt import ClientSetupError, make_client

    b = cfg.broker
    result: dict[str, Any] = {}
    done = threading.Event()
    try:
        client = make_client(b, f"check-{cfg.device_id}-{os.getpid()}")
    except ClientSetupError as exc:
        raise TransportError(str(exc)) from None

    def on_connect(c: mqtt.Client, u: object, flags: object, reason: Any, props: object) -> None:
        result["reason"] = reason
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(b.host, b.port, keepalive=b.keepalive)
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot reach {b.host}:{b.port}: {exc}") from None
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise TransportError(f"{b.host}:{b.port} accepted TCP but sent no CONNACK within {timeout:.0f}s")
        reason = result["reason"]
        if getattr(reason, "is_failure", False):
            raise TransportError(f"{b.host}:{b.port} refused the connection: {reason}")
    finally:
        client.disconnect()
        client.loop_stop()
    return f"connected to {b.host}:{b.port} with MQTT {b.protocol}" + (f" as {b.username}" if b.username else "")


def run_checks(config_path: str, *, skip_model: bool = False, broker_timeout: float = 10.0) -> int:
    from edge_agent.config import load_config

    report = _Report()
    cfg_box: dict[str, Any] = {}

    def config() -> str:
        cfg = load_config(config_path)
        cfg_box["cfg"] = cfg
        return f"device {cfg.device_id} in fleet {cfg.fleet}, profile {cfg.profile or 'none'}, tier {cfg.train.tier}"

    if not report.step("config", config):
        return report.failed.exit_code if report.failed else 2
    cfg = cfg_box["cfg"]

    def state() -> str:
        from edge_agent.state import AgentState

        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)  # as the agent does at its first start
        st = AgentState(cfg.state_dir, readonly=True)  # a running agent's files are left alone
        probe = Path(cfg.state_dir) / ".check-write"
        probe.write_bytes(b"ok")
        probe.unlink()
        return f"{cfg.state_dir} writable; last sequence number {st.seq}, {len(st.pending())} updates pending"

    def data() -> str:
        from edge_agent.data import KINDS, read_corpus

        corpus = read_corpus(cfg.data_dir)
        counts = ", ".join(f"{corpus.count(k)} {k}" for k in KINDS if corpus.count(k)) + " records"
        skipped = f"; {sum(corpus.skipped.values())} skipped, first: {corpus.problems[0]}" if corpus.skipped else ""
        return f"{corpus.files} files in {cfg.data_dir}: {counts}{skipped}"

    def schedule() -> str:
        from edge_agent.schedule import blocked_reason
        from edge_agent.state import pid_alive, read_status

        # A running agent's own training is not "other load": take out what it last reported.
        status = read_status(Path(cfg.state_dir)) or {}
        metrics = status.get("metrics") if pid_alive(status.get("pid")) else None
        own = metrics.get("own_load", 0.0) if isinstance(metrics, dict) else 0.0
        reason = blocked_reason(cfg.schedule, own_load=float(own) if isinstance(own, (int, float)) else 0.0)
        if reason is not None:
            raise _Waits(f"training would wait now: {reason}")
        return "training allowed now"

    def model() -> str:
        from edge_agent.config import model_cache_dir
        from edge_agent.data import build_blocks, describe, read_corpus
        from edge_agent.memory import peak_rss_mb
        from edge_agent.model import load_base, source_sha256

        t0 = time.monotonic()
        base, tok = load_base(cfg.model.source, cfg.model.quantize, model_cache_dir(cfg))
        loaded = time.monotonic() - t0
        blocks = build_blocks(read_corpus(cfg.data_dir), tok, cfg.train.seq_len, cfg.train.heldout_fraction, cfg.train.seed)
        del base
        return (
            f"{cfg.model.source} ({cfg.model.quantize}) loaded in {loaded:.1f}s; blocks of {cfg.train.seq_len} tokens: "
            f"{describe(blocks)}; base sha256 {source_sha256(cfg.model.source) or 'none'}; peak RSS {peak_rss_mb():.0f} MB"
        )

    report.step("state directory", state)
    report.step("local data", data)
    report.step("schedule", schedule)
    report.step("broker", lambda: _broker_check(cfg, broker_timeout))
    if not skip_model:
        report.step("model", model)
    if report.failed is None:
        print("all checks passed" + (f", but training waits ({report.waits})" if report.waits else ""))
        return 0
    return report.failed.exit_code


def show_status(config_path: str, *, as_json: bool = False) -> int:
    from edge_agent.config import load_config, model_cache_dir
    from edge_agent.state import AgentState, pid_alive, read_status

    cfg = load_config(config_path)
    root = Path(cfg.state_dir)
    if not root.is_dir():
        raise ConfigError(f"state directory {root} does not exist: the agent has never run with this config")
    st = AgentState(root, readonly=True)
    cache = model_cache_dir(cfg)
    hb: dict[str, Any] = dict(read_status(root) or {})
    running = pid_alive(hb.get("pid"))
    doc = {
        "device": cfg.device_id,
        "fleet": cfg.fleet,
        "running": running,
        "state": hb.get("state") if running else "stopped",
        "version": hb.get("version"),
        "connected": hb.get("connected") if running else False,
        "blocked": hb.get("blocked") if running else None,
        "last_heartbeat_age_s": round(time.time() - float(hb["ts"]), 1) if isinstance(hb.get("ts"), int | float) else None,
        "seq": st.seq,
        "pending_updates": len(st.pending()),
        "rejected_updates": len(list(st.rejected.glob("*.update"))) if st.rejected.is_dir() else 0,
        "model_cache": sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.is_dir() else [],
        "metrics": hb.get("metrics", {}),
    }
    if as_json:
        print(json.dumps(doc))
        return 0
    print(f"device {doc['device']} (fleet {doc['fleet']}): {'running' if running else 'not running'}, state {doc['state']}")
    print(f"  global version {doc['version']}, {'connected' if doc['connected'] else 'not connected'}", end="")
    print(f", last heartbeat {doc['last_heartbeat_age_s']}s ago" if doc["last_heartbeat_age_s"] is not None else "")
    if doc["blocked"]:
        print(f"  not training: {doc['blocked']}")
    print(f"  sequence {doc['seq']}, {doc['pending_updates']} updates pending, {doc['rejected_updates']} refused by the broker")
    metrics = doc["metrics"] if isinstance(doc["metrics"], dict) else {}
    keys = ("rounds", "eval_loss_base", "eval_loss", "eval_version", "train_loss", "step_s", "rss_mb", "peak_rss_mb", "bytes_up")
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), int | float))
    if shown:
        print(f"  {shown}")
    return 0
