"""``fedge-coordinator cmd DEVICE pause|resume``: send a command to one device over the broker."""

from __future__ import annotations

import argparse
import json
import threading
import uuid
from typing import Any

from compression.exitcodes import ExitCode
from coordinator.cli.common import add_broker_args, broker_target
from coordinator.errors import BrokerError


def register(sub: Any) -> None:
    p = sub.add_parser("cmd", help="send pause or resume to a device")
    p.add_argument("device")
    p.add_argument("command", choices=["pause", "resume"])
    add_broker_args(p)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import paho.mqtt.client as mqtt

    from compression import protocol
    from compression.mqtt import Broker, make_client

    host, port, fleet, user, password = broker_target(args)
    protocol.check_id(args.device, "device id")
    status: dict[str, Any] = {}
    got_status = threading.Event()
    connected = threading.Event()
    client = make_client(Broker(host=host, port=port, username=user, password=password), f"cmd-{uuid.uuid4().hex[:8]}")

    def on_connect(c: mqtt.Client, u: object, f: object, reason: Any, p: object) -> None:
        if not getattr(reason, "is_failure", False):
            c.subscribe(protocol.device_status(fleet, args.device), qos=1)
            connected.set()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            status.update(json.loads(msg.payload))
        except ValueError:
            pass
        got_status.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(host, port)
    except OSError as exc:
        raise BrokerError(f"cannot reach the broker at {host}:{port}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(args.timeout):
            raise BrokerError(f"no CONNACK from {host}:{port} within {args.timeout:.0f}s")
        got_status.wait(1.0)  # the retained status, if the device ever reported
        info = client.publish(protocol.device_cmd(fleet, args.device), protocol.encode_command(args.command), qos=1)
        info.wait_for_publish(timeout=args.timeout)
        if not info.is_published():
            raise BrokerError(f"the broker did not acknowledge the command within {args.timeout:.0f}s")
    finally:
        client.disconnect()
        client.loop_stop()
    state = status.get("state")
    if state is None:
        print(f"sent {args.command} to {args.device}; it has never reported a status in fleet {fleet}")
    elif state == "offline":
        print(f"sent {args.command} to {args.device}, but it is offline: commands are not queued for offline devices")
        return ExitCode.FAILURE
    else:
        print(f"sent {args.command} to {args.device} (last state: {state})")
    return 0
