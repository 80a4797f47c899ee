"""The one paho client factory of the project: MQTT v5 (or 3.1.1), credentials, TLS, session, backoff.

The agent, the coordinator, the operator CLI, the lab and the tests build every client here,
so that they all speak the same protocol version, check the broker's certificate the same
way and keep (or drop) their broker session the same way. It only builds clients; it
connects nothing.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class BrokerSettings(Protocol):
    """What the factory reads of a broker config (the agent's and the coordinator's ``[broker]`` both fit)."""

    @property
    def protocol(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...
    @property
    def tls(self) -> bool: ...
    @property
    def cafile(self) -> str | None: ...
    @property
    def certfile(self) -> str | None: ...
    @property
    def keyfile(self) -> str | None: ...


@dataclass(frozen=True)
class Broker:
    """Plain broker settings, for tools, the lab and tests (a loopback broker without TLS by default)."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    keepalive: int = 30
    username: str | None = None
    password: str | None = None
    tls: bool = False
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    session_expiry_s: int = 86400


class ClientSetupError(ValueError):
    """The client cannot be set up as configured (unreadable TLS files); the message names them."""


def make_client(
    b: BrokerSettings,
    client_id: str,
    *,
    manual_ack: bool = False,
    persistent: bool = False,
    backoff: tuple[float, float] | None = None,
) -> mqtt.Client:
    """A configured, unconnected client.

    ``persistent`` keeps a broker session across connections (v5: ``clean_start`` off in
    :func:`connect_kwargs`; 3.1.1: ``clean_session`` off). ``backoff`` sets paho's reconnect
    delay range in seconds.
    """
    v5 = b.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    if b.username:
        client.username_pw_set(b.username, b.password)
    if b.tls:
        try:
            client.tls_set(ca_certs=b.cafile, certfile=b.certfile, keyfile=b.keyfile, cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ClientSetupError(f"broker TLS settings (cafile {b.cafile}, certfile {b.certfile}): {exc}") from None
    if backoff is not None:
        client.reconnect_delay_set(backoff[0], backoff[1])  # type: ignore[arg-type]  # paho accepts float seconds
    return client


def connect_kwargs(b: BrokerSettings, *, persistent: bool, session_expiry_s: int = 86400) -> dict[str, Any]:
    """Extra arguments of ``connect`` for a v5 session that outlives the connection."""
    if b.protocol != "5" or not persistent:
        return {}
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = getattr(b, "session_expiry_s", session_expiry_s)
    return {"clean_start": False, "properties": props}


def loopback(port: int, **settings: Any) -> Broker:
    """Settings of a broker on 127.0.0.1:``port``."""
    return Broker(port=port, **settings)
