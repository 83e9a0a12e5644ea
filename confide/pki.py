"""Deployment PKI: a CA, and per service a TLS certificate plus Ed25519 identity key.

Each service (the coordinator and every party node) gets:

- an ECDSA P-256 TLS key and a certificate signed by the deployment CA, used for mutual TLS.
  The subject CN is the service's name and OU its role (`coordinator`, `brand`, `partner`);
- an Ed25519 *identity* key that signs every request, agreement and tree head;
- an X25519 *box* key for end-to-end encryption of party-to-party payloads.

The certificate carries the two public keys in private extensions, so one CA signature binds
name, role, TLS key, identity key and box key together: a service that checks a certificate
against the CA learns which identity key speaks for which party without trusting the
coordinator's registry.

Layout of `confide pki init --dir D`:

    D/ca/ca.key  D/ca/ca.pem           (keep ca.key offline in production)
    D/<name>/tls.key D/<name>/cert.pem D/<name>/identity.key D/<name>/box.key D/<name>/ca.pem
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from confide.errors import AuthenticationError, ConfigurationError, ValidationError

# Private-enterprise-style OIDs for the two public keys carried in each certificate.
OID_IDENTITY_KEY = ObjectIdentifier("1.3.6.1.4.1.59999.1.1")
OID_BOX_KEY = ObjectIdentifier("1.3.6.1.4.1.59999.1.2")
ROLES = ("coordinator", "brand", "partner")
COORDINATOR = "coordinator"
_NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def check_name(name: str) -> str:
    """A party name: 1-40 chars of lower-case letters, digits, '-' or '_'."""
    if not name or len(name) > 40 or not set(name) <= _NAME_OK:
        raise ValidationError(
            f"invalid party name {name!r}: use 1-40 lower-case letters, digits, '-' or '_'",
            field="name",
        )
    return name


@dataclass(frozen=True)
class CertInfo:
    """What a CA-verified certificate says about its holder."""

    name: str
    role: str
    identity_public: ed25519.Ed25519PublicKey
    box_public: x25519.X25519PublicKey
    fingerprint: str
    not_after: dt.datetime

    @property
    def identity_public_hex(self) -> str:
        return raw_public(self.identity_public).hex()


def raw_public(key: ed25519.Ed25519PublicKey | x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pem_private(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(directory: Path, *, name: str = "Confide deployment CA", days: int = 3650) -> None:
    """Create the CA key and self-signed certificate under `directory/ca/`."""
    ca_dir = directory / "ca"
    if (ca_dir / "ca.key").exists():
        raise ValidationError(f"a CA already exists in {ca_dir}; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_secret(ca_dir / "ca.key", _pem_private(key))
    (ca_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(
    directory: Path,
    name: str,
    role: str,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    days: int = 825,
) -> Path:
    """Issue TLS certificate, identity key and box key for service `name` with `role`.

    Returns the service's directory. Raises ValidationError for a bad name/role or an
    existing identity (identities are never silently replaced).
    """
    check_name(name)
    if role not in ROLES:
        raise ValidationError(f"invalid role {role!r}: one of {', '.join(ROLES)}", field="role")
    if (name == COORDINATOR) != (role == "coordinator"):
        raise ValidationError("the coordinator is named 'coordinator' and only it has that role")
    ca_dir = directory / "ca"
    try:
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    except FileNotFoundError as exc:
        raise ConfigurationError(f"no CA in {ca_dir}: run `confide pki init` first") from exc
    out = directory / name
    if (out / "identity.key").exists():
        raise ValidationError(f"{name!r} already has an identity in {out}")
    tls_key = ec.generate_private_key(ec.SECP256R1())
    identity = ed25519.Ed25519PrivateKey.generate()
    box = x25519.X25519PrivateKey.generate()
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if name not in hosts:
        sans.append(x509.DNSName(name))
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.UnrecognizedExtension(OID_IDENTITY_KEY, raw_public(identity.public_key())), critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_BOX_KEY, raw_public(box.public_key())), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_secret(out / "tls.key", _pem_private(tls_key))
    _write_secret(out / "identity.key", _pem_private(identity))
    _write_secret(out / "box.key", _pem_private(box))
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "ca.pem").write_bytes((ca_dir / "ca.pem").read_bytes())
    return out


def init(directory: Path, parties: list[tuple[str, str]], hosts: tuple[str, ...] | None = None) -> list[Path]:
    """Create a CA and issue the coordinator plus each (name, role) party."""
    directory.mkdir(parents=True, exist_ok=True)
    create_ca(directory)
    kwargs = {"hosts": hosts} if hosts else {}
    out = [issue(directory, COORDINATOR, "coordinator", **kwargs)]
    for name, role in parties:
        out.append(issue(directory, name, role, **kwargs))
    return out


def load_ca(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def verify_certificate(cert_pem: bytes | str, ca_pem: bytes, *, at: dt.datetime | None = None) -> CertInfo:
    """Check `cert_pem` was issued by the CA and is valid now; return what it binds.

    Raises AuthenticationError with the reason otherwise.
    """
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise AuthenticationError("certificate is not a valid PEM X.509 certificate") from exc
    ca = load_ca(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # InvalidSignature, ValueError, TypeError
        raise AuthenticationError("certificate was not issued by this deployment's CA") from exc
    now = at or _now()
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise AuthenticationError("certificate is expired or not yet valid")
    try:
        name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        role = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
        ident = cert.extensions.get_extension_for_oid(OID_IDENTITY_KEY).value.value  # type: ignore[attr-defined]
        box = cert.extensions.get_extension_for_oid(OID_BOX_KEY).value.value  # type: ignore[attr-defined]
    except (IndexError, x509.ExtensionNotFound) as exc:
        raise AuthenticationError("certificate lacks the Confide name, role or key extensions") from exc
    return CertInfo(
        name=str(name),
        role=str(role),
        identity_public=ed25519.Ed25519PublicKey.from_public_bytes(ident),
        box_public=x25519.X25519PublicKey.from_public_bytes(box),
        fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        not_after=cert.not_valid_after_utc,
    )


@dataclass
class Identity:
    """A service's own keys and certificates, loaded from its PKI directory."""

    name: str
    role: str
    directory: Path
    signing_key: ed25519.Ed25519PrivateKey
    box_key: x25519.X25519PrivateKey
    cert_pem: bytes
    ca_pem: bytes

    @property
    def cert_path(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def tls_key_path(self) -> Path:
        return self.directory / "tls.key"

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.signing_key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data)


def load_identity(directory: Path) -> Identity:
    """Load a service's identity from the directory `pki issue` wrote; checks it against its CA."""
    directory = Path(directory)
    try:
        cert_pem = (directory / "cert.pem").read_bytes()
        ca_pem = (directory / "ca.pem").read_bytes()
        signing = serialization.load_pem_private_key((directory / "identity.key").read_bytes(), None)
        box = serialization.load_pem_private_key((directory / "box.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"identity incomplete in {directory}: missing {exc.filename}") from exc
    if not isinstance(signing, ed25519.Ed25519PrivateKey) or not isinstance(box, x25519.X25519PrivateKey):
        raise ConfigurationError(f"identity keys in {directory} have the wrong type")
    info = verify_certificate(cert_pem, ca_pem)
    if raw_public(info.identity_public) != raw_public(signing.public_key()):
        raise ConfigurationError(f"identity.key in {directory} does not match its certificate")
    return Identity(info.name, info.role, directory, signing, box, cert_pem, ca_pem)
