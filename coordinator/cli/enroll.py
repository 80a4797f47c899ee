"""``fedge-coordinator enroll`` and ``revoke``: device identities and broker credentials."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from coordinator.cli.common import add_state_args, state_dir


def register(sub: Any) -> None:
    p = sub.add_parser("enroll", help="create a device's Ed25519 key, broker credentials and agent config snippet")
    p.add_argument("device")
    add_state_args(p)
    p.add_argument("--out", required=True, help="new directory for the device's secrets (copy it to the device)")
    p.add_argument("--password-file", help="Mosquitto password_file to add the device to")
    p.add_argument("--ca-dir", help="fleet CA directory: also issue a client certificate (CN = device id)")
    p.add_argument("--fleet", help="fleet id for the snippet (default: the config's)")
    p.add_argument("--broker-host", default="broker.lan", help="broker host for the snippet")
    p.add_argument("--broker-port", type=int, default=8883, help="broker port for the snippet")
    p.add_argument("--force", action="store_true", help="replace the key and password of a device that is already enrolled")
    p.add_argument("--max-samples", type=int, help="cap on the sample count this device's updates are weighted with")
    p.set_defaults(func=run_enroll)
    r = sub.add_parser("revoke", help="revoke a device: refuse its updates and delete its broker password")
    r.add_argument("device")
    add_state_args(r)
    r.add_argument("--password-file", help="Mosquitto password_file to remove the device from")
    r.set_defaults(func=run_revoke)


def run_enroll(args: argparse.Namespace) -> int:
    from coordinator.enrolment import enroll

    fleet, site_keys = args.fleet, None
    if args.config:
        from coordinator.config import load_config
        from coordinator.identity import public_hex
        from coordinator.site import load_signing_key

        cfg = load_config(args.config)
        fleet = fleet or cfg.fleet
        if cfg.site.enabled:  # a device of this site: the root's key for versions, the site's for acks
            site_keys = (cfg.site.root_public_key, public_hex(load_signing_key(cfg.site.signing_key)))
    report = enroll(
        state_dir(args),
        args.device,
        args.out,
        fleet=fleet or "default",
        broker_host=args.broker_host,
        broker_port=args.broker_port,
        password_file=Path(args.password_file) if args.password_file else None,
        ca_dir=Path(args.ca_dir) if args.ca_dir else None,
        force=args.force,
        max_samples=args.max_samples,
        site_keys=site_keys,
    )
    print(json.dumps(report))
    if args.password_file:
        print("reload the broker to apply the password file: systemctl reload mosquitto (or kill -HUP its pid)")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from coordinator.enrolment import revoke

    changed = revoke(state_dir(args), args.device, password_file=Path(args.password_file) if args.password_file else None)
    print(f"{args.device}: {'revoked' if changed else 'already revoked'}; its updates are refused from now on")
    if args.password_file:
        print("reload the broker to drop its password: systemctl reload mosquitto (or kill -HUP its pid)")
    return 0
