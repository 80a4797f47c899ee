"""systemd's notify protocol (``Type=notify``): READY, STATUS, WATCHDOG and STOPPING.

Messages are datagrams to the socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace). Outside systemd the variable is unset and every call is a
no-op. The watchdog is fed from a thread, but only while the main loop keeps reporting
progress (``alive()``), so a hung training step does get the service restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages when ``$NOTIFY_SOCKET`` is set."""

    def __init__(self, environ: dict[str, str] | None = None, stall_s: float = 900.0) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        own = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and own else None
        self.stall_s = stall_s
        self._last_alive = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")
        if self.watchdog_s and self._thread is None:
            self._thread = threading.Thread(target=self._feed, name="sd-watchdog", daemon=True)
            self._thread.start()

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def alive(self) -> None:
        """The main loop made progress (a step, a message, a heartbeat)."""
        self._last_alive = time.monotonic()

    def stopping(self, status: str = "stopping") -> None:
        self._stop.set()
        self.send("STOPPING=1", f"STATUS={status}")

    def _feed(self) -> None:
        assert self.watchdog_s is not None
        interval = self.watchdog_s / 2
        while not self._stop.wait(interval):
            stalled = time.monotonic() - self._last_alive
            if stalled < self.stall_s:
                self.send("WATCHDOG=1")
            else:
                log.error("main loop made no progress for %.0fs; letting the systemd watchdog fire", stalled)
