"""The exit codes of both daemons and of every CLI command: one table.

systemd units rely on it (``RestartPreventExitStatus=2``: a bad config cannot fix
itself), and so do scripts around ``check``. A code, once given, keeps its meaning.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    """Anything without a code of its own: an unexpected error, or a command whose target
    refused (a command sent to an offline device)."""
    CONFIG = 2
    """The configuration (or a device profile) is invalid; the message names the key."""
    MODEL = 3
    """The model cannot be loaded or exported, or does not match the fleet's global state."""
    DATA = 4
    """The local data directory is missing, empty or unreadable (agent)."""
    BROKER = 5
    """The broker cannot be reached, or refused the connection or a message."""
    STATE = 6
    """The state directory is missing, unwritable (disk full, read-only) or damaged."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C (SIGINT)."""


EXIT_CODE_TABLE = "\n".join(f"{int(c):>3}  {c.name.lower()}" for c in ExitCode)
"""The table as ``--help`` epilogs print it."""
