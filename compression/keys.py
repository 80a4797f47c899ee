"""An Ed25519 public key as the protocol's :data:`~compression.protocol.Verifier`: ``(signature, message) -> valid``."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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
