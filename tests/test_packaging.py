"""Packaging facts users rely on."""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compression_resolves_to_fedge_wire_package() -> None:
    # Python 3.14 adds a standard-library `compression` package (PEP 784) that would shadow ours.
    mod = importlib.import_module("compression")
    assert Path(mod.__file__).resolve().parent == ROOT / "compression"
    assert hasattr(mod, "encode_frame")


def test_python_version_is_supported() -> None:
    assert (3, 10) <= sys.version_info[:2] < (3, 14)


def test_packages_import_on_their_own() -> None:
    import subprocess

    for pkg, forbidden in (
        ("compression", ("edge_agent", "coordinator", "torch", "paho")),
        ("coordinator.store", ("edge_agent",)),
        ("edge_agent.agent", ("coordinator", "fedge_lab")),
        ("coordinator.service", ("edge_agent", "fedge_lab")),
        # The operator CLI, watch included, loads the lab only when `demo` or `testbed` runs.
        ("coordinator.cli", ("fedge_lab", "edge_agent")),
    ):
        code = f"import sys, {pkg}; bad=[m for m in {forbidden!r} if m in sys.modules]; assert not bad, bad"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_module_of_the_coordinator_or_the_lab_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for pkg in ("coordinator", "fedge_lab")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert not long, f"split these modules: {long}"
