"""Agreement documents: validation, digests, and the node-side verification of signatures."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from confide import agreements as ag
from confide import pki
from confide.errors import AgreementError, ValidationError
from tests.helpers import spec


def _signed(pki_dir: Path, data: dict, version: int = 1) -> tuple[ag.SignedAgreement, dict]:
    s = ag.parse_spec(data)
    digest = ag.spec_digest(s.agreement_id, version, s)
    ids = {n: pki.load_identity(pki_dir / n) for n in ("coordinator", "brand", "partner")}
    sigs = {p.name: ag.sign(ids[p.name].signing_key, s.agreement_id, version, digest, p.name) for p in s.parties}
    doc = ag.SignedAgreement(agreement_id=s.agreement_id, version=version, digest=digest, spec=s, status="active",
                             signatures=sigs,
                             coordinator_signature=ag.sign(ids["coordinator"].signing_key, s.agreement_id, version,
                                                           digest, "coordinator"))
    return doc, {n: i.public_key for n, i in ids.items()}


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(agreement_id="Has Spaces"), "agreement_id"),
    (lambda d: d.update(purposes=["Not-A-Key"]), "dotted key"),
    (lambda d: d["allowed_jobs"].append({"type": "teleport", "purpose": "audience.overlap"}), "unknown job type"),
    (lambda d: d["allowed_jobs"].append({"type": "match", "purpose": "marketing.push"}), "not in the agreement's purposes"),
    (lambda d: d["parties"][1].update(role="label_holder"), "exactly one party must be the label holder"),
    (lambda d: d["parties"].append(dict(d["parties"][1])), "listed twice"),
    (lambda d: d.update(expires_at="2027-01-01T00:00:00"), "timezone"),
    (lambda d: d.update(k_min=0), "k_min"),
    (lambda d: d["parties"][0].update(impact_assessment=""), "impact_assessment"),
    (lambda d: d["parties"][0].update(identifiers=[{"dataset": "x", "column": "p", "type": "phone"}]), "not in its datasets"),
    (lambda d: d["parties"][0]["identifiers"].append({"dataset": "x", "column": "p", "type": "fax"})
               if d["parties"][0].setdefault("identifiers", []) is not None else None, "identifiers"),
])
def test_invalid_specs_name_the_problem(mutate, msg: str) -> None:  # type: ignore[no-untyped-def]
    data = spec()
    mutate(data)
    with pytest.raises(ValidationError, match=msg):
        ag.parse_spec(data)


def test_digest_covers_every_field_and_the_version() -> None:
    data = spec()
    s = ag.parse_spec(data)
    base = ag.spec_digest(s.agreement_id, 1, s)
    assert ag.spec_digest(s.agreement_id, 1, ag.parse_spec(dict(reversed(list(data.items()))))) == base  # canonical
    assert ag.spec_digest(s.agreement_id, 2, s) != base
    assert ag.spec_digest(s.agreement_id, 1, ag.parse_spec(dict(data, k_min=51))) != base


def test_fully_signed_agreement_verifies(pki_dir: Path) -> None:
    doc, keys = _signed(pki_dir, spec())
    ag.verify_signed(doc, keys)  # raises on any problem


def test_tampered_content_is_detected(pki_dir: Path) -> None:
    doc, keys = _signed(pki_dir, spec())
    doc.spec.k_min = 5
    with pytest.raises(AgreementError, match="tampered"):
        ag.verify_signed(doc, keys)


def test_missing_party_signature_is_detected(pki_dir: Path) -> None:
    doc, keys = _signed(pki_dir, spec())
    del doc.signatures["partner"]
    with pytest.raises(AgreementError, match="not signed by 'partner'"):
        ag.verify_signed(doc, keys)


def test_signature_by_wrong_key_is_detected(pki_dir: Path) -> None:
    doc, keys = _signed(pki_dir, spec())
    doc.signatures["partner"] = doc.signatures["brand"]
    with pytest.raises(AgreementError, match="bad signature of 'partner'"):
        ag.verify_signed(doc, keys)


def test_missing_or_bad_counter_signature(pki_dir: Path) -> None:
    doc, keys = _signed(pki_dir, spec())
    good = doc.coordinator_signature
    doc.coordinator_signature = None
    with pytest.raises(AgreementError, match="counter-signature"):
        ag.verify_signed(doc, keys)
    doc.coordinator_signature = doc.signatures["brand"]
    with pytest.raises(AgreementError, match="bad coordinator counter-signature"):
        ag.verify_signed(doc, keys)
    doc.coordinator_signature = good
    ag.verify_signed(doc, keys)


def test_expired_agreement_is_refused(pki_dir: Path) -> None:
    doc, keys = _signed(pki_dir, spec(expires_in=dt.timedelta(days=1)))
    with pytest.raises(AgreementError, match="expired"):
        ag.verify_signed(doc, keys, at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2))


def test_rules_lookup() -> None:
    s = ag.parse_spec(spec(jobs=("dataset-stats",)))
    assert s.rule("dataset-stats").purpose == "audience.overlap"
    with pytest.raises(AgreementError, match="does not allow 'match'"):
        s.rule("match")
    with pytest.raises(AgreementError, match="not a party"):
        s.party("stranger")
