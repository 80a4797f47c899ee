"""Exceptions of the coordinator. ``cli.main`` maps them to exit codes (:class:`compression.exitcodes.ExitCode`)."""

from compression.exitcodes import ExitCode
from compression.reasons import Reason, reason_code


class CoordinatorError(Exception):
    """Base class of coordinator errors."""

    exit_code: int = ExitCode.FAILURE


class ConfigError(CoordinatorError):
    """The configuration is invalid; the message names the key."""

    exit_code = ExitCode.CONFIG


class StoreError(CoordinatorError):
    """The state directory is unusable or inconsistent."""

    exit_code = ExitCode.STATE


class BrokerError(CoordinatorError):
    """The broker cannot be reached."""

    exit_code = ExitCode.BROKER


class Rejection(Exception):
    """An update is refused. ``reason`` is a short stable code that is counted and shown."""

    def __init__(self, reason: Reason | str, detail: str) -> None:
        code = reason_code(reason)  # a code outside the one table is a bug, not a new reason
        super().__init__(f"{code}: {detail}")
        self.reason = code
        self.detail = detail
