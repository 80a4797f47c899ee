"""Network impairment for the testbed: a network namespace behind a veth pair, shaped with tc.

The testbed creates one namespace and one veth pair of its own (nothing else on the host
is touched). Agents of impaired groups run inside the namespace and reach the broker at
the host end of the pair; the broker listens there as well as on 127.0.0.1. Both ends
get the same qdisc, so delay and loss apply in both directions and a rate limit caps
each direction.

``netem`` gives delay, jitter, loss and rate. Some kernels are built without it
(``sch_netem``); then a rate limit alone falls back to ``tbf``, and asking for delay or
loss is an error that says so, rather than a run that silently is not impaired.
Needs root (CAP_NET_ADMIN) and the ``ip`` and ``tc`` tools.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from coordinator.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Impairment:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_kbit: int = 0
    """0 = no rate limit."""

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.rate_kbit < 0:
            raise ConfigError("impairment.delay_ms, jitter_ms and rate_kbit must not be negative")
        if not 0.0 <= self.loss_pct <= 100.0:
            raise ConfigError(f"impairment.loss_pct must be in [0, 100], got {self.loss_pct}")
        if self.jitter_ms and not self.delay_ms:
            raise ConfigError("impairment.jitter_ms needs impairment.delay_ms")

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.loss_pct or self.rate_kbit)

    @property
    def needs_netem(self) -> bool:
        return bool(self.delay_ms or self.loss_pct)

    def netem_args(self) -> list[str]:
        args = ["netem"]
        if self.delay_ms:
            args += ["delay", f"{self.delay_ms:g}ms"] + ([f"{self.jitter_ms:g}ms"] if self.jitter_ms else [])
        if self.loss_pct:
            args += ["loss", f"{self.loss_pct:g}%"]
        if self.rate_kbit:
            args += ["rate", f"{self.rate_kbit}kbit"]
        return args

    def tbf_args(self) -> list[str]:
        # Burst of at least one MTU-sized packet per timer tick; 200 ms of queue before drops.
        burst = max(1600, self.rate_kbit * 1000 // 8 // 100)
        return ["tbf", "rate", f"{self.rate_kbit}kbit", "burst", str(burst), "latency", "200ms"]


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def netns_supported() -> str | None:
    """None when namespaces can be used here, else why not."""
    if os.geteuid() != 0:
        return "network impairment needs root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network impairment needs the '{tool}' tool (apt-get install -y iproute2)"
    return None


class ImpairedLink:
    """A namespace ``fedge-tb-<tag>`` joined to the host by a veth pair on ``10.213.<n>.0/30``."""

    def __init__(self, impairment: Impairment, tag: int | None = None) -> None:
        why = netns_supported()
        if why:
            raise ConfigError(why)
        tag = os.getpid() if tag is None else tag
        self.impairment = impairment
        self.netns = f"fedge-tb-{tag}"
        self.host_if = f"ftb{tag % 100000}h"
        self.ns_if = f"ftb{tag % 100000}n"
        octet = 1 + tag % 250
        self.host_ip = f"10.213.{octet}.1"
        self.ns_ip = f"10.213.{octet}.2"
        self.qdisc = "none"
        self.created = False

    def create(self) -> ImpairedLink:
        ns, h, n = self.netns, self.host_if, self.ns_if
        self.created = True
        try:
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", h, "type", "veth", "peer", "name", n])
            _run(["ip", "link", "set", n, "netns", ns])
            _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", h])
            _run(["ip", "link", "set", h, "up"])
            _run(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", n])
            _run(["ip", "netns", "exec", ns, "ip", "link", "set", n, "up"])
            _run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
            self._shape()
        except Exception:
            self.destroy()
            raise
        log.info("netns %s via %s (%s) <-> %s (%s), qdisc %s", ns, h, self.host_ip, n, self.ns_ip, self.qdisc)
        return self

    def _shape(self) -> None:
        imp = self.impairment
        if not imp.active:
            return
        targets = (["tc", "qdisc", "replace", "dev", self.host_if, "root"], ["ip", "netns", "exec", self.netns, "tc", "qdisc", "replace"])
        host_cmd, ns_cmd = targets[0], targets[1] + ["dev", self.ns_if, "root"]
        res = _run(host_cmd + imp.netem_args(), check=False)
        if res.returncode == 0:
            _run(ns_cmd + imp.netem_args())
            self.qdisc = " ".join(imp.netem_args())
            return
        if "unknown" not in (res.stderr + res.stdout).lower():
            raise RuntimeError(f"tc netem failed: {res.stderr.strip()}")
        if imp.needs_netem:
            raise ConfigError(
                "impairment.delay_ms and loss_pct need the kernel's netem qdisc (sch_netem), which this kernel lacks; "
                "a rate limit alone works through tbf"
            )
        _run(host_cmd + imp.tbf_args())
        _run(ns_cmd + imp.tbf_args())
        self.qdisc = " ".join(imp.tbf_args())

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs, so the PID is the program's)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def destroy(self) -> None:
        if not self.created:
            return
        pids = _run(["ip", "netns", "pids", self.netns], check=False).stdout.split()
        if pids:
            log.warning("processes still in %s at teardown: %s", self.netns, " ".join(pids))
        _run(["ip", "netns", "del", self.netns], check=False)
        _run(["ip", "link", "del", self.host_if], check=False)  # gone with the namespace, normally
        self.created = False
