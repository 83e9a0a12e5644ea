"""The consent store writing to the real Merkle audit log (`consent.audit.AuditLog`)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from confide.db import make_engine
from confide.pki import load_identity
from consent.audit import AuditLog, verify_log
from consent.audit_storage import AuditBase
from consent.models import ensure_tables
from consent.store import ConsentStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def test_every_store_action_leaves_one_verifiable_pseudonymous_leaf(db_url: str, pki_dir: Path) -> None:
    engine = make_engine(db_url)
    ensure_tables(engine)
    AuditBase.metadata.create_all(engine)
    identity = load_identity(pki_dir / "brand")
    log = AuditLog(engine, identity, "brand")
    store = ConsentStore(engine, secret_key=b"audit-int-secret-0123456789abcde", recipients={"partner"}, audit=log)
    store.register_notice({"notice": "m", "version": "m/1", "published_at": T0,
                           "purposes": [{"purpose": "modeling", "data_categories": ["orders"]}]})
    store.record_events([
        {"event_id": f"e{i}", "subject": f"m{i}", "identifier": f"+86138000000{i:02d}", "purpose": "modeling",
         "action": "granted", "channel": "app", "notice_version": "m/1", "received_at": T0}
        for i in range(5)
    ])
    store.allowed([f"m{i}" for i in range(8)], "modeling.lookalike", None, T0 + dt.timedelta(days=1))
    store.set_preferences("m1", {"no_personalised_marketing": True})
    store.access("m2")
    store.erase("m3")
    kinds = [log.entry(seq).kind for seq in range(log.size())]
    assert kinds == ["consent.notice", "consent.events", "consent.gate", "consent.preferences",
                     "consent.access", "consent.erasure"]
    gate = log.entry(2).payload
    assert gate is not None and gate["allowed"] == 5 and gate["denied"] == {"no_consent": 3}
    leaves = json.dumps([log.entry(seq).payload for seq in range(log.size())])
    assert "+8613800000" not in leaves and '"m1"' not in leaves
    head = log.sign_head()
    report = verify_log(log, [head], identity.public_key)
    assert report.ok, report.summary()
