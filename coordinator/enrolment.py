"""Enrolment and revocation: a device's Ed25519 key, its broker credentials and its config snippet.

``enroll`` writes, into a fresh directory for the device:

- ``<device>.key``: the Ed25519 private key (0600) that signs its updates; the coordinator
  keeps only the public key, in its registry;
- ``agent.toml``: a config snippet (device id, fleet, broker user, password, key path);
- with a CA directory: ``<device>.crt`` and ``<device>.pem`` (key), a client certificate
  with CN = the device id, for Mosquitto's ``use_identity_as_username``.

It adds the device to Mosquitto's password file (``mosquitto_passwd``, PBKDF2-SHA512).
``revoke`` marks the key revoked (its updates are then refused) and deletes the password.
Mosquitto rereads its password and ACL files on SIGHUP (``systemctl reload mosquitto``);
the ACL itself needs no per-device change: it uses ``%u`` patterns.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from compression.protocol import check_id
from coordinator.errors import ConfigError
from coordinator.identity import fleet_key, new_key, public_hex, write_private
from coordinator.store import Store

RESERVED = frozenset({"coordinator", "operator", "admin", "root", "mosquitto"})
"""Broker identities that the ACL gives more than a device's rights; never a device id."""
BRIDGE_PREFIX = "bridge-"
"""Site brokers' bridge users at the root (``bridge-<site>``, see ``docs/sites.md``): never a device id."""


def _passwd(args: list[str]) -> None:
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(binary).exists():
        raise ConfigError("mosquitto_passwd is not installed (apt-get install -y mosquitto); cannot manage the password file")
    out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        # Never echo the arguments: they hold the password.
        raise ConfigError(f"mosquitto_passwd failed (exit {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")


def set_password(password_file: Path, user: str, password: str) -> None:
    password_file.parent.mkdir(parents=True, exist_ok=True)
    create = [] if password_file.exists() else ["-c"]
    _passwd([*create, "-b", str(password_file), user, password])
    os.chmod(password_file, 0o640)


def _has_user(password_file: Path, user: str) -> bool:
    try:
        lines = password_file.read_text().splitlines()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot read {password_file}: {exc.strerror}") from None
    return any(line.split(":", 1)[0] == user for line in lines)


def delete_password(password_file: Path, user: str) -> None:
    if password_file.exists():
        _passwd(["-D", str(password_file), user])


# -- a small CA for client certificates ------------------------------------------------


def ensure_ca(ca_dir: Path, name: str = "fedge fleet CA") -> tuple[Any, Any]:
    """Load the fleet CA from ``ca_dir`` (``ca.key``, ``ca.crt``), creating it on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key_path, crt_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    if key_path.exists() and crt_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return key, x509.load_pem_x509_certificate(crt_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def issue_cert(ca_dir: Path, common_name: str, out_key: Path, out_crt: Path, *, server: bool = False, days: int = 825) -> None:
    """A certificate signed by the fleet CA: a client one (CN = device id), or a server one for 127.0.0.1/localhost."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = ensure_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if server:
        names = [x509.DNSName(common_name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private(out_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    out_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# -- enrol and revoke --------------------------------------------------------------------


def enroll(
    state_dir: str | Path,
    device: str,
    out: str | Path,
    *,
    fleet: str,
    broker_host: str,
    broker_port: int,
    password_file: Path | None = None,
    ca_dir: Path | None = None,
    force: bool = False,
    max_samples: int | None = None,
    site_keys: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Issue a device's identity. Refuses reserved names, and a device already enrolled unless ``force``
    (which replaces its key and password: the old ones stop working)."""
    check_id(device, "device id")
    if device.lower() in RESERVED or device.lower().startswith(("coordinator", BRIDGE_PREFIX)):
        raise ConfigError(f"{device!r} is a reserved broker identity (it has more than a device's rights); choose another device id")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"--max-samples must be at least 1, got {max_samples}")
    store = Store(state_dir, create=True)
    try:
        if store.identity(device) is not None and not force:
            raise ConfigError(f"device {device!r} is already enrolled; pass --force to replace its key and password")
        if password_file is not None and not force and _has_user(password_file, device):
            raise ConfigError(f"{password_file} already has a user {device!r}; pass --force to replace its password")
        # At a site (``site_keys``: the root's fleet key and the site's own), the device verifies both.
        fleet_public = site_keys[0] if site_keys else public_hex(fleet_key(state_dir, create=True))
    finally:
        store.close()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; enrolment writes secrets only into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    pem, public = new_key()
    key_path = out / f"{device}.key"
    write_private(key_path, pem)
    password = secrets.token_urlsafe(24)
    if password_file is not None:
        set_password(password_file, device, password)
    lines = [
        f'device_id = "{device}"',
        f'fleet = "{fleet}"',
        'data_dir = "/srv/fedge-data"',
        'state_dir = "/var/lib/fedge-agent"',
        f'signing_key = "{key_path.name}"',
        "# The fleet key's public half: the agent refuses global state not signed by it.",
        f'fleet_public_key = "{fleet_public}"',
        *([f'site_public_key = "{site_keys[1]}"  # this site\'s aggregator: it signs acks and invitations'] if site_keys else []),
        "",
        "[broker]",
        f'host = "{broker_host}"',
        f"port = {broker_port}",
    ]
    if password_file is not None:
        lines += [f'username = "{device}"', f'password = "{password}"']
    if ca_dir is not None:
        lines += ["tls = true", 'cafile = "ca.crt"', f'certfile = "{device}.crt"', f'keyfile = "{device}.pem"']
    elif broker_port == 8883:
        lines += ["tls = true", '# cafile = "ca.crt"   # the CA of the broker\'s certificate, if not a public one']
    files = [key_path.name, "agent.toml"]
    if ca_dir is not None:
        issue_cert(ca_dir, device, out / f"{device}.pem", out / f"{device}.crt")
        shutil.copy(ca_dir / "ca.crt", out / "ca.crt")
        files += [f"{device}.pem", f"{device}.crt", "ca.crt"]
    agent_toml = out / "agent.toml"
    fd = os.open(agent_toml, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# Written by `fedge-coordinator enroll`; keep it secret (it holds the broker password).\n")
        fh.write("\n".join(lines) + "\n")
    store = Store(state_dir, create=True)
    try:
        store.enroll(device, public, max_samples)
    finally:
        store.close()
    return {
        "device": device,
        "out": str(out),
        "files": files,
        "public_key": public.hex(),
        "fleet_public_key": fleet_public,
        "password_file": str(password_file or ""),
    }


def revoke(state_dir: str | Path, device: str, *, password_file: Path | None = None) -> bool:
    check_id(device, "device id")
    store = Store(state_dir, create=False)
    try:
        if store.identity(device) is None:
            raise ConfigError(f"device {device!r} is not enrolled")
        changed = store.revoke(device)
    finally:
        store.close()
    if password_file is not None:
        delete_password(password_file, device)
    return changed
