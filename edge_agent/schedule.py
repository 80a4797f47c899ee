"""When a device may train: a local-time window, free memory, load and power.

Each check reads what the OS reports (psutil); a check the OS cannot answer passes
(a desktop without a battery is always "on AC power").
"""

from __future__ import annotations

import datetime as dt
import math
import os

import psutil

from edge_agent.config import ScheduleConfig, parse_window


def in_window(window: str, now: dt.datetime) -> bool:
    start, end = parse_window(window)
    minute = now.hour * 60 + now.minute
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # wraps midnight


class OwnLoad:
    """This process's share of the 1-minute load average, estimated as the kernel computes the
    load: an exponential average (time constant 60 s) of the CPUs it kept busy.

    ``schedule.max_load_per_cpu`` is about the rest of the machine: without taking its own
    training out, an agent that trains with every core sees its own load above the limit
    after its first rounds and stops itself on an otherwise idle machine.
    """

    TAU_S = 60.0

    def __init__(self, now: float, process: psutil.Process | None = None) -> None:
        self._process = process or psutil.Process()
        self.value = 0.0
        self._last: tuple[float, float] | None = None
        self.sample(now)  # from here on (the agent's start: loading its model counts too)

    def sample(self, now: float) -> float:
        """Update from the CPU time used since the last sample (``now``: a monotonic clock, seconds)."""
        times = self._process.cpu_times()
        cpu = times.user + times.system
        if self._last is not None and now > self._last[0]:
            dt_s = now - self._last[0]
            busy = max(cpu - self._last[1], 0.0) / dt_s
            decay = math.exp(-dt_s / self.TAU_S)
            self.value = self.value * decay + busy * (1 - decay)
        self._last = (now, cpu)
        return self.value


def blocked_reason(cfg: ScheduleConfig, now: dt.datetime | None = None, own_load: float = 0.0) -> str | None:
    """Why training must wait now, or ``None`` when it may run. ``own_load``: the part of the
    load average that is the agent's own training (:class:`OwnLoad`), which does not count."""
    now = now or dt.datetime.now()
    if not in_window(cfg.window, now):
        return f"outside the training window {cfg.window}"
    if cfg.min_free_memory_mb:
        available = psutil.virtual_memory().available / 2**20
        if available < cfg.min_free_memory_mb:
            return f"{available:.0f} MiB available, below schedule.min_free_memory_mb={cfg.min_free_memory_mb}"
    if cfg.max_load_per_cpu:
        try:
            load = max(os.getloadavg()[0] - own_load, 0.0) / (os.cpu_count() or 1)
        except OSError:
            load = 0.0
        if load > cfg.max_load_per_cpu:
            mine = f" (this agent's own {own_load:.1f} not counted)" if own_load >= 0.05 else ""
            return f"load {load:.2f} per CPU from other processes{mine}, above schedule.max_load_per_cpu={cfg.max_load_per_cpu}"
    if cfg.require_ac_power:
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        if battery is not None and not battery.power_plugged:
            return "on battery power (schedule.require_ac_power)"
    return None
