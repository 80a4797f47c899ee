"""When a device may train: a local-time window, free memory, load and power.

Each check reads what the OS reports (psutil); a check the OS cannot answer passes
(a desktop without a battery is always "on AC power").
"""

from __future__ import annotations

import datetime as dt
import os

import psutil

from edge_agent.config import ScheduleConfig, parse_window


def in_window(window: str, now: dt.datetime) -> bool:
    start, end = parse_window(window)
    minute = now.hour * 60 + now.minute
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # wraps midnight


def blocked_reason(cfg: ScheduleConfig, now: dt.datetime | None = None) -> str | None:
    """Why training must wait now, or ``None`` when it may run."""
    now = now or dt.datetime.now()
    if not in_window(cfg.window, now):
        return f"outside the training window {cfg.window}"
    if cfg.min_free_memory_mb:
        available = psutil.virtual_memory().available / 2**20
        if available < cfg.min_free_memory_mb:
            return f"{available:.0f} MiB available, below schedule.min_free_memory_mb={cfg.min_free_memory_mb}"
    if cfg.max_load_per_cpu:
        try:
            load = os.getloadavg()[0] / (os.cpu_count() or 1)
        except OSError:
            load = 0.0
        if load > cfg.max_load_per_cpu:
            return f"load {load:.2f} per CPU, above schedule.max_load_per_cpu={cfg.max_load_per_cpu}"
    if cfg.require_ac_power:
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        if battery is not None and not battery.power_plugged:
            return "on battery power (schedule.require_ac_power)"
    return None
