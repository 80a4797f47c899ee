"""Exceptions of the agent. ``cli.main`` maps them to exit codes (:class:`compression.exitcodes.ExitCode`)."""

from compression.exitcodes import ExitCode


class AgentError(Exception):
    """Base class of agent errors."""

    exit_code: int = ExitCode.FAILURE


class ConfigError(AgentError):
    """The configuration or device profile is invalid; the message names the key."""

    exit_code = ExitCode.CONFIG


class ModelError(AgentError):
    """The model cannot be loaded, or does not match the fleet's global state."""

    exit_code = ExitCode.MODEL


class DataError(AgentError):
    """The local data directory is missing, empty or unreadable."""

    exit_code = ExitCode.DATA


class TransportError(AgentError):
    """The broker cannot be reached or refused a message."""

    exit_code = ExitCode.BROKER


class PublishRefused(TransportError):
    """The broker refused a message for good (not authorized, too large): retrying cannot help."""


class StateError(AgentError):
    """A file in the state directory is unreadable; the message names it and what to do."""

    exit_code = ExitCode.STATE
