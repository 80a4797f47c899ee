"""A load generator: prebuilt MQTT v5 PUBLISH packets (QoS 1) written on raw loopback sockets.

The coordinator benchmarks run the broker, the coordinator and the simulated fleet on one
2-core machine. A fleet of paho clients spends about half a millisecond of Python a message
(building the packet, its network thread, the PUBACK), as much as the coordinator spends on
it, so it would measure itself. Like ``mqtt-benchmark``-style tools, this one builds every
packet before the clock starts and only writes bytes and counts PUBACKs while it runs.
"""

from __future__ import annotations

import socket
import struct
import time


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def _utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">H", len(raw)) + raw


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """PUBLISH, QoS 1, no properties."""
    return _packet(0x32, _utf8(topic) + struct.pack(">H", packet_id) + b"\x00" + payload)


class FloodConnection:
    """One MQTT v5 connection that writes prebuilt PUBLISH packets, at most ``window`` unacknowledged."""

    def __init__(self, port: int, client_id: str, window: int = 400, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connect = b"\x00\x04MQTT\x05\x02" + struct.pack(">H", 60) + b"\x00" + _utf8(client_id)
        self.sock.sendall(_packet(0x10, connect))
        self.window = window
        self._buf = b""
        kind, body = self._read_packet()
        if kind >> 4 != 2 or len(body) < 2 or body[1] != 0:
            raise ConnectionError(f"broker refused the connection: CONNACK {body[:2].hex()}")
        self.inflight = 0

    def _read_packet(self) -> tuple[int, bytes]:
        while True:
            if len(self._buf) >= 2:
                n, shift, i = 0, 0, 1
                while i < len(self._buf) and i <= 4:
                    b = self._buf[i]
                    n |= (b & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not b & 0x80:
                        if len(self._buf) >= i + n:
                            kind, body = self._buf[0], self._buf[i : i + n]
                            self._buf = self._buf[i + n :]
                            return kind, body
                        break
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("broker closed the connection")
            self._buf += chunk

    def _drain(self, until: int) -> None:
        while self.inflight > until:
            kind, _ = self._read_packet()
            if kind >> 4 == 4:  # PUBACK
                self.inflight -= 1

    def send(self, packets: list[bytes]) -> None:
        """Write ``packets``, keeping at most ``window`` of them unacknowledged."""
        for i in range(0, len(packets), 50):
            chunk = packets[i : i + 50]
            self._drain(self.window - len(chunk))
            self.sock.sendall(b"".join(chunk))
            self.inflight += len(chunk)

    def finish(self, timeout: float = 60.0) -> None:
        """Wait for every PUBACK."""
        self.sock.settimeout(timeout)
        self._drain(0)

    def close(self) -> None:
        try:
            self.sock.sendall(_packet(0xE0, b"\x00\x00"))
        except OSError:
            pass
        self.sock.close()


def flood(port: int, packets: list[list[bytes]], client_id: str) -> float:
    """Write each list of packets on a connection of its own, interleaved; returns when all are
    acknowledged, with the time of the first write."""
    conns = [FloodConnection(port, f"{client_id}-{i}") for i in range(len(packets))]
    try:
        t_first = time.time()
        step = 50
        longest = max(len(p) for p in packets)
        for at in range(0, longest, step):
            for conn, own in zip(conns, packets, strict=True):
                if at < len(own):
                    conn.send(own[at : at + step])
        for conn in conns:
            conn.finish()
        return t_first
    finally:
        for conn in conns:
            conn.close()
