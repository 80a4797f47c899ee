"""Device identities: Ed25519 keys, enrolment, revocation, and the check of every signed update.

A device is *enrolled* when the coordinator holds its public key. From then on each of its
updates must be a signed ``FEV2`` envelope whose signature verifies against that key, with
a sequence number above the last one accepted (so that a captured update cannot be
replayed), and the device must not be revoked. Devices that were never enrolled are
accepted unsigned only while ``limits.allow_unknown_devices`` is true (the lab default);
``limits.require_signatures`` refuses unsigned updates from anyone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compression import protocol
from compression.keys import ed25519_verifier
from compression.protocol import Envelope
from coordinator.errors import Rejection, StoreError
from coordinator.store import Store


def new_key() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as ``(private PEM, raw 32-byte public key)``."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, public


def enrolled_key(identity: Mapping[str, Any] | None) -> protocol.Verifier | None:
    """The check of an enrolled identity's Ed25519 key (a device's or a site's), or None when it
    is not enrolled or was revoked: the messages of secure aggregation and of sites are signed."""
    if identity is None or identity.get("revoked") is not None:
        return None
    return ed25519_verifier(bytes(identity["public_key"]))


def write_private(path: Path, pem: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())


class Verifier:
    """Checks the identity of every update against the enrolment registry in the store."""

    def __init__(self, store: Store, *, allow_unknown: bool, require_signatures: bool) -> None:
        self.store = store
        self.allow_unknown = allow_unknown
        self.require_signatures = require_signatures
        self._keys: dict[str, tuple[bytes, Ed25519PublicKey]] = {}

    def _public(self, raw: bytes) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(raw)

    def check(self, env: Envelope) -> bool:
        """Raise :class:`Rejection` unless the envelope's identity holds; True if it was signed by an enrolled key."""
        device = env.header.device
        ident = self.store.identity(device)
        if ident is None:
            if env.signature is not None:
                raise Rejection("unknown_key", f"update signed by {device!r}, which is not enrolled")
            if self.require_signatures:
                raise Rejection("unsigned", f"update from {device!r} is not signed")
            if not self.allow_unknown:
                raise Rejection("unknown_device", f"device {device!r} is not enrolled")
            return False
        if ident["revoked"] is not None:
            raise Rejection("revoked", f"device {device!r} was revoked")
        if env.signature is None:
            raise Rejection("unsigned", f"update from enrolled device {device!r} is not signed")
        raw = bytes(ident["public_key"])
        cached = self._keys.get(device)
        if cached is None or cached[0] != raw:
            cached = (raw, self._public(raw))
            self._keys[device] = cached
        try:
            cached[1].verify(env.signature, env.signed)
        except InvalidSignature:
            raise Rejection("bad_signature", f"signature of {device!r}'s update does not verify (tampered, or another key)") from None
        if env.header.seq <= int(ident["last_seq"]):
            raise Rejection("replayed", f"sequence number {env.header.seq} of {device!r} is not above {ident['last_seq']}")
        return True


FLEET_KEY = "fleet.key"
"""The fleet key's private half, in the coordinator's state directory (0600)."""


def fleet_key(state_dir: str | Path, *, create: bool) -> Ed25519PrivateKey:
    """The fleet's Ed25519 key, which signs every global meta and ack; created on first use with ``create``."""
    path = Path(state_dir) / FLEET_KEY
    if not path.exists():
        if not create:
            raise StoreError(f"{path} is missing: the fleet key signs the global model; restore it, or start a new fleet with --init")
        pem, _ = new_key()
        write_private(path, pem)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise StoreError(f"{path}: cannot load the fleet key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise StoreError(f"{path}: not an Ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    """The raw public key in hex: what goes into ``fleet_public_key`` of every agent."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
