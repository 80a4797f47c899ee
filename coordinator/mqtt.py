"""The coordinator side's one paho client factory: MQTT v5, identity-bound client id, TLS.

The client id is the broker identity (the user name), so that the broker's
``use_username_as_clientid`` and the client agree; without a user name (a lab broker) it
is ``coordinator-<fleet>``. TLS takes the fleet CA and, optionally, a client certificate.
"""

from __future__ import annotations

import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from coordinator.config import BrokerConfig
from coordinator.errors import ConfigError


def make_client(b: BrokerConfig, client_id: str, *, manual_ack: bool = False, persistent: bool = False) -> mqtt.Client:
    """A configured, unconnected client; ``persistent`` keeps a broker session (v5 ``clean_start`` off)."""
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
            raise ConfigError(f"broker TLS settings (cafile {b.cafile}, certfile {b.certfile}): {exc}") from None
    return client


def connect_kwargs(b: BrokerConfig, *, persistent: bool) -> dict[str, Any]:
    """Extra arguments of ``connect`` for a v5 session that outlives the connection."""
    if b.protocol != "5" or not persistent:
        return {}
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = b.session_expiry_s
    return {"clean_start": False, "properties": props}
