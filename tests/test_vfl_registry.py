"""The coordinator's model registry and model cards (real processes): a trained model's entry
and card, readable by the parties of its agreement only, through the API and
`confide node model list|show|card`; aggregate held-out metrics only over >= k_min rows."""

from __future__ import annotations

import json

import pytest

from confide import pki
from confide.errors import NotFound
from confide.localnet import LocalNet
from confide.transport import ServiceClient
from tests.test_integration import confide, wait_job
from tests.test_vfl_jobs import GUEST_X, HOST_X, _params, _private, world3  # noqa: F401

pytestmark = pytest.mark.slow


def _coordinator(net: LocalNet, party: str) -> ServiceClient:
    return ServiceClient(pki.load_identity(net.pki_dir / party), "coordinator", net.services["coordinator"].url)


@pytest.fixture(scope="module")
def trained(world3):  # type: ignore[no-untyped-def]
    net, w = world3
    # 35% held out: more than k_min=50 rows, so the brand (which opts in) reports the aggregate metrics.
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                        "params": _params(w, test_fraction=0.35, publish_metrics=True)})
    job = wait_job(net, "brand", job["id"], timeout=120)
    assert job["status"] == "succeeded", job.get("error")
    return net, w, job


def test_registry_entry_and_card_through_the_cli(trained) -> None:  # type: ignore[no-untyped-def]
    net, w, job = trained
    version = job["id"]
    brand_cfg = str(net.config("brand"))
    listed = json.loads(confide("node", "model", "list", "--json", "--config", brand_cfg).stdout)
    assert version in [m["version"] for m in listed]
    table = confide("node", "model", "list", "--config", brand_cfg).stdout
    assert version in table and "vfl-2026 v1" in table
    entry = json.loads(confide("node", "model", "show", version, "--json", "--config", brand_cfg).stdout)
    private = _private(net, "brand", version)
    assert entry["agreement_id"] == "vfl-2026" and entry["agreement_version"] == 1
    assert (entry["guest"], entry["hosts"]) == ("brand", ["partner"])
    assert entry["feature_counts"] == {"brand": len(GUEST_X), "partner": len(HOST_X)}
    assert entry["data"] == {"train_rows": private["train_rows"], "test_rows": private["test_rows"]}
    assert entry["training"]["epochs"] == private["epochs"] and entry["training"]["stop_reason"]
    assert entry["training"]["losses"] == pytest.approx(private["losses"], abs=1e-6)
    m = entry["heldout_metrics"]
    assert private["test_rows"] >= 50 and m["rows"] == private["test_rows"]
    assert m["auc"] == pytest.approx(private["metrics"]["auc"], abs=1e-6)
    assert m["ks"] == pytest.approx(private["metrics"]["ks"], abs=1e-6)
    assert m["lift_top_decile"] == pytest.approx(private["metrics"]["lift_top_decile"], abs=1e-6)
    assert m["guest_only"]["auc"] == pytest.approx(private["guest_only_auc"], abs=1e-6)
    # Aggregates only: not the base rate, not the per-decile table, no model part.
    text = json.dumps(entry)
    for word in ("positive_rate", "calibration", "weights", "intercept", "mask_seed", "encoding"):
        assert word not in text, word

    card = json.loads(confide("node", "model", "card", version, "--json", "--config", brand_cfg).stdout)
    assert card["model_version"] == version
    assert card["consent_purposes"] == {"training": "modeling.lead_scoring", "scoring": "scoring.lead"}
    assert card["metrics"]["federated"]["auc"] == m["auc"]
    assert card["metrics"]["partner_gain"]["auc"] == pytest.approx(m["auc"] - m["guest_only"]["auc"], abs=1e-6)
    assert card["data"]["train_rows"] == private["train_rows"]
    assert card["features"]["model_columns"] == entry["feature_counts"]
    assert card["limitations"] and card["leakage"] and "brand" in card["intended_use"]
    md = confide("node", "model", "card", version, "--config", brand_cfg).stdout
    assert md.startswith("# Lead-scoring model") and "## Held-out metrics" in md and "## Leakage" in md
    assert f"| auc | {m['auc']:.4f} | {m['guest_only']['auc']:.4f} |" in md
    assert "`modeling.lead_scoring`" in md and f"Training rows: {private['train_rows']}" in md


def test_only_parties_of_the_agreement_read_a_model(trained) -> None:  # type: ignore[no-untyped-def]
    net, w, job = trained
    version = job["id"]
    with _coordinator(net, "brand") as c:
        mine = c.get(f"/v1/models/{version}")
    with _coordinator(net, "partner") as c:
        assert c.get(f"/v1/models/{version}") == mine  # the partner is a party: same entry
        assert c.get(f"/v1/models/{version}/card")["model_version"] == version
    # partner2 is registered and shares another agreement with the brand, not this one.
    with _coordinator(net, "partner2") as c:
        with pytest.raises(NotFound, match="does not exist"):
            c.get(f"/v1/models/{version}")
        with pytest.raises(NotFound):
            c.get(f"/v1/models/{version}/card")
        assert version not in [m["version"] for m in c.get("/v1/models")]
    out = confide("node", "model", "show", version, "--config", str(net.config("partner2")), check=False)
    assert out.returncode != 0 and "does not exist" in out.stdout + out.stderr
    # Not models: an unknown version, a match job.
    with _coordinator(net, "brand") as c:
        with pytest.raises(NotFound, match="does not exist"):
            c.get("/v1/models/no-such-version")
        with pytest.raises(NotFound, match="does not exist"):
            c.get(f"/v1/models/{w['match_job']}")


def test_too_few_held_out_rows_suppress_the_metrics_in_the_card(trained) -> None:  # type: ignore[no-untyped-def]
    net, w, _ = trained
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                        "params": _params(w, test_fraction=0.1, publish_metrics=True)})
    job = wait_job(net, "brand", job["id"], timeout=120)
    assert job["status"] == "succeeded", job.get("error")
    with _coordinator(net, "partner") as c:
        entry = c.get(f"/v1/models/{job['id']}")
        md = c.request("GET", f"/v1/models/{job['id']}/card.md", raw=True).decode()
    assert entry["heldout_metrics"]["suppressed"] is True and "k_min=50" in entry["heldout_metrics"]["reason"]
    assert "auc" not in json.dumps(entry)
    assert "Suppressed:" in md and "| auc |" not in md


def test_metrics_stay_with_the_brand_unless_it_publishes_them(trained) -> None:  # type: ignore[no-untyped-def]
    """The leakage table gives training metrics to the brand only: without publish_metrics the
    registry (coordinator, partner) gets none, while the brand's private result has them."""
    net, w, _ = trained
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                        "params": _params(w, test_fraction=0.35)})
    job = wait_job(net, "brand", job["id"], timeout=120)
    assert job["status"] == "succeeded", job.get("error")
    with _coordinator(net, "partner") as c:
        entry = c.get(f"/v1/models/{job['id']}")
    assert entry["heldout_metrics"]["suppressed"] is True and "publish_metrics" in entry["heldout_metrics"]["reason"]
    assert "auc" not in json.dumps(entry)
    assert "auc" in _private(net, "brand", job["id"])["metrics"]
