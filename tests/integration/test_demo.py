"""`fedge-coordinator demo` end to end with the tiny model: the JSON contract and the report files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_demo_runs_and_loss_falls_on_every_device(tmp_path: Path, mosquitto_binary: str) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator",
            "demo",
            "--model",
            "tiny",
            "--broker",
            "mosquitto",
            "--duration",
            "15",
            "--agents",
            "2",
            "--run-dir",
            str(run_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "versions",
        "updates_accepted",
        "updates_rejected",
        "bytes_up",
        "dense_bytes_up",
        "eval_loss_before",
        "eval_loss_after",
        "model",
    ):
        assert key in report, key
    assert report["model"] == "tiny" and report["versions"] >= 2
    assert report["updates_rejected"] == 1 and report["rejections"] == {"bad_checksum": 1}
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["bytes_up"] < report["dense_bytes_up"]
    assert (run_dir / "report.json").is_file() and (run_dir / "eval_loss.png").stat().st_size > 1000
