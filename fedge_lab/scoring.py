"""Watching a testbed run: versions scored as they arrive over MQTT, the plot of the loss, and the
model directory simulated devices share."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from rich.console import Console
from rich.table import Table

from compression.mqtt import loopback, make_client
from coordinator.monitor import FleetView
from fedge_lab.mirror import GlobalMirror
from fedge_lab.objective import SimObjective


def write_sim_model(out: Path, hidden: int, layers: int) -> Path:
    """A model directory with only ``config.json``: all the coordinator reads to build version 0."""
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=True,
    ).save_pretrained(str(out))
    return out


class VersionScorer:
    """Follows the global versions over MQTT and scores each with the simulated objective."""

    def __init__(self, host: str, port: int, fleet: str, objective: SimObjective | None) -> None:
        self.objective = objective
        self.lock = threading.Lock()
        self.history: list[tuple[float, int, float | None]] = []
        self.mirror = GlobalMirror(fleet, self._on_version)
        self.client = make_client(loopback(port), f"scorer-{fleet}-{id(self) % 100000}", backoff=(1, 2))
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe([(t, 1) for t in self.mirror.topics])
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.mirror.handle(msg.topic, bytes(msg.payload))

    def _on_version(self, version: int, state: Any) -> None:
        loss = self.objective.loss(state) if self.objective is not None else None
        self.history.append((time.time(), version, loss))

    @property
    def latest(self) -> tuple[float, int, float | None] | None:
        with self.lock:
            return self.history[-1] if self.history else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def plot_loss(report: dict[str, Any], path: Path) -> Path | None:
    hist = [(t, loss) for t, _, loss in report["loss_history"] if loss is not None]
    if not hist:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t for t, _ in hist], [x for _, x in hist], label=report["strategy"])
    if report.get("optimum_loss") is not None:
        ax.axhline(report["optimum_loss"], ls=":", c="grey", label="optimum")
    for e in report["events"]:
        if "broker" in e["what"] or "SIGKILL" in e["what"]:
            ax.axvline(e["t"], c="red", alpha=0.2)
    ax.set_xlabel("seconds")
    ax.set_ylabel("held-out loss (simulated, 1.0 = version 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_summary(report: dict[str, Any], run_dir: Path, png: Path | None) -> None:
    """What a testbed run did, for the operator who started it."""
    out = Console()
    out.print(f"testbed: {report['strategy']}, {sum(report['devices'].values())} devices {report['devices']}")
    out.print(f"versions {report['final_version']}, applied {report['counts'].get('accepted', 0)}, rejected {report['rejections'] or 0}")
    if report["sim_updates"]:
        ratio = report["sim_dense_bytes_up"] / max(report["sim_bytes_up"], 1)
        out.print(f"simulated updates sent {report['sim_updates']:,}, {report['sim_bytes_up']:,} B ({ratio:.0f}x smaller than dense fp32)")
    last = next((x for x in reversed(report["loss_history"]) if x[2] is not None), None)
    if last:
        out.print(f"simulated held-out loss 1.0 -> {last[2]:.4f} at v{last[1]} (optimum {report['optimum_loss']:.4f})")
    for e in report["events"]:
        out.print(f"  {e['t']:7.1f}s  {e['what']}")
    out.print(f"report: {run_dir / 'report.json'}" + (f"   plot: {png}" if png else ""))


def progress_table(
    view: FleetView,
    strategy: str,
    latest: tuple[float, int, float | None] | None,
    group_of: dict[str, str],
    events: list[Any],
    remaining: float,
) -> Table:
    """The live view of a testbed run: the coordinator, each group of devices, the last events."""
    c = view.coordinator
    loss = "" if not latest or latest[2] is None else f" | loss {latest[2]:.4f}"
    t = Table(
        caption_justify="left",
        title=f"fedge testbed {remaining:.0f}s left | {strategy} v{c.get('version', '?')} "
        f"applied {c.get('accepted', 0)} rejected {c.get('rejected', 0)} buffered {c.get('buffered', 0)}{loss}",
    )
    for col in ("group", "devices", "online", "training", "rounds", "bytes up"):
        t.add_column(col, justify="left" if col == "group" else "right")
    groups: dict[str, list[Any]] = {}
    for dev, label in group_of.items():
        groups.setdefault(label, []).append(view.devices.get(dev))
    for label, statuses in groups.items():
        online = sum(1 for s in statuses if s is not None and s.state != "offline")
        training = sum(1 for s in statuses if s is not None and s.state == "training")
        rounds = sum(int(s.metrics.get("rounds", 0)) for s in statuses if s is not None)
        nbytes = sum(int(s.metrics.get("bytes_up", 0)) for s in statuses if s is not None)
        t.add_row(label, str(len(statuses)), str(online), str(training), f"{rounds:,}", f"{nbytes:,}")
    for e in events[-4:]:
        t.caption = (t.caption + "\n" if t.caption else "") + f"{e.t:6.1f}s  {e.what}"
    return t


def sent_updates(fleet_plans: list[Path]) -> list[dict[str, Any]]:
    """Every update the simulated devices sent: time, device, base version, bytes, dense bytes."""
    out: list[dict[str, Any]] = []
    for plan in fleet_plans:
        log_path = plan.with_suffix(".log")
        if log_path.is_file():
            out += [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return sorted(out, key=lambda r: r["t"])
