"""Contract tests of the consent store, run on SQLite and on PostgreSQL (`db_url`)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from sqlalchemy import func, select

from confide.db import make_engine
from confide.errors import Conflict, ValidationError
from consent.gate import ConsentGate
from consent.models import ConsentEvent, ConsentState, Preferences, SubjectKey, Tombstone, ensure_tables
from consent.store import ConsentStore, batch_digest

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)
NOTICE_V1 = {
    "notice": "member", "version": "member/1", "published_at": T0 - DAY,
    "purposes": [
        {"purpose": "modeling", "data_categories": ["orders"]},
        {"purpose": "marketing", "data_categories": ["orders"]},
        {"purpose": "audience", "recipients": ["partner", "partner2"], "data_categories": ["phone"]},
        {"purpose": "sharing.third_party", "recipients": ["partner", "partner2"], "data_categories": ["phone"]},
    ],
}


class RecordingAudit:
    """Test double of the audit log: keeps (kind, payload)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def append(self, kind: str, payload: dict[str, Any], session: object = None) -> int:
        self.entries.append((kind, payload))
        return len(self.entries)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [p for k, p in self.entries if k == kind]


def make_store(url: str, **kw: Any) -> tuple[ConsentStore, RecordingAudit]:
    engine = make_engine(url)
    ensure_tables(engine)
    audit = RecordingAudit()
    store = ConsentStore(engine, secret_key=b"test-secret-key-0123456789abcdef", recipients={"partner", "partner2"},
                         audit=audit, clock=lambda: T0 + 30 * DAY, **kw)
    store.register_notice(NOTICE_V1)
    return store, audit


def ev(event_id: str, subject: str, purpose: str, action: str = "granted", **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": event_id, "subject": subject, "purpose": purpose, "action": action,
        "channel": kw.pop("channel", "wechat_miniprogram"), "received_at": kw.pop("received_at", T0),
    }
    if action == "granted":
        body["notice_version"] = "member/1"
    body.update(kw)
    return body


@pytest.fixture
def store(db_url: str) -> tuple[ConsentStore, RecordingAudit]:
    return make_store(db_url)


def count(store: ConsentStore, model: Any) -> int:
    with store.factory() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_default_deny_grant_allows_and_parent_rule_covers_child(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, audit = store
    gate: ConsentGate = s  # the store is the gate protocol jobs depend on
    empty = gate.allowed([], "modeling", None, T0)
    assert empty.allowed == [] and empty.denied_counts == {}
    audit.entries.clear()
    s.record_events([ev("e1", "m1", "modeling"), ev("e2", "m2", "modeling.lead_scoring")])
    d = gate.allowed(["m1", "m2", "m3"], "modeling.lookalike", None, T0 + DAY)
    assert d.allowed == ["m1"]
    assert d.evidence == {"m1": "e1"}
    assert d.denied_counts == {"no_consent": 2}  # a sibling's grant does not cover lookalike
    gate_entries = audit.kinds("consent.gate")
    assert len(gate_entries) == 1
    assert gate_entries[0]["allowed"] == 1 and gate_entries[0]["denied"] == {"no_consent": 2}
    assert "m1" not in json.dumps(audit.entries)  # never raw subjects in the audit log


def test_withdrawal_wins_and_binds_later_calls(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, _ = store
    hooked: list[tuple[str, str, str | None]] = []
    s.add_withdrawal_hook(lambda subj, purpose, rec: hooked.append((subj, purpose, rec)))
    s.record_events([ev("e1", "m1", "modeling.lookalike"), ev("e2", "m2", "modeling.lookalike")])
    assert s.allowed(["m1", "m2"], "modeling.lookalike", None, T0 + DAY).allowed == ["m1", "m2"]
    # A withdrawal on the parent beats the child grant, even a later-dated child grant.
    s.record(ev("w1", "m1", "modeling", "withdrawn", received_at=T0 + DAY))
    s.record(ev("e3", "m1", "modeling.lookalike", received_at=T0 + 2 * DAY))
    d = s.allowed(["m1", "m2"], "modeling.lookalike", None, T0 + 3 * DAY)
    assert d.allowed == ["m2"] and d.denied_counts == {"withdrawn": 1}
    assert hooked == [("m1", "modeling", None)]
    # Re-granting at the same key replaces the withdrawal.
    s.record(ev("e4", "m1", "modeling", received_at=T0 + 4 * DAY))
    assert s.allowed(["m1"], "modeling.lookalike", None, T0 + 5 * DAY).allowed == ["m1"]


def test_expiry_and_not_yet_valid(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, _ = store
    s.record_events([
        ev("e1", "m1", "marketing", valid_until=T0 + 10 * DAY),
        ev("e2", "m2", "marketing", valid_from=T0 + 5 * DAY),
        ev("e3", "m3", "marketing"),
        ev("x3", "m3", "marketing", "expired", received_at=T0 + DAY),
    ])
    early = s.allowed(["m1", "m2", "m3"], "marketing.general", None, T0 + 2 * DAY)
    assert early.allowed == ["m1"]
    assert early.denied_counts == {"not_yet_valid": 1, "expired": 1}
    late = s.allowed(["m1", "m2", "m3"], "marketing.general", None, T0 + 20 * DAY)
    assert late.allowed == ["m2"] and late.denied_counts == {"expired": 2}


def test_sharing_needs_a_grant_naming_the_recipient(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, _ = store
    s.record_events([
        ev("g1", "m1", "sharing.third_party", recipient="partner2"),
        ev("g2", "m2", "sharing.third_party", recipient="partner"),
    ])
    d = s.allowed(["m1", "m2", "m3"], "sharing.third_party", "partner", T0 + DAY)
    assert d.allowed == ["m2"]
    assert d.denied_counts == {"no_recipient_consent": 1, "no_consent": 1}  # m1 consented to partner2 only
    # A refusal naming partner2 does not touch sharing with partner.
    s.record(ev("r2", "m2", "sharing.third_party", "refused", recipient="partner2", received_at=T0 + DAY))
    assert s.allowed(["m2"], "sharing.third_party", "partner", T0 + 2 * DAY).allowed == ["m2"]


def test_per_recipient_withdrawal_for_collaboration_purposes(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, _ = store
    forwarded: list[tuple[str, str, str | None]] = []
    s.add_withdrawal_hook(lambda subj, purpose, rec: forwarded.append((subj, purpose, rec)))
    s.record_events([
        ev("g1", "m1", "audience"),  # a general grant covers own processing and counts-only overlap ...
        ev("g2", "m2", "audience", recipient="partner"),  # ... matching with a party needs one naming it
        ev("g3", "m3", "audience", recipient="partner2"),  # (not one naming another party)
        ev("g4", "m1", "audience", recipient="partner2"),
    ])
    at = T0 + DAY
    d = s.allowed(["m1", "m2", "m3"], "audience.match", "partner", at)
    assert d.allowed == ["m2"] and d.denied_counts == {"no_recipient_consent": 2}
    d = s.allowed(["m1", "m2", "m3"], "audience.overlap", "partner", at)  # aggregate only: no separate consent
    assert d.allowed == ["m1", "m2"] and d.denied_counts == {"no_consent": 1}
    assert s.allowed(["m1", "m2", "m3"], "audience.match", None, at).allowed == ["m1"]  # own processing
    assert s.allowed(["m1", "m2", "m3"], "audience.match", "partner2", at).allowed == ["m1", "m3"]
    s.record(ev("w1", "m2", "audience", "withdrawn", recipient="partner", received_at=T0 + DAY))
    assert forwarded == [("m2", "audience", "partner")]
    d = s.allowed(["m1", "m2"], "audience.match", "partner", T0 + 2 * DAY)
    assert d.allowed == [] and d.denied_counts == {"no_recipient_consent": 1, "withdrawn": 1}
    # A withdrawal for partner only: processing with partner2 goes on; a general withdrawal ends all.
    assert s.allowed(["m1"], "audience.match", "partner2", T0 + 2 * DAY).allowed == ["m1"]
    s.record(ev("w2", "m1", "audience", "withdrawn", received_at=T0 + 2 * DAY))
    assert s.allowed(["m1"], "audience.match", "partner2", T0 + 3 * DAY).denied_counts == {"withdrawn": 1}


def test_separate_consent_grant_must_be_under_a_notice_naming_the_recipient(
    store: tuple[ConsentStore, RecordingAudit],
) -> None:
    s, _ = store
    # NOTICE_V1 names no recipient for `modeling`: a grant naming one cannot have been informed.
    with pytest.raises(ValidationError) as exc:
        s.record(ev("g1", "m1", "modeling", recipient="partner"))
    assert exc.value.details["field"] == "events[0].recipient" and "does not name recipient" in exc.value.message
    s.record(ev("g2", "m1", "modeling"))
    d = s.allowed(["m1"], "modeling.lead_scoring", "partner", T0 + DAY)
    assert d.allowed == [] and d.denied_counts == {"no_recipient_consent": 1}
    assert s.allowed(["m1"], "modeling.lead_scoring", None, T0 + DAY).allowed == ["m1"]


def test_remote_withdrawal_excludes_subject_on_recipient_side(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, _ = store
    s.record(ev("g1", "u7", "audience", recipient="partner"))
    assert s.allowed(["u7"], "audience.overlap", "partner", T0 + DAY).allowed == ["u7"]
    first = s.record_remote_withdrawal("u7", "audience", "partner", event_id="brand-w-1", at=T0 + DAY)
    again = s.record_remote_withdrawal("u7", "audience", "partner", event_id="brand-w-1", at=T0 + DAY)
    assert (first.recorded, again.recorded, again.duplicates) == (1, 0, 1)
    d = s.allowed(["u7"], "audience.overlap", "partner", T0 + 2 * DAY)
    assert d.allowed == [] and d.denied_counts == {"withdrawn": 1}
    hist = s.history("u7")
    assert hist[-1].channel == "coordinator" and hist[-1].actor == "party:partner"


def test_opt_out_removes_personalised_purposes_only(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, _ = store
    purged: list[str] = []
    s.add_withdrawal_hook(lambda subj, purpose, rec: purged.append(purpose))
    s.record_events([ev("g1", "m1", "modeling"), ev("g2", "m1", "marketing")])
    s.set_preferences("m1", {"channels": {"sms": True}, "no_personalised_marketing": True, "channel": "app"})
    assert s.allowed(["m1"], "modeling.lookalike", None, T0 + DAY).denied_counts == {"opted_out": 1}
    assert s.allowed(["m1"], "marketing.personalized", None, T0 + DAY).denied_counts == {"opted_out": 1}
    assert s.allowed(["m1"], "modeling.lead_scoring", None, T0 + DAY).denied_counts == {"opted_out": 1}
    assert s.allowed(["m1"], "marketing.general", None, T0 + DAY).allowed == ["m1"]
    assert s.allowed(["m1"], "modeling", None, T0 + DAY).allowed == ["m1"]
    assert set(purged) == {"modeling.lead_scoring", "modeling.lookalike", "scoring.lead", "marketing.personalized"}
    prefs = s.get_preferences("m1")
    assert prefs.channels == {"sms": True} and prefs.no_personalised_marketing
    s.set_preferences("m1", {"no_personalised_marketing": False})
    assert s.allowed(["m1"], "modeling.lookalike", None, T0 + DAY).allowed == ["m1"]


def test_superseded_notice_only_for_changed_parts(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, _ = store
    s.record_events([
        ev("g1", "m1", "modeling"),
        ev("g2", "m1", "marketing"),
        ev("g3", "m1", "sharing.third_party", recipient="partner"),
        ev("g4", "m1", "sharing.third_party", recipient="partner2"),
    ])
    v2 = dict(NOTICE_V1, version="member/2", published_at=T0 + 10 * DAY, purposes=[
        {"purpose": "modeling", "data_categories": ["orders", "browsing"]},  # changed categories
        {"purpose": "marketing", "data_categories": ["orders"]},  # unchanged
        {"purpose": "audience", "recipients": ["partner"], "data_categories": ["phone"]},
        {"purpose": "sharing.third_party", "recipients": ["partner"], "data_categories": ["phone"]},  # drops partner2
    ])
    s.register_notice(v2)
    before, after = T0 + 5 * DAY, T0 + 11 * DAY
    assert s.allowed(["m1"], "modeling.lookalike", None, before).allowed == ["m1"]
    assert s.allowed(["m1"], "modeling.lookalike", None, after).denied_counts == {"notice_superseded": 1}
    assert s.allowed(["m1"], "marketing.general", None, after).allowed == ["m1"]
    assert s.allowed(["m1"], "sharing.third_party", "partner", after).allowed == ["m1"]
    assert s.allowed(["m1"], "sharing.third_party", "partner2", after).denied_counts == {"notice_superseded": 1}
    # Consent under the new version is sufficient again.
    s.record(dict(ev("g5", "m1", "modeling", received_at=after), notice_version="member/2"))
    assert s.allowed(["m1"], "modeling.lookalike", None, after).evidence == {"m1": "g5"}


def test_duplicate_event_is_noop_and_conflicting_duplicate_is_refused(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, _ = store
    first = s.record(ev("e1", "m1", "modeling", identifier="13800000001"))
    again = s.record(ev("e1", "m1", "modeling", identifier="13800000001"))
    assert (first.recorded, again.recorded, again.duplicates) == (1, 0, 1)
    # Retried without received_at: compared against the stored one, still a duplicate.
    retry = {k: v for k, v in ev("e1", "m1", "modeling", identifier="13800000001").items() if k != "received_at"}
    assert s.record(retry).duplicates == 1
    with pytest.raises(Conflict) as exc:
        s.record(ev("e1", "m1", "marketing"))
    assert exc.value.details["field"] == "events[0].event_id"
    with pytest.raises(Conflict):
        s.record(ev("e1", "m1", "modeling", identifier="13800000002"))
    with pytest.raises(Conflict):  # same id twice with different content within one batch
        s.record_events([ev("e9", "m1", "modeling"), ev("e9", "m2", "modeling")])
    assert count(s, ConsentEvent) == 1


BAD_EVENTS = [
    (ev("b", "m2", "modelling"), "events[1].purpose"),
    (ev("b", "m2", "modeling", valid_from="2026-13-01"), "events[1].valid_from"),
    (ev("b", "m2", "modeling", valid_from=T0 + DAY, valid_until=T0), "events[1].valid_until"),
    (ev("b", "m2", "audience", recipient="acme"), "events[1].recipient"),
    (ev("b", "m2", "sharing.third_party"), "events[1].recipient"),
    (dict(ev("b", "m2", "modeling"), notice_version="nope/9"), "events[1].notice_version"),
    ({k: v for k, v in ev("b", "m2", "modeling").items() if k != "notice_version"}, "events[1].notice_version"),
    (ev("b", "m2", "modeling", action="granted", channel="fax"), "events[1].channel"),
    (ev("b", "m2", "modeling", action="maybe"), "events[1].action"),
]


def test_bad_input_names_the_field_and_writes_nothing(store: tuple[ConsentStore, RecordingAudit]) -> None:
    # One database per backend for all cases (a fresh PostgreSQL database per case is slow).
    s, audit = store
    n_audit = len(audit.entries)
    for bad, field in BAD_EVENTS:
        with pytest.raises(ValidationError) as exc:
            s.record_events([ev("good", "m1", "modeling", identifier="13800000001"), bad])
        assert exc.value.details["field"] == field, exc.value.message
        assert field in exc.value.message
        assert count(s, ConsentEvent) == 0 and count(s, ConsentState) == 0 and count(s, SubjectKey) == 0, field
        assert len(audit.entries) == n_audit, field


def test_oversized_batch_is_refused(db_url: str) -> None:
    s, _ = make_store(db_url, max_batch=3)
    with pytest.raises(ValidationError) as exc:
        s.record_events([ev(f"e{i}", "m1", "modeling") for i in range(4)])
    assert exc.value.details["field"] == "events" and "limit of 3" in exc.value.message
    assert count(s, ConsentEvent) == 0


def test_gate_rejects_unknown_purpose_and_recipient_and_notices_are_immutable(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, audit = store
    with pytest.raises(ValidationError, match="purpose"):
        s.allowed(["m1"], "modeling.lookalikes", None, T0)
    with pytest.raises(ValidationError, match="recipient"):
        s.allowed(["m1"], "audience.match", "acme", T0)
    with pytest.raises(ValidationError, match="recipient"):
        s.allowed(["m1"], "sharing.third_party", None, T0)
    assert audit.kinds("consent.gate") == []
    # Notice versions are immutable: same content is a no-op, other content a conflict.
    again = s.register_notice(NOTICE_V1)
    assert again.recipients == ["partner", "partner2"]
    with pytest.raises(Conflict) as exc:
        s.register_notice(dict(NOTICE_V1, text="changed"))
    assert exc.value.details["field"] == "version"


def test_erasure_shreds_identifiers_keeps_tombstone_and_denies(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, audit = store
    erased_hook: list[str] = []
    s.add_erasure_hook(erased_hook.append)
    s.record_events([ev("e1", "m1", "modeling", identifier="13800000001"), ev("e2", "m2", "modeling")])
    s.set_preferences("m1", {"topics": ["coffee"]})
    s.record_usage("job-1", "modeling.lookalike", ["m1", "m2"], agreement_id="agr-1")
    before = s.access("m1")
    assert before.events[0].identifier == "13800000001"
    assert [u.job_id for u in before.usage] == ["job-1"]
    with s.factory() as sess:
        ct = sess.get(ConsentEvent, "e1").identifier_ct
    assert ct is not None and b"13800000001" not in ct  # stored encrypted

    tomb = s.erase("m1", request_ref="dsr-42")
    assert tomb.request_ref == "dsr-42" and tomb.detail["subject_key_destroyed"] is True
    assert s.erase("m1").request_ref == "dsr-42"  # idempotent
    assert erased_hook == ["m1"]
    after = s.access("m1")
    assert after.erased and after.events[0].identifier is None and after.events[0].identifier_erased
    assert after.preferences is None and after.usage == []
    assert count(s, Tombstone) == 1 and count(s, SubjectKey) == 0 and count(s, Preferences) == 0
    assert count(s, ConsentState) == 1  # only m2's rule is left in the projection
    assert count(s, ConsentEvent) == 2  # evidence kept
    d = s.allowed(["m1", "m2"], "modeling", None, T0 + DAY)
    assert d.allowed == ["m2"] and d.denied_counts == {"erased": 1}
    with pytest.raises(Conflict):
        s.record(ev("e3", "m1", "modeling"))
    assert s.record(ev("e1", "m1", "modeling", identifier="13800000001")).duplicates == 1  # re-import still a no-op
    kinds = [k for k, _ in audit.entries]
    assert "consent.erasure" in kinds and kinds.count("consent.access") == 2
    assert "13800000001" not in json.dumps(audit.entries)


def test_events_audit_digest_is_recomputable(store: tuple[ConsentStore, RecordingAudit]) -> None:
    s, audit = store
    s.record_events([ev("e2", "m2", "modeling"), ev("e1", "m1", "modeling")])
    entry = audit.kinds("consent.events")[-1]
    with s.factory() as sess:
        rows = sess.execute(
            select(ConsentEvent.content_hash).where(ConsentEvent.batch_id == entry["batch_id"]).order_by(ConsentEvent.event_id)
        ).scalars().all()
    assert entry["count"] == 2 and batch_digest(rows) == entry["digest"]


def test_state_history_usage_and_small_vs_bulk_gate_agree(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = make_store(db_url)
    s.record_events([ev(f"e{i}", f"m{i}", "modeling" if i % 2 else "marketing") for i in range(40)])
    s.record(ev("w1", "m1", "modeling", "withdrawn", received_at=T0 + DAY))
    state = s.state("m1")
    assert [(e.purpose, e.action) for e in state.entries] == [("modeling", "withdrawn")]
    assert [h.event_id for h in s.history("m1")] == ["e1", "w1"]
    subjects = [f"m{i}" for i in range(45)]
    small = s.allowed(subjects, "modeling.lookalike", None, T0 + 2 * DAY)
    import consent.store as store_mod

    monkeypatch.setattr(store_mod, "_SMALL_GATE", 0)  # force the bulk (scan) path
    bulk = s.allowed(subjects, "modeling.lookalike", None, T0 + 2 * DAY)
    assert small.allowed == bulk.allowed and small.denied_counts == bulk.denied_counts
    assert len(small.allowed) == 19 and small.denied_counts == {"no_consent": 25, "withdrawn": 1}
    u = s.record_usage("job-9", "modeling.lookalike", small.allowed, agreement_id="agr-9")
    u2 = s.record_usage("job-9", "modeling.lookalike", small.allowed[:5] + ["m0"])
    assert (u.subjects_count, u2.subjects_count) == (19, 20)


def test_purge_after_retention_keeps_evidence_and_current_rules(db_url: str) -> None:
    from consent.models import ContactRecord, GateCall
    from consent.store import ConsentSettings

    with pytest.raises(Exception, match="1096"):
        ConsentSettings(retention_days=365)
    s, audit = make_store(db_url)
    s.record_events([
        ev("old-1", "m1", "modeling", identifier="13800000001"),  # superseded below
        ev("old-2", "m2", "modeling", identifier="13800000002"),  # still the current rule
    ])
    s.record(ev("new-1", "m1", "modeling", "withdrawn", received_at=T0 + 10 * DAY))
    s.allowed(["m1", "m2"], "modeling", None, T0 + 11 * DAY)
    s.set_preferences("m2", {"frequency_cap": {"max_messages": 5, "per": "day"}})
    s.register_notice({"notice": "mk", "version": "mk/1", "published_at": T0 - DAY,
                       "purposes": [{"purpose": "marketing", "data_categories": ["orders"]}]})
    s.record(ev("mk-1", "m2", "marketing", notice_version="mk/1"))
    s.deliverable(["m2"], "marketing.general", "sms", "service", T0 + 12 * DAY)
    before = s.allowed(["m1", "m2"], "modeling", None, T0 + 20 * DAY)
    with s.factory() as sess:
        digests = {b: batch_digest(sess.execute(select(ConsentEvent.content_hash).where(ConsentEvent.batch_id == b)
                                                .order_by(ConsentEvent.event_id)).scalars().all())
                   for b in sess.scalars(select(ConsentEvent.batch_id).distinct())}
    # Within the retention period nothing changes.
    assert s.purge(T0 + 365 * DAY) == {"identifiers_dropped": 0, "gate_calls_deleted": 0, "contacts_deleted": 0}
    counts = s.purge(T0 + 1200 * DAY)
    assert counts["identifiers_dropped"] == 1 and counts["contacts_deleted"] == 1 and counts["gate_calls_deleted"] >= 1
    with s.factory() as sess:
        cts = dict(sess.execute(select(ConsentEvent.event_id, ConsentEvent.identifier_ct)).all())
        assert cts["old-1"] is None and cts["old-2"] is not None  # the current rule keeps its identifier
        assert sess.scalar(select(func.count()).select_from(ContactRecord)) == 0
        assert sess.scalar(select(func.count()).select_from(GateCall)) == 0
        for b, d in digests.items():  # every import batch's audit digest is still recomputable
            rows = sess.execute(select(ConsentEvent.content_hash).where(ConsentEvent.batch_id == b)
                                .order_by(ConsentEvent.event_id)).scalars().all()
            assert batch_digest(rows) == d
    after = s.allowed(["m1", "m2"], "modeling", None, T0 + 20 * DAY)
    assert (after.allowed, after.denied_counts) == (before.allowed, before.denied_counts)
    assert [p for k, p in audit.entries if k == "consent.purge"][-1]["identifiers_dropped"] == 1


def test_pseudonyms_are_hmac_sha256_truncated_to_128_bits() -> None:
    """The one pseudonym definition the store and the import workers share (consent.prepare
    .Pseudonymizer) is HMAC-SHA256 under the pseudonym key, first 128 bits in hex."""
    import hashlib
    import hmac

    from consent.prepare import Pseudonymizer

    key = bytes(range(32))
    p = Pseudonymizer(key)
    values = ["13800138000", "alice@example.com", "o6_bmjrPTlm6_2sgVt7hMZOPfL2M", "", "微信-用户"]
    expected = [hmac.new(key, v.encode("utf-8"), hashlib.sha256).hexdigest()[:32] for v in values]
    assert [p.ref(v) for v in values] == expected == p.refs(values)
    assert Pseudonymizer(bytes(range(1, 33))).ref(values[0]) != expected[0]
