"""The operator CLI, run as the operator runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from compression.exitcodes import ExitCode
from coordinator.cli import main
from coordinator.store import LedgerEntry, Store


def _fill(root: Path) -> None:
    store = Store(root, create=True)
    store.commit_version(0, {"w": np.zeros(2, np.float32)}, None, keep=5)
    entry = LedgerEntry(
        update_id="u1", device="pi-1", seq=1, base_version=0, staleness=0, weight=0.6, num_samples=4, size=321, train_loss=2.0
    )
    store.commit_version(1, {"w": np.ones(2, np.float32)}, entry, keep=5)
    store.record_status("pi-1", "training", 1, "raspberry-pi-4", {"eval_loss": 2.5, "rss_mb": 900.0})
    store.record_status("pi-2", "offline", 0, "laptop", {})
    store.close()


def test_devices_json_lists_every_device(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _fill(tmp_path)
    assert main(["devices", "--state-dir", str(tmp_path), "--json"]) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["pi-1"]["state"] == "online" and rows["pi-1"]["activity"] == "training"
    assert (rows["pi-1"]["accepted"], rows["pi-1"]["bytes_up"], rows["pi-1"]["base_version"]) == (1, 321, 1)
    assert rows["pi-2"]["state"] == "offline" and rows["pi-2"]["staleness"] == 1
    assert rows["pi-1"]["last_seen"] is not None


def test_devices_table_renders(tmp_path: Path) -> None:
    _fill(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "coordinator", "devices", "--state-dir", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert "pi-1" in out and "pi-2" in out and "offline" in out and "online" in out


def test_missing_state_is_a_clear_error_with_the_state_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "devices", "--state-dir", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert proc.returncode == ExitCode.STATE and "no coordinator state" in proc.stderr
