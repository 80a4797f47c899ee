"""A federation of sites on one machine: a root broker, 2-4 bridged site brokers, the root
coordinator, a site aggregator per site, and simulated or real devices at each site.

Everything listens on 127.0.0.1 only. Each site broker's bridge is the shipped
``devices/mosquitto/bridge-site.conf``, rendered for loopback (without its TLS lines), and
it reaches the root broker through a :class:`Relay`, so that a test can cut the bridge
(and restore it) without stopping either broker. Every process is stopped by its own PID.

    lab = SiteLab(work, sites=2, source=model_dir).start()
    lab.start_sim(devices_per_site=100, step_s=2.0)   # fedge_lab.simfleet at each site
    lab.kill_site(0); lab.start_site(0)                # kill -9, then restart
    lab.relays[1].cut(); ...; lab.relays[1].restore()  # a bridge outage
    lab.stop()
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compression import FrameKind, compress_dense
from coordinator.config import ModelSpecConfig
from fedge_lab.broker import Broker, MosquittoBroker, free_port
from fedge_lab.demo import LAB_LIMITS, lab_fleet_key, serve_argv, write_toml
from fedge_lab.fleet_plan import FleetPlan, SimDevice
from fedge_lab.objective import ObjectiveConfig
from fedge_lab.processes import Child

log = logging.getLogger(__name__)

BRIDGE_TEMPLATE = Path(__file__).resolve().parents[1] / "devices" / "mosquitto" / "bridge-site.conf"
TLS_LINES = ("bridge_cafile", "bridge_certfile", "bridge_keyfile", "bridge_tls_version", "bridge_insecure")


def render_bridge(fleet: str, site: str, root: str, *, tls: bool = True, template: Path = BRIDGE_TEMPLATE) -> str:
    """The site broker's bridge section, from the shipped template; ``tls=False`` drops its TLS lines (loopback labs)."""
    lines = []
    for line in template.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if not tls and line.startswith(TLS_LINES):
            continue
        lines.append(line.format(fleet=fleet, site=site, root=root))
    return "\n".join(lines) + "\n"


class Relay:
    """A TCP relay on 127.0.0.1 to ``target``: the bridge's path to the root broker, which a test can cut.

    While cut, it closes every connection it carries and refuses new ones (they are accepted
    and closed at once), as a dead link would look to Mosquitto's bridge."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.down = threading.Event()
        self.closed = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            _close(s)

    def cut(self) -> None:
        """Drop every carried connection and refuse new ones until :meth:`restore`."""
        self.down.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            _close(s)

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.sock.close()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the other direction's pipe
    s.close()


@dataclass
class SiteNode:
    name: str
    broker: Broker
    relay: Relay
    config: Path
    state_dir: Path
    coordinator: Child | None = None
    sims: list[Child] = field(default_factory=list)


class SiteLab:
    """The root and ``sites`` site aggregators, each with its broker (see the module docstring)."""

    def __init__(
        self,
        work: Path,
        sites: int,
        *,
        source: str,
        fleet: str = "lab",
        lora_r: int = 4,
        root_strategy: dict[str, Any] | None = None,
        site_options: dict[str, Any] | None = None,
        heartbeat_s: float = 2.0,
    ) -> None:
        if not 1 <= sites <= 16:
            raise ValueError(f"a lab federation has 1..16 sites, got {sites}")
        self.work = work
        self.fleet = fleet
        self.source = source
        self.lora_r = lora_r
        self.model: dict[str, Any] = {"source": source, "lora_r": lora_r, "lora_alpha": 2 * lora_r}
        self.root_strategy = root_strategy or {"kind": "fedasync", "max_staleness": 1_000_000}
        self.site_options = {"partial_every_s": 1.0, "resend_s": 5.0, **(site_options or {})}
        self.heartbeat_s = heartbeat_s
        self.n = sites
        self.nodes: list[SiteNode] = []
        self.root_broker: MosquittoBroker | None = None
        self.root: Child | None = None
        self.root_config = work / "root" / "root.toml"
        self.root_state = work / "root" / "state"
        self.fleet_public = ""
        self._root_doc: dict[str, Any] = {}
        self.root_metrics_port = 0
        """The root's ``/metrics`` port, picked afresh at each start of the root."""

    @property
    def relays(self) -> list[Relay]:
        return [n.relay for n in self.nodes]

    def start(self) -> SiteLab:
        from coordinator.enrolment import enroll

        w = self.work
        self.root_broker = MosquittoBroker(w / "root" / "broker", persistence=True)
        self.root_broker.start()
        self._root_doc = {
            "fleet": self.fleet,
            "state_dir": "state",
            "heartbeat_s": self.heartbeat_s,
            "broker": {"port": self.root_broker.port},
            "model": self.model,
            "strategy": self.root_strategy,
            "limits": LAB_LIMITS,
        }
        self.fleet_public = lab_fleet_key(self.root_state)
        for i in range(self.n):
            name = f"site-{chr(ord('a') + i)}"
            secrets = w / name / "secrets"
            enroll(self.root_state, name, secrets, fleet=self.fleet, broker_host="127.0.0.1", broker_port=0)
            relay = Relay(self.root_broker.port)
            bridge = render_bridge(self.fleet, name, f"127.0.0.1:{relay.port}", tls=False)
            broker = MosquittoBroker(w / name / "broker", persistence=True, extra=bridge).start()  # its port is taken now
            config = write_toml(
                w / name / "site.toml",
                {
                    "fleet": self.fleet,
                    "state_dir": "state",
                    "heartbeat_s": self.heartbeat_s,
                    "broker": {"port": broker.port},
                    "model": self.model,
                    "limits": LAB_LIMITS,
                    "site": {
                        "id": name,
                        "root_public_key": self.fleet_public,
                        "signing_key": str(secrets / f"{name}.key"),
                        **self.site_options,
                    },
                },
            )
            self.nodes.append(SiteNode(name, broker, relay, config, w / name / "state"))
        self.start_root()
        for i in range(self.n):
            self.start_site(i)
        return self

    # -- processes -------------------------------------------------------------------

    def start_root(self) -> None:
        self.root_metrics_port = free_port()
        write_toml(self.root_config, {**self._root_doc, "metrics_port": self.root_metrics_port})
        self.root = Child("root", serve_argv(self.root_config), self.work / "logs" / "root.log").start()

    def start_site(self, i: int) -> None:
        node = self.nodes[i]
        node.coordinator = Child(node.name, serve_argv(node.config), self.work / "logs" / f"{node.name}.log").start()

    def kill_root(self) -> None:
        _kill(self.root)

    def kill_site(self, i: int) -> None:
        _kill(self.nodes[i].coordinator)

    def start_sim(self, devices_per_site: int, *, step_s: float = 2.0, processes: int = 1, seed: int = 0, **plan: Any) -> None:
        """``devices_per_site`` simulated devices at every site (``fedge_lab.simfleet``), in ``processes`` per site,
        once every site follows the root: an update sent before a site first subscribed would find no one."""
        from coordinator.initial import initial_state

        wait_until(self.sites_following, 120, "every site to follow the root (its subscriptions in place)")

        _, v0 = initial_state(ModelSpecConfig(source=self.source, lora_r=self.lora_r, lora_alpha=2 * self.lora_r))
        v0_path = self.work / "sim" / "v0.frame"
        v0_path.parent.mkdir(parents=True, exist_ok=True)
        v0_path.write_bytes(compress_dense(v0, FrameKind.SNAPSHOT))
        objective = plan.pop("objective", ObjectiveConfig())
        start_at = time.time() + 2.0
        index = 0
        for s, node in enumerate(self.nodes):
            devices = [SimDevice(id=f"{node.name}-d{k:05d}", index=index + k) for k in range(devices_per_site)]
            index += devices_per_site
            for p in range(processes):
                name = f"{node.name}-sim{p}"
                path = self.work / "sim" / f"{name}.json"
                fp = FleetPlan(
                    host="127.0.0.1",
                    port=node.broker.port,
                    fleet=self.fleet,
                    devices=tuple(devices[p::processes]),
                    v0_path=str(v0_path),
                    start_at=start_at,
                    end_at=start_at + 3600,
                    log_path=str(path.with_suffix(".log")),
                    step_s=step_s,
                    seed=seed * 1000 + s * 10 + p,
                    objective=objective,
                    **plan,
                )
                path.write_text(fp.to_json())
                argv = [sys.executable, "-m", "fedge_lab.simfleet", str(path)]
                node.sims.append(Child(name, argv, self.work / "logs" / f"{name}.log").start())

    def stop_sims(self) -> None:
        for node in self.nodes:
            for c in node.sims:
                c.stop()

    def stop(self) -> None:
        """Everything, by PID: devices, site aggregators, the root, relays and brokers."""
        self.stop_sims()
        for node in self.nodes:
            if node.coordinator is not None:
                node.coordinator.stop()
        if self.root is not None:
            self.root.stop()
        for node in self.nodes:
            node.relay.close()
            node.broker.stop()
        if self.root_broker is not None:
            self.root_broker.stop()

    # -- reading the tiers' state ------------------------------------------------------

    def db(self, state_dir: Path) -> sqlite3.Connection:
        """A read-only connection to a tier's database (with the WAL: what has committed)."""
        return sqlite3.connect(f"file:{state_dir / 'coordinator.db'}?mode=ro", uri=True, timeout=30)

    def site_partials(self, i: int) -> dict[str, int]:
        """A site's partials waiting for the root's ack, and the updates waiting in its buffer."""
        with self.db(self.nodes[i].state_dir) as db:
            unacked = db.execute("SELECT COUNT(*) FROM site_partials WHERE acked IS NULL").fetchone()[0]
            buffered = db.execute("SELECT COUNT(*) FROM buffer").fetchone()[0]
        return {"unacked": int(unacked), "buffered": int(buffered)}

    def site_covered(self, i: int) -> dict[str, str]:
        """The update ids a site's partials cover, and each one's partial."""
        with self.db(self.nodes[i].state_dir) as db:
            return {r[0]: r[1] for r in db.execute("SELECT update_id, partial_id FROM partial_updates")}

    def drained(self) -> bool:
        """Every site has forwarded its buffer and heard the root acknowledge every partial."""
        return all(p["unacked"] == 0 and p["buffered"] == 0 for p in (self.site_partials(i) for i in range(self.n)))

    def sites_following(self) -> bool:
        """Every site has followed a root version, so its subscriptions, its devices' updates
        among them, are in place (one SUBSCRIBE carries them all)."""
        for node in self.nodes:
            with self.db(node.state_dir) as db:
                if db.execute("SELECT 1 FROM meta WHERE key='site_followed'").fetchone() is None:
                    return False
        return True

    def root_covered(self) -> dict[str, str]:
        with self.db(self.root_state) as db:
            return {r[0]: r[1] for r in db.execute("SELECT update_id, partial_id FROM partial_updates")}

    def root_version(self) -> int:
        with self.db(self.root_state) as db:
            return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()[0])

    def status(self) -> dict[str, Any]:
        return {
            "root_version": self.root_version(),
            "sites": {n.name: self.site_partials(i) for i, n in enumerate(self.nodes)},
        }


def _kill(child: Child | None) -> None:
    """kill -9 by PID, and reap it."""
    if child is not None and child.proc is not None and child.proc.poll() is None:
        child.proc.kill()
        child.proc.wait(10)


def wait_until(pred: Any, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except sqlite3.OperationalError:
            pass  # the database is being created or is locked for a moment
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
