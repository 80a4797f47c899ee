"""Exceptions of the coordinator. ``cli.main`` maps them to exit codes (see ``docs/coordinator.md``)."""


class CoordinatorError(Exception):
    """Base class of coordinator errors."""

    exit_code = 1


class ConfigError(CoordinatorError):
    """The configuration is invalid; the message names the key."""

    exit_code = 2


class StoreError(CoordinatorError):
    """The state directory is unusable or inconsistent."""

    exit_code = 3


class BrokerError(CoordinatorError):
    """The broker cannot be reached."""

    exit_code = 5


class Rejection(Exception):
    """An update is refused. ``reason`` is a short stable code that is counted and shown."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
