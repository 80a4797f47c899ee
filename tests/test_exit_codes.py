"""Both daemons speak one table of exit codes."""

from __future__ import annotations

from compression.exitcodes import ExitCode
from coordinator import errors as coordinator_errors
from edge_agent import errors as agent_errors


def test_the_same_failure_exits_with_the_same_code_on_both_daemons() -> None:
    assert agent_errors.ConfigError.exit_code == coordinator_errors.ConfigError.exit_code == ExitCode.CONFIG
    assert agent_errors.StateError.exit_code == coordinator_errors.StoreError.exit_code == ExitCode.STATE
    assert agent_errors.TransportError.exit_code == coordinator_errors.BrokerError.exit_code == ExitCode.BROKER
    assert agent_errors.AgentError.exit_code == coordinator_errors.CoordinatorError.exit_code == ExitCode.FAILURE


def test_every_error_class_has_a_code_from_the_table() -> None:
    for module in (agent_errors, coordinator_errors):
        for obj in vars(module).values():
            if isinstance(obj, type) and hasattr(obj, "exit_code"):
                assert obj.exit_code in set(ExitCode), obj


def test_codes_keep_their_numbers() -> None:
    """Units and scripts depend on them (``RestartPreventExitStatus=2``)."""
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "FAILURE": 1,
        "CONFIG": 2,
        "MODEL": 3,
        "DATA": 4,
        "BROKER": 5,
        "STATE": 6,
        "INTERRUPTED": 130,
    }
