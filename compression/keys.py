"""Ed25519 keys for the protocol: a public key as a :data:`~compression.protocol.Verifier`
(``(signature, message) -> valid``), and a private key from the PEM that enrolment writes."""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compression.protocol import Verifier


def ed25519_verifier(public: bytes | Ed25519PublicKey) -> Verifier:
    """The check of signatures by ``public`` (its 32 raw bytes, or the key); raises ``ValueError`` for a malformed key."""
    key = public if isinstance(public, Ed25519PublicKey) else Ed25519PublicKey.from_public_bytes(public)

    def verify(signature: bytes, message: bytes) -> bool:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    return verify


def load_private_key(path: str | Path, what: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file ``path``; raises ``ValueError`` naming ``what`` and the file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{what} {path}: cannot load an Ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{what} {path}: not an Ed25519 key")
    return key
