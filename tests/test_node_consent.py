"""The node serves its consent store: the party's own systems record events; jobs ask the gate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from confide.errors import AuthenticationError
from confide.settings import NodeSettings
from party_node.app import create_app
from tests.helpers import inprocess_client


def test_consent_recorded_over_the_node_api_gates_processing(pki_dir: Path, tmp_path: Path) -> None:
    settings = NodeSettings(name="brand", pki_dir=pki_dir / "brand", data_dir=tmp_path, tls=False,
                            coordinator_url="http://127.0.0.1:9")  # no coordinator needed here
    app = create_app(settings)
    node = app.state.node
    now = dt.datetime.now(dt.timezone.utc)
    with TestClient(app) as tc:
        op = inprocess_client(app, tc, pki_dir, "brand", "brand")
        op.post("/v1/consent/notices", {"notice": "member-privacy", "version": "member-privacy.2026-01",
                                        "published_at": (now - dt.timedelta(days=30)).isoformat(),
                                        "purposes": [{"purpose": "modeling", "data_categories": ["profile"]},
                                                     {"purpose": "activation", "data_categories": ["phone"]}]})
        for i, subject in enumerate(("m1", "m2")):
            op.post("/v1/consent/events", {
                "event_id": f"ev-{i}", "subject": subject, "identifier": "13800138000", "purpose": "modeling",
                "action": "granted", "channel": "wechat_miniprogram", "notice_version": "member-privacy.2026-01",
                "valid_from": (now - dt.timedelta(days=1)).isoformat(),
                "valid_until": (now + dt.timedelta(days=365)).isoformat()})
        decision = node.consent.allowed(["m1", "m2", "m3"], "modeling.lead_scoring", None, now)
        assert decision.allowed == ["m1", "m2"] and decision.denied_counts == {"no_consent": 1}
        op.post("/v1/consent/events", {"event_id": "ev-w", "subject": "m2", "purpose": "modeling",
                                       "action": "withdrawn", "channel": "app"})
        later = node.consent.allowed(["m1", "m2"], "modeling.lead_scoring", None, dt.datetime.now(dt.timezone.utc))
        assert later.allowed == ["m1"] and later.denied_counts == {"withdrawn": 1}
        state = op.get("/v1/consent/subjects/m2/state")
        assert "13800138000" not in str(state)
        # every decision went to the node's audit log, without the raw identifier
        leaves = [node.audit.log.entry(i) for i in range(node.audit.log.size())]
        assert any("gate" in str(e).lower() for e in leaves)
        assert all("13800138000" not in str(e) for e in leaves)
        # an activation job asks which subjects it may contact now (the node DB was migrated
        # with the contact-history table); the call is audited with counts only
        for subject in ("m1", "m2"):
            op.post("/v1/consent/events", {"event_id": f"ev-a-{subject}", "subject": subject, "purpose": "activation",
                                           "action": "granted", "channel": "app",
                                           "notice_version": "member-privacy.2026-01"})
        op.put("/v1/consent/subjects/m1/preferences", {"channels": {"wecom": True}})
        out = op.post("/v1/consent/deliverable", {"subjects": ["m1", "m2", "m3"], "purpose": "activation.ads",
                                                  "channel": "sms", "topic": "new_models"})
        assert out["deliverable"] == ["m2"] and out["denied_counts"] == {"channel_not_allowed": 1, "no_consent": 1}
        assert node.audit.log.entry(node.audit.log.size() - 1).kind == "consent.delivery"
        # another party cannot write this node's consent records
        stranger = inprocess_client(app, tc, pki_dir, "partner", "brand")
        with pytest.raises(AuthenticationError, match="unknown party"):
            stranger.post("/v1/consent/events", {"event_id": "x", "subject": "m1", "purpose": "modeling",
                                                 "action": "granted", "channel": "app"})
