"""PKI: certificates bind name, role and keys; anything not from our CA is refused."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from confide import pki
from confide.errors import AuthenticationError, ConfigurationError, ValidationError


def test_init_issues_every_service(pki_dir: Path) -> None:
    for name in ("coordinator", "brand", "partner", "partner2"):
        for f in ("cert.pem", "tls.key", "identity.key", "box.key", "ca.pem"):
            assert (pki_dir / name / f).exists(), f"{name}/{f}"
        assert (pki_dir / name / "identity.key").stat().st_mode & 0o077 == 0  # private keys not world-readable


def test_certificate_binds_name_role_and_identity_key(pki_dir: Path) -> None:
    ident = pki.load_identity(pki_dir / "brand")
    info = pki.verify_certificate(ident.cert_pem, ident.ca_pem)
    assert (info.name, info.role) == ("brand", "brand")
    assert pki.raw_public(info.identity_public) == pki.raw_public(ident.public_key)
    assert pki.raw_public(info.box_public) == pki.raw_public(ident.box_key.public_key())


def test_certificate_from_another_ca_is_refused(pki_dir: Path, tmp_path: Path) -> None:
    pki.init(tmp_path / "rogue", [("brand", "brand")])
    rogue = (tmp_path / "rogue" / "brand" / "cert.pem").read_bytes()
    ca = (pki_dir / "ca" / "ca.pem").read_bytes()
    with pytest.raises(AuthenticationError, match="not issued by this deployment's CA"):
        pki.verify_certificate(rogue, ca)


def test_expired_certificate_is_refused(pki_dir: Path) -> None:
    ident = pki.load_identity(pki_dir / "partner")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=5000)
    with pytest.raises(AuthenticationError, match="expired"):
        pki.verify_certificate(ident.cert_pem, ident.ca_pem, at=later)


def test_garbage_certificate_is_refused(pki_dir: Path) -> None:
    with pytest.raises(AuthenticationError, match="not a valid PEM"):
        pki.verify_certificate(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                               (pki_dir / "ca" / "ca.pem").read_bytes())


def test_identity_key_must_match_certificate(pki_dir: Path, tmp_path: Path) -> None:
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(pki_dir / "brand", mixed)
    shutil.copy(pki_dir / "partner" / "identity.key", mixed / "identity.key")
    with pytest.raises(ConfigurationError, match="does not match its certificate"):
        pki.load_identity(mixed)


@pytest.mark.parametrize("name,role,msg", [
    ("Bad Name", "brand", "invalid party name"),
    ("x" * 41, "brand", "invalid party name"),
    ("shop", "retailer", "invalid role"),
    ("shop", "coordinator", "only it has that role"),
])
def test_issue_validates_name_and_role(pki_dir: Path, name: str, role: str, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        pki.issue(pki_dir, name, role)


def test_identities_are_never_silently_replaced(pki_dir: Path) -> None:
    before = (pki_dir / "brand" / "identity.key").read_bytes()
    with pytest.raises(ValidationError, match="already has an identity"):
        pki.issue(pki_dir, "brand", "brand")
    assert (pki_dir / "brand" / "identity.key").read_bytes() == before


def test_issue_without_ca_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="pki init"):
        pki.issue(tmp_path, "brand", "brand")
