"""Secure aggregation of a cohort, the cryptographic core (SecAgg, Bonawitz et al. 2017; the
pairwise-mask construction that SecAgg+, Bell et al. 2020, runs over a sparser graph).

Pure: no I/O and no clock. The device side is :class:`MaskingClient`, the coordinator side
:func:`unmask`. What goes between them (who sends what, in which round, signed by whom) is
the shells' job; every message here is a plain dataclass of bytes and integers.

The protocol, for a cohort of devices ``1..n`` with threshold ``t``:

1. **Keys.** Each device makes two X25519 key pairs: ``c`` to encrypt the shares it sends
   its peers, ``s`` to agree pairwise masks. It publishes both public keys.
2. **Shares.** Each device draws a 32-byte self-mask seed ``b`` and splits ``b`` and its
   ``s`` private key into ``n`` Shamir shares with threshold ``t`` (:class:`Shamir`,
   over the prime field of ``2^521 - 1``). Share ``j`` goes to peer ``j``, encrypted with
   ChaCha20-Poly1305 under a key that HKDF derives from the X25519 agreement of the two
   ``c`` keys, with both device ids bound in as associated data.
3. **Masked input.** Each device quantizes its vector into ``Z_2^32`` (:class:`Quantizer`)
   and adds its self-mask ``PRG(b)`` and, for every peer ``j``, ``+PRG(s_ij)`` if ``i < j``
   else ``-PRG(s_ij)``, where ``s_ij`` is HKDF of the X25519 agreement of the ``s`` keys.
   The PRG is ChaCha20's keystream, keyed by a 32-byte seed (never a 32-bit one).
   The pairwise masks cancel in the sum; the self-masks do not.
4. **Unmasking.** The coordinator names the devices whose masked input arrived (the
   survivors) and those that dropped out. Each survivor returns, for every survivor, its
   share of ``b``, and for every dropout, its share of ``s``. An honest device never
   returns both kinds for one peer (:class:`MaskingClient` refuses), since with both the
   coordinator could unmask that peer's input alone. With ``t`` shares of each, the
   coordinator removes the survivors' self-masks and the masks survivors shared with
   dropouts, and holds the sum of the survivors' quantized inputs, exactly.

The sum is recovered as long as at least ``t`` devices send masked inputs and answer the
unmasking round, so up to ``n - t`` may drop out. The coordinator learns only the sum, if
fewer than ``t`` devices collude with it (threat model: ``docs/secure-aggregation.md``).
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from compression.errors import ProtocolError

PRIME = (1 << 521) - 1
"""Shamir's field: a Mersenne prime, larger than any 32-byte secret."""
MAX_COHORT = 1000
MAX_VECTOR = 1 << 26
"""Values in one masked vector, at most (a 64M-value bound on every allocation here)."""
SHARE_BYTES = 66
"""A share's value, big-endian (``PRIME`` has 521 bits)."""


class SecAggError(ProtocolError):
    """A secure-aggregation message is malformed, forged, or asks for what an honest device must refuse."""


# -- primitives ---------------------------------------------------------------------------


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` uniform uint32 from a 32-byte seed: ChaCha20's keystream (nonce 0)."""
    if len(seed) != 32:
        raise SecAggError(f"a mask seed is 32 bytes, got {len(seed)}")
    if not 0 <= n <= MAX_VECTOR:
        raise SecAggError(f"a mask of {n} values is out of bounds (at most {MAX_VECTOR})")
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (4 * n)), dtype="<u4").astype(np.uint32)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _public(raw: bytes, what: str) -> X25519PublicKey:
    if len(raw) != 32:
        raise SecAggError(f"{what} is {len(raw)} bytes; an X25519 public key is 32")
    return X25519PublicKey.from_public_bytes(raw)


def pair_seed(own: X25519PrivateKey, peer: bytes, cohort: bytes, a: int, b: int) -> bytes:
    """The mask seed devices ``a`` and ``b`` share (the same from either side)."""
    lo, hi = min(a, b), max(a, b)
    return _hkdf(own.exchange(_public(peer, "a peer's mask key")), b"fedge secagg pair v1\x00" + cohort + struct.pack("<II", lo, hi))


# -- Shamir -------------------------------------------------------------------------------


class Shamir:
    """``t``-of-``n`` sharing of a 32-byte secret over GF(2^521 - 1); share ``x`` is for device ``x`` (1..n)."""

    @staticmethod
    def split(secret: bytes, n: int, t: int) -> dict[int, int]:
        if not 1 <= t <= n <= MAX_COHORT:
            raise SecAggError(f"threshold {t} of {n} devices is out of bounds (1 <= t <= n <= {MAX_COHORT})")
        coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
        shares = {}
        for x in range(1, n + 1):
            y = 0
            for c in reversed(coeffs):  # Horner
                y = (y * x + c) % PRIME
            shares[x] = y
        return shares

    @staticmethod
    def combine(shares: Mapping[int, int], t: int, length: int = 32) -> bytes:
        """The secret from any ``t`` shares (Lagrange at 0); raises if fewer are given."""
        if len(shares) < t:
            raise SecAggError(f"{len(shares)} shares cannot recover a secret shared with threshold {t}")
        points = sorted(shares.items())[:t]
        secret = 0
        for i, (xi, yi) in enumerate(points):
            num, den = 1, 1
            for j, (xj, _) in enumerate(points):
                if i != j:
                    num = num * (-xj) % PRIME
                    den = den * (xi - xj) % PRIME
            secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
        if secret >= 1 << (8 * length):
            raise SecAggError("the shares do not combine to a secret of the expected size (tampered or mixed shares)")
        return secret.to_bytes(length, "big")


# -- quantization into Z_2^32 --------------------------------------------------------------


@dataclass(frozen=True)
class Quantizer:
    """Values clipped to ``[-clip, clip]`` and stochastically rounded to signed integers of
    ``bits`` bits, in the ring ``Z_2^r`` with ``r = bits + ceil(log2(cohort))`` (at most 32),
    so that the sum of ``cohort`` of them cannot wrap: ``cohort * (2^(bits - 1) - 1) < 2^(r - 1)``.
    ``bits = 0`` takes the most the 32-bit ring allows. Masked values are ``r`` bits each on
    the wire (:func:`pack`)."""

    clip: float
    cohort: int
    bits: int = 0
    noise_sigma: float = 0.0
    """Standard deviation (integer units) of the noise all ``cohort`` members add to the sum at
    most (distributed DP): the ring also holds 12 of it, so that the noised sum cannot wrap either."""

    def __post_init__(self) -> None:
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise SecAggError(f"the clipping bound must be positive and finite, got {self.clip}")
        if not 1 <= self.cohort <= MAX_COHORT:
            raise SecAggError(f"a cohort of {self.cohort} devices is out of bounds (1..{MAX_COHORT})")
        if self.bits and not 2 <= self.bits <= 32 - self._growth:
            raise SecAggError(
                f"{self.bits}-bit values do not fit a 32-bit ring for a cohort of {self.cohort} (at most {32 - self._growth})"
            )
        if not (0.0 <= self.noise_sigma < 2.0**40 and np.isfinite(self.noise_sigma)) or self.ring_bits > 32:
            raise SecAggError(
                f"{self.value_bits}-bit values for a cohort of {self.cohort} with noise of standard deviation {self.noise_sigma:.3g} "
                "do not fit a 32-bit ring: use fewer bits"
            )

    @property
    def _growth(self) -> int:
        return max(1, int(np.ceil(np.log2(self.cohort))))

    @property
    def value_bits(self) -> int:
        return self.bits or 32 - self._growth

    @property
    def ring_bits(self) -> int:
        need = self.value_bits + self._growth
        if self.noise_sigma > 0:
            peak = self.cohort * ((1 << (self.value_bits - 1)) - 1) + 12.0 * self.noise_sigma
            need = max(need, int(np.ceil(np.log2(peak + 1.0))) + 1)
        return need

    @property
    def scale(self) -> float:
        """Integer units per unit of value."""
        return float((1 << (self.value_bits - 1)) - 1) / self.clip

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``x`` (float) as uint32 (two's complement): clipped, scaled, rounded up or down with
        the probability that keeps it unbiased."""
        v = np.clip(np.asarray(x, dtype=np.float64), -self.clip, self.clip) * self.scale
        low = np.floor(v)
        q = low + (rng.random(v.shape) < (v - low))
        return q.astype(np.int64).astype(np.uint32)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """The float sum from the recovered sum (mod ``2^ring_bits``) of up to ``cohort`` encoded vectors."""
        r = self.ring_bits
        t = np.asarray(total, dtype=np.uint32).astype(np.int64) & ((1 << r) - 1)
        t = np.where(t >= 1 << (r - 1), t - (1 << r), t)  # sign-extend from r bits
        return t.astype(np.float64) / self.scale


def skellam(mu: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws of Skellam noise (Poisson(mu) - Poisson(mu): integer, symmetric, variance
    ``2 mu``), as uint32 (two's complement). Sums of Skellam noise are Skellam, so the members'
    shares add up to the cohort's noise exactly (Agarwal et al., 2021)."""
    if not (0.0 <= mu < 2.0**60 and np.isfinite(mu)) or not 0 <= n <= MAX_VECTOR:
        raise SecAggError(f"Skellam noise of mu {mu} over {n} values is out of bounds")
    return (rng.poisson(mu, n) - rng.poisson(mu, n)).astype(np.int64).astype(np.uint32)


def ring_mask(r: int) -> np.uint32:
    if not 1 <= r <= 32:
        raise SecAggError(f"a ring of {r} bits is out of bounds (1..32)")
    return np.uint32((1 << r) - 1)


def pack(values: np.ndarray, r: int) -> bytes:
    """``values`` (each below ``2^r``) as ``r`` bits each, big-endian, padded to a byte."""
    v = np.asarray(values, dtype=">u4")
    bits = np.unpackbits(v.view(np.uint8).reshape(-1, 4), axis=1)[:, 32 - r :]
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack(data: bytes, r: int, n: int) -> np.ndarray:
    """``n`` values of ``r`` bits from :func:`pack`'s bytes; raises if the length is wrong."""
    if not 0 <= n <= MAX_VECTOR or len(data) != (n * r + 7) // 8:
        raise SecAggError(f"{len(data)} bytes are not {n} values of {r} bits")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * r].reshape(n, r)
    full = np.zeros((n, 32), dtype=np.uint8)
    full[:, 32 - r :] = bits
    return np.packbits(full, axis=1).view(">u4").reshape(-1).astype(np.uint32)


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """Round 1, device ``index`` to all: its two public keys."""

    index: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class Sealed:
    """Round 2, device ``sender`` to device ``receiver`` (through the coordinator): both shares, encrypted."""

    sender: int
    receiver: int
    nonce: bytes
    box: bytes


@dataclass(frozen=True)
class Reveal:
    """Round 4, a survivor's answer: its share of each survivor's ``b`` and of each dropout's ``s`` key."""

    index: int
    b_shares: dict[int, int] = field(default_factory=dict)
    s_shares: dict[int, int] = field(default_factory=dict)


def _aad(cohort: bytes, sender: int, receiver: int) -> bytes:
    return b"fedge secagg share v1\x00" + cohort + struct.pack("<II", sender, receiver)


class MaskingClient:
    """One device's side of one cohort. ``index`` is its position (1..n), ``cohort`` the cohort's id."""

    def __init__(self, cohort: bytes, index: int, n: int, t: int) -> None:
        if not 1 <= index <= n or not 1 <= t <= n <= MAX_COHORT:
            raise SecAggError(f"device {index} of {n}, threshold {t}: out of bounds")
        self.cohort, self.index, self.n, self.t = cohort, index, n, t
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = secrets.token_bytes(32)
        self.peers: dict[int, Keys] = {}
        self.held: dict[int, tuple[int, int]] = {}
        """Shares received: sender -> (share of its ``b``, share of its ``s`` key)."""
        self.revealed: dict[int, str] = {}
        """What this device revealed of each peer: ``b`` or ``s``."""
        self.masked = False
        self._box_keys: dict[int, bytes] = {}

    def keys(self) -> Keys:
        return Keys(self.index, _raw(self._c.public_key()), _raw(self._s.public_key()))

    def share(self, keys: Sequence[Keys]) -> list[Sealed]:
        """Round 2: the shares of this device's secrets for every peer in ``keys``, sealed."""
        peers = {k.index: k for k in keys}
        if len(peers) != len(keys) or self.index not in peers or peers[self.index] != self.keys():
            raise SecAggError("the key list must hold each device once, this one with its own keys")
        if len(peers) < self.t or any(not 1 <= i <= self.n for i in peers):
            raise SecAggError(f"the key list names {len(peers)} devices; the threshold is {self.t} of {self.n}")
        self.peers = peers
        s_raw = self._s.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        b_sh, s_sh = Shamir.split(self._b, self.n, self.t), Shamir.split(s_raw, self.n, self.t)
        out = []
        for j in sorted(peers):
            key = self._box_key(j)
            nonce = secrets.token_bytes(12)
            plain = b_sh[j].to_bytes(SHARE_BYTES, "big") + s_sh[j].to_bytes(SHARE_BYTES, "big")
            out.append(Sealed(self.index, j, nonce, ChaCha20Poly1305(key).encrypt(nonce, plain, _aad(self.cohort, self.index, j))))
        return out

    def _box_key(self, peer: int) -> bytes:
        """The key sealing shares between this device and ``peer``, the same both ways: agreed
        once when sending, reused when receiving."""
        key = self._box_keys.get(peer)
        if key is None:
            shared = self._c.exchange(_public(self.peers[peer].c_pk, "a peer's share key"))
            key = self._box_keys[peer] = _hkdf(shared, b"fedge secagg box v1\x00" + self.cohort)
        return key

    def receive(self, sealed: Sequence[Sealed]) -> None:
        """Round 2's end: open the shares addressed to this device (a forged or misrouted one raises)."""
        for m in sealed:
            peer = self.peers.get(m.sender)
            if m.receiver != self.index or peer is None:
                raise SecAggError(f"a share from device {m.sender} to {m.receiver} is not for this device's cohort round")
            key = self._box_key(m.sender)
            try:
                plain = ChaCha20Poly1305(key).decrypt(m.nonce, m.box, _aad(self.cohort, m.sender, m.receiver))
            except (InvalidTag, ValueError):
                raise SecAggError(f"the share from device {m.sender} does not decrypt: forged or damaged") from None
            if len(plain) != 2 * SHARE_BYTES:
                raise SecAggError(f"the share from device {m.sender} has {len(plain)} bytes")
            self.held[m.sender] = (int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big"))

    def mask(self, quantized: np.ndarray, ring_bits: int = 32) -> np.ndarray:
        """Round 3: this device's quantized input (uint32) plus its self-mask and a pairwise mask with
        every peer whose shares it received, mod ``2^ring_bits``."""
        if len(self.held) < self.t:
            raise SecAggError(f"only {len(self.held)} peers' shares arrived; fewer than the threshold {self.t}")
        x = np.asarray(quantized, dtype=np.uint32)
        y = x + prg(self._b, x.size)
        for j in self.held:  # the peers whose shares arrived: a peer that sent none is out of the cohort
            if j == self.index:
                continue
            m = prg(pair_seed(self._s, self.peers[j].s_pk, self.cohort, self.index, j), x.size)
            y = y + m if self.index < j else y - m
        self.masked = True
        return y & ring_mask(ring_bits)

    def reveal(self, survivors: Sequence[int], dropped: Sequence[int]) -> Reveal:
        """Round 4: shares of ``b`` for ``survivors`` and of ``s`` keys for ``dropped``. Refuses
        a request that names a device in both, names this device as dropped, or asks for the
        other kind of share of a device this device already answered for."""
        surv, drop = set(survivors), set(dropped)
        if surv & drop:
            raise SecAggError(f"the coordinator asks for both shares of devices {sorted(surv & drop)}: refused")
        if self.index in drop or self.index not in surv or not self.masked:
            raise SecAggError("this device sent its masked input, so it cannot be named a dropout: refused")
        if len(surv) < self.t:
            raise SecAggError(f"{len(surv)} survivors are fewer than the threshold {self.t}: refused (the sum would be too revealing)")
        for d, kind in [(d, "b") for d in surv] + [(d, "s") for d in drop]:
            if self.revealed.get(d, kind) != kind:
                raise SecAggError(f"device {d}'s {self.revealed[d]} share was already revealed; its {kind} share is refused")
        out = Reveal(self.index)
        for d in sorted(surv):
            if d in self.held:
                out.b_shares[d] = self.held[d][0]
                self.revealed[d] = "b"
        for d in sorted(drop):
            if d in self.held:
                out.s_shares[d] = self.held[d][1]
                self.revealed[d] = "s"
        return out


def unmask(
    cohort: bytes,
    t: int,
    keys: Mapping[int, Keys],
    masked: Mapping[int, np.ndarray],
    reveals: Sequence[Reveal],
    length: int,
    ring_bits: int = 32,
) -> np.ndarray:
    """The coordinator's side: the exact ``Z_2^32`` sum of the quantized inputs of the devices in
    ``masked`` (the survivors), from the masked inputs, everyone's public keys and at least ``t``
    survivors' reveals, mod ``2^ring_bits``. Devices in ``keys`` without a masked input are the dropouts."""
    if not 0 <= length <= MAX_VECTOR:
        raise SecAggError(f"a vector of {length} values is out of bounds")
    survivors = sorted(masked)
    dropped = sorted(set(keys) - set(masked))
    if len(survivors) < t:
        raise SecAggError(f"{len(survivors)} masked inputs; the sum needs at least the threshold {t}")
    for i, y in masked.items():
        if i not in keys or np.asarray(y).shape != (length,):
            raise SecAggError(f"device {i}'s masked input is not a {length}-value vector of a device with keys")
    total = np.zeros(length, dtype=np.uint32)
    for y in masked.values():
        total += np.asarray(y, dtype=np.uint32)
    for i in survivors:  # self-masks
        shares = {r.index: r.b_shares[i] for r in reveals if i in r.b_shares}
        total -= prg(Shamir.combine(shares, t), length)
    for d in dropped:  # masks the survivors shared with a dropout: rebuild its key, recompute them
        shares = {r.index: r.s_shares[d] for r in reveals if d in r.s_shares}
        s_d = X25519PrivateKey.from_private_bytes(Shamir.combine(shares, t))
        if _raw(s_d.public_key()) != keys[d].s_pk:
            raise SecAggError(f"device {d}'s recovered mask key does not match its public key (tampered shares)")
        for i in survivors:
            m = prg(pair_seed(s_d, keys[i].s_pk, cohort, d, i), length)
            total = total - m if i < d else total + m  # survivor i added +m if i < d, else -m: take it out
    return total & ring_mask(ring_bits)


def shared_indices(cohort_seed: bytes, size: int, k: int) -> np.ndarray:
    """The coordinates every device of a cohort sends (rand-k from the cohort's seed): the same
    set on every device, so that masked sums line up and indices reveal nothing of anyone's data."""
    if not 0 < k <= size <= MAX_VECTOR:
        raise SecAggError(f"{k} of {size} coordinates is out of bounds")
    rng = np.random.default_rng(np.frombuffer(hashlib.sha256(b"fedge secagg indices v1\x00" + cohort_seed).digest(), dtype="<u4"))
    return np.sort(rng.choice(size, size=k, replace=False)).astype(np.int64)
