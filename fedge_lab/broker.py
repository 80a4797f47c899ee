"""A private MQTT broker process on a free loopback port, stopped by its own PID.

Mosquitto is used when installed. Otherwise the demo can fall back to amqtt, a
pure-Python broker: MQTT 3.1.1 only, no ACLs, demo use only (see FACTS in the docs).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous {anonymous}
persistence {persistence}
persistence_location {data_dir}/
autosave_interval 1
log_dest file {data_dir}/mosquitto.log
log_type error
log_type warning
log_type notice
# The default of 1000 silently drops messages to a slow subscriber; bound bytes instead.
max_queued_messages 100000
max_queued_bytes 1073741824
max_inflight_messages 1000
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


class Broker:
    """A broker subprocess. ``protocol`` is the MQTT version clients must use with it."""

    kind = "none"
    protocol = "5"

    def __init__(self, data_dir: str | Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> Broker:
        log_path = self.data_dir / f"{self.kind}.stdout"
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(self._command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.port, timeout, self.proc)
        except RuntimeError:
            self.stop()
            raise
        log.info("%s broker pid %d on 127.0.0.1:%d", self.kind, self.proc.pid, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the broker by PID, SIGKILL it if it does not exit in ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the broker (crash simulation)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MosquittoBroker(Broker):
    kind = "mosquitto"
    protocol = "5"

    def __init__(
        self, data_dir: str | Path, port: int | None = None, persistence: bool = False, *, anonymous: bool = True, extra: str = ""
    ) -> None:
        """``extra`` is appended to the config: password/ACL files and TLS options of the one listener."""
        super().__init__(data_dir, port)
        binary = mosquitto_path()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.binary = binary
        flags = {"persistence": "true" if persistence else "false", "anonymous": "true" if anonymous else "false"}
        conf = MOSQUITTO_CONF.format(port=self.port, data_dir=self.data_dir, **flags)
        conf += extra
        if os.geteuid() == 0:
            conf += "user root\n"  # otherwise it drops to 'mosquitto', which cannot write data_dir
        self.conf_path = self.data_dir / "mosquitto.conf"
        self.conf_path.write_text(conf)

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.conf_path)]


class AmqttBroker(Broker):
    """amqtt 0.12: MQTT 3.1.1 only, no ACLs. For the demo on machines without Mosquitto."""

    kind = "amqtt"
    protocol = "3.1.1"

    def __init__(self, data_dir: str | Path, port: int | None = None) -> None:
        super().__init__(data_dir, port)
        self.conf_path = self.data_dir / "amqtt.yaml"
        self.conf_path.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )

    def _command(self) -> list[str]:
        exe = shutil.which("amqtt") or str(Path(sys.executable).parent / "amqtt")
        return [exe, "-c", str(self.conf_path)]


def start_lab_broker(data_dir: str | Path, prefer: str = "auto") -> Broker:
    """Mosquitto when available (or required), else amqtt."""
    if prefer in ("auto", "mosquitto") and mosquitto_path():
        return MosquittoBroker(data_dir).start()
    if prefer == "mosquitto":
        raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
    log.warning("Mosquitto not found: using the amqtt demo broker (MQTT 3.1.1, no ACLs; never for production)")
    return AmqttBroker(data_dir).start()
