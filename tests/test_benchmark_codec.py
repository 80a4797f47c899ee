"""The codec benchmark runs end to end on the tiny model and reports the keys its targets are judged by."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_codec_benchmark_reports_both_runs_on_the_second_corpus() -> None:
    cmd = [sys.executable, "-m", "benchmarks.codec", "--model", "tiny", "--corpus", "numpy", "--rounds", "2", "--ticks", "1"]
    cmd += ["--candidates", "rotating 1/16 sign, rescaled", "Fed-SB core r=8, int8 up, int8 down", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["corpus"] == "numpy" and report["model"] == "tiny"
    keys = ("ratio_vs_dense_fp32", "rel_eval_loss_increase", "max_tick_rel_increase")
    for key in keys + ("short_run_kept_reduction", "short_run_kept_reduction_r3"):
        assert isinstance(report[key], float), key
    assert len(report["short_run_kept_by_round"]) == 2
    dense = report["candidates"]["dense fp32 links"]
    assert dense["short"]["kept_reduction"] == [1.0, 1.0]
    assert report["candidates"]["rotating 1/16 sign, rescaled"]["secagg"].startswith("yes")
    assert report["downlink_bytes_per_version"] > 0 and report["short_run_downlink_bytes_per_version"] > 0
    core = report["candidates"]["Fed-SB core r=8, int8 up, int8 down"]["short"]
    # Against the adapters' dense size: r^2 int8 values per module are far smaller than the adapters in fp32.
    assert core["ratio_vs_dense_fp32"] > dense["short"]["ratio_vs_dense_fp32"] * 4
    assert len(core["losses"]) == 3 and core["losses"][-1] != core["losses"][0]  # the cores trained


def test_an_unknown_candidate_is_named() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.codec", "--candidates", "top-99%"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "top-99%" in out.stderr
