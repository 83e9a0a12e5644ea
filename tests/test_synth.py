"""`confide synth`: determinism, overlap, messy identifiers, consent, schemas, planted signal."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from confide.errors import ValidationError
from party_node.synth import generate

DATA_FILES = ("brand_members", "brand_leads", "brand_new_leads", "partner_population", "brand_consent",
              "partner_consent")
PURPOSES = {"audience.overlap", "audience.match", "modeling.lead_scoring", "scoring.lead",
            "modeling.lookalike", "marketing.personalized", "sharing.third_party"}
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def norm_phone(value: object) -> str | None:
    """The test's own normaliser: digits only (full-width folded), 86 / 0086 prefix stripped."""
    if not isinstance(value, str):
        return None
    digits = re.sub(r"\D", "", unicodedata.normalize("NFKC", value))
    if digits.startswith("0086"):
        digits = digits[4:]
    elif digits.startswith("86") and len(digits) == 13:
        digits = digits[2:]
    return digits if len(digits) == 11 and digits.startswith("1") else None


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, members=3000, leads=8000, seed=7, brand_name="acme", partner_name="datapal")
    return out


def test_same_seed_gives_identical_files_and_another_seed_different(tmp_path: Path) -> None:
    args = dict(members=500, leads=300, partner_factor=2.0)
    generate(tmp_path / "a", seed=5, **args)
    generate(tmp_path / "b", seed=5, **args)
    generate(tmp_path / "c", seed=6, **args)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    # 6 data files with schemas, new-lead outcomes, preferences, 2 notice files, ground_truth.json
    assert len(names) == 17
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in DATA_FILES:
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() != (tmp_path / "c" / f"{name}.csv").read_bytes(), name


def test_parquet_holds_the_same_rows_as_csv(tmp_path: Path) -> None:
    generate(tmp_path / "csv", members=400, seed=3)
    generate(tmp_path / "pq", members=400, seed=3, fmt="parquet")
    for name in DATA_FILES:
        c = read(tmp_path / "csv", name)
        p = pd.read_parquet(tmp_path / "pq" / f"{name}.parquet")
        assert list(p.columns) == list(c.columns)
        assert len(p) == len(c)
        key = c.columns[0]
        assert p[key].astype(str).tolist() == c[key].tolist()
        assert p["phone" if "phone" in p else "identifier"].fillna("").astype(str).tolist() == \
            c["phone" if "phone" in c else "identifier"].fillna("").tolist()


@pytest.mark.parametrize("overlap", [0.0, 0.35, 0.8])
def test_overlap_fraction_measured_by_normalised_phone(tmp_path: Path, overlap: float) -> None:
    generate(tmp_path, members=4000, leads=2000, overlap=overlap, seed=11)
    partner = set(read(tmp_path, "partner_population")["phone"].map(norm_phone).dropna())
    for name in ("brand_members", "brand_leads"):
        phones = read(tmp_path, name)["phone"].map(norm_phone).dropna()
        frac = phones.isin(partner).mean()
        # ~3% of partner rows lack a phone, so the phone-measured overlap sits slightly below.
        assert abs(frac - overlap * 0.97) < 0.03, (name, frac)
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    assert truth["overlap"]["members_in_partner"] == round(overlap * 4000)
    # The expected PSI matches the generator reports are exactly what normalisation finds.
    members = read(tmp_path, "brand_members")
    assert members["phone"].map(norm_phone).isin(partner).sum() == truth["expected_matches"]["brand_members"]["phone"]
    partner_emails = set(read(tmp_path, "partner_population")["email"].dropna())
    found = members["email"].dropna().str.strip().str.lower().isin(partner_emails).sum()
    assert found == truth["expected_matches"]["brand_members"]["email"]


def test_identifiers_are_messy_but_normalise_consistently(data: Path) -> None:
    members = read(data, "brand_members")
    phone = members["phone"]
    assert phone.isna().mean() > 0.02
    patterns = {
        "plain": r"^1\d{10}$", "cc_spaced": r"^\+86 1\d{2} \d{4} \d{4}$", "intl_00": r"^0086-1\d{10}$",
        "dashed": r"^1\d{2}-\d{4}-\d{4}$", "fullwidth": "[\uff10-\uff19]", "e164": r"^\+861\d{10}$",
    }
    for label, pattern in patterns.items():
        assert phone.dropna().str.contains(pattern).any(), label
    normalised = phone.map(norm_phone)
    too_short = phone.notna() & normalised.isna()
    assert 0.005 < too_short.mean() < 0.06  # invalid / junk values
    assert normalised.dropna().is_unique  # one person, one member row

    email = members["email"]
    assert 0.3 < email.isna().mean() < 0.6
    present = email.dropna()
    assert (present != present.str.strip()).any()
    assert (present.str.strip() != present.str.strip().str.lower()).any()
    assert present.str.strip().str.lower().str.fullmatch(r"[a-z0-9._]+@[a-z0-9.]+\.[a-z]+").all()

    openid = members["openid"].dropna()
    assert openid.str.fullmatch(r"o[A-Za-z0-9_-]{27}").all()
    assert 0.5 < len(openid) / len(members) < 0.9
    assert members["unionid"].isna().sum() > members["openid"].isna().sum()

    # The partner keeps phones normalised its own way: plain 11 digits or +86.
    pphone = read(data, "partner_population")["phone"].dropna()
    assert pphone.str.fullmatch(r"(\+86)?1\d{10}").all()
    assert pphone.str.startswith("+86").any() and (~pphone.str.startswith("+86")).any()


def test_same_person_has_same_email_and_unionid_on_both_sides(data: Path) -> None:
    members = read(data, "brand_members")
    partner = read(data, "partner_population")
    members["key"] = members["phone"].map(norm_phone)
    partner["key"] = partner["phone"].map(norm_phone)
    joined = members.dropna(subset=["key"]).merge(partner.dropna(subset=["key"]), on="key", suffixes=("_b", "_p"))
    assert len(joined) > 500
    both = joined.dropna(subset=["email_b", "email_p"])
    assert len(both) > 30
    assert (both["email_b"].str.strip().str.lower() == both["email_p"]).all()
    shared = joined.dropna(subset=["unionid_b", "unionid_p"])
    assert len(shared) > 30 and (shared["unionid_b"] == shared["unionid_p"]).all()
    # Joined by e-mail instead, the pairs are the same people again: no accidental collisions.
    members["email_key"] = members["email"].str.strip().str.lower()
    by_email = members.dropna(subset=["email_key"]).merge(partner.dropna(subset=["email"]),
                                                          left_on="email_key", right_on="email", suffixes=("_b", "_p"))
    assert len(by_email) > len(both)  # includes people whose brand phone is missing or invalid
    phones = by_email.dropna(subset=["key_b", "key_p"])
    assert (phones["key_b"] == phones["key_p"]).all()


def test_high_value_is_spend_over_1000_in_3_months(data: Path) -> None:
    m = read(data, "brand_members")
    spend = m["spend_3m"].astype(float)
    assert ((spend > 1000).astype(int) == m["high_value"].astype(int)).all()
    assert 0.03 < m["high_value"].astype(int).mean() < 0.2
    assert (m["monetary_12m"].astype(float) >= spend - 1e-6).all()
    assert m["city_tier"].astype(int).between(1, 5).all()


def test_consent_events_are_plausible(data: Path) -> None:
    members = read(data, "brand_members")
    leads = read(data, "brand_leads")
    for name, own, other, subjects in (
        ("brand_consent", "acme", "datapal",
         set(members["member_id"]) | set(leads["lead_id"]) | set(read(data, "brand_new_leads")["lead_id"])),
        ("partner_consent", "datapal", "acme", set(read(data, "partner_population")["partner_id"])),
    ):
        c = read(data, name)
        assert c["event_id"].is_unique and c["event_id"].str.startswith(f"{own}-ce-").all()
        assert set(c["subject"]) <= subjects
        assert set(c["purpose"]) == PURPOSES
        rates = c["action"].value_counts(normalize=True)
        assert set(rates.index) == {"granted", "refused", "withdrawn"}
        assert 0.55 < rates["granted"] < 0.85
        assert 0.1 < rates["refused"] < 0.4
        assert 0.01 < rates["withdrawn"] < 0.1
        # Processing with the other party names it (PIPL Art. 23): all collaboration purposes
        # but the counts-only overlap.
        named = c["purpose"].isin(PURPOSES - {"audience.overlap", "marketing.personalized"})
        assert (c.loc[named, "recipient"] == other).all()
        assert c.loc[~named, "recipient"].isna().all()
        # Each event cites a notice version in force then, which covers its purpose.
        role = "brand" if name.startswith("brand") else "partner"
        notices = yaml.safe_load((data / f"{role}_notices.yaml").read_text())
        covered = {(n["version"], p["purpose"]) for n in notices for p in n["purposes"]}
        assert set(zip(c["notice_version"], c["purpose"])) <= covered
        published = {n["version"]: n["published_at"] for n in notices}
        assert (c["valid_from"] >= c["notice_version"].map(published)).all()
        collab = c["purpose"] != "marketing.personalized"
        assert (c.loc[collab, "valid_from"] >= "2025-03-01").all()
        assert (c.loc[~collab, "valid_from"] < "2020-01-01").any()
        assert set(c["channel"]) <= {"wechat_miniprogram", "app", "store", "call_centre", "web"}
        for col in ("valid_from", "received_at"):
            assert c[col].str.fullmatch(ISO_UTC).all()
        granted = c["action"] == "granted"
        assert c.loc[granted, "valid_until"].str.fullmatch(ISO_UTC).all()
        assert c.loc[~granted, "valid_until"].isna().all()
        assert (c.loc[granted, "valid_until"] > c.loc[granted, "valid_from"]).all()
        # Every withdrawal follows a grant of the same subject and purpose.
        first_grant = c[granted].groupby(["subject", "purpose"])["valid_from"].min()
        w = c[c["action"] == "withdrawn"].set_index(["subject", "purpose"])["valid_from"]
        assert (w > first_grant.reindex(w.index)).all()
        assert c["valid_from"].is_monotonic_increasing  # event ids number events in time order
        assert (c["received_at"] >= c["valid_from"]).all()


def test_schema_yaml_files_are_valid_and_match_the_data(data: Path) -> None:
    id_types = {"phone", "email", "openid", "unionid", "platform_id", "phone_md5", "phone_sha256"}
    feature_types = {"int", "float", "bool", "category", "string", "date"}
    for name in DATA_FILES:
        schema = yaml.safe_load((data / f"{name}.schema.yaml").read_text())
        assert schema["dataset"] == name
        frame = read(data, name)
        assert schema["key"] in frame.columns and frame[schema["key"]].is_unique
        columns = [schema["key"]]
        for section, allowed in (("identifiers", id_types), ("features", feature_types), ("labels", {"binary", "float"})):
            for entry in schema[section] or []:
                assert set(entry) == {"column", "type"}
                assert entry["type"] in allowed, (name, entry)
                assert entry["column"] in frame.columns, (name, entry)
                columns.append(entry["column"])
        assert len(columns) == len(set(columns))
        for entry in schema["features"]:
            values = frame[entry["column"]].dropna()
            if entry["type"] in ("int", "bool"):
                assert values.str.fullmatch(r"-?\d+").all(), (name, entry)
            if entry["type"] == "bool":
                assert set(values) <= {"0", "1"}
            if entry["type"] == "float":
                assert pd.to_numeric(values).notna().all()
    labels = {e["column"] for e in yaml.safe_load((data / "brand_leads.schema.yaml").read_text())["labels"]}
    assert labels == {"converted"}


def _design(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> np.ndarray:
    return np.hstack([frame[numeric].astype(float).to_numpy(),
                      pd.get_dummies(frame[categorical], dtype=float).to_numpy()])


def test_partner_features_raise_lead_auc(data: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    leads = read(data, "brand_leads")
    partner = read(data, "partner_population")
    leads["key"] = leads["phone"].map(norm_phone)
    partner["key"] = partner["phone"].map(norm_phone)
    joined = leads.dropna(subset=["key"]).merge(partner.dropna(subset=["key"]), on="key", suffixes=("", "_p"))
    assert len(joined) > 2000
    y = joined["converted"].astype(int).to_numpy()
    brand = _design(joined, ["age", "days_to_first_contact", "test_drive_booked", "dealer_visits",
                             "calls_answered", "wechat_interactions", "configurator_sessions",
                             "price_quote_requested", "financing_inquiry", "trade_in_inquiry"],
                    ["source_channel", "lead_grade", "budget_band", "city_tier"])
    part = _design(joined, ["interest_auto", "interest_new_energy", "interest_luxury", "purchase_intent_score",
                            "car_owner", "car_app_usage_days_30d", "app_autohome_active", "app_dongchedi_active"],
                   ["income_level", "car_insurance_status", "consumption_level"])
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=0, stratify=y)

    def auc(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[tr], y[tr])
        return roc_auc_score(y[te], model.predict_proba(x[te])[:, 1])

    brand_only, with_partner = auc(brand), auc(np.hstack([brand, part]))
    assert brand_only > 0.6  # the brand's own features carry signal
    assert with_partner - brand_only > 0.05, (brand_only, with_partner)
    truth = json.loads((data / "ground_truth.json").read_text())["lead_scoring_auc"]
    assert truth["with_partner"] > truth["brand_only"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(overlap=1.5), "overlap"),
    (dict(lead_overlap=1.2), "lead_overlap"),
    (dict(new_leads=-1), "new_leads"),
    (dict(leads=900, partner_factor=1.0, overlap=0.1, lead_overlap=1.0), "lead_overlap"),
    (dict(overlap=-0.1), "overlap"),
    (dict(members=0), "members"),
    (dict(members=-3), "members"),
    (dict(leads=0), "leads"),
    (dict(partner_factor=0.0), "partner_factor"),
    (dict(partner_factor=0.2, overlap=0.9), "overlap"),
    (dict(seed=-1), "seed"),
    (dict(fmt="xlsx"), "format"),
    (dict(brand_name="same", partner_name="same"), "brand_name"),
    (dict(brand_name="bad name!"), "brand_name"),
])
def test_bad_options_raise_validation_error(tmp_path: Path, kwargs: dict, field: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=field):
        generate(out, **{"members": 100, **kwargs})
    assert not out.exists()


def test_out_dir_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ValidationError, match="not a directory"):
        generate(target, members=100)


def test_cli_prints_json_summary_and_exits_2_on_bad_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from party_node.synth_cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["--out", str(tmp_path / "o"), "--members", "300", "--seed", "9", "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["rows"]["brand_members"] == 300 and summary["rows"]["brand_leads"] == 75
    assert summary["rows"]["partner_population"] == 900
    assert (tmp_path / "o" / "partner_consent.csv").exists()
    bad = runner.invoke(app, ["--out", str(tmp_path / "x"), "--overlap", "2"])
    assert bad.exit_code == 2
    assert "overlap" in bad.output + (bad.stderr or "")


def test_new_leads_have_no_outcome_but_the_outcomes_file_holds_it(data: Path) -> None:
    new = read(data, "brand_new_leads")
    leads = read(data, "brand_leads")
    outcomes = read(data, "brand_new_leads_outcomes")
    assert len(new) == 800 and "converted" not in new.columns  # default: leads // 10
    assert list(outcomes.columns) == ["lead_id", "converted"] and outcomes["lead_id"].tolist() == new["lead_id"].tolist()
    assert set(outcomes["converted"]) == {"0", "1"}
    assert not set(new["lead_id"]) & set(leads["lead_id"])
    # New leads came in the last two weeks; historical ones long enough ago to know the outcome.
    assert (new["created_date"] >= "2026-10-18").all()
    assert (leads["created_date"] <= "2026-08-02").all()
    schema = yaml.safe_load((data / "brand_new_leads.schema.yaml").read_text())
    assert schema["labels"] == [] and schema["key"] == "lead_id"
    truth = json.loads((data / "ground_truth.json").read_text())["new_leads"]
    assert truth["rows"] == 800 and 0 < truth["in_partner"] < 800
    assert truth["oracle_auc"] > 0.7


def test_lead_overlap_sets_how_many_leads_the_partner_knows(tmp_path: Path) -> None:
    generate(tmp_path, members=2000, leads=6000, new_leads=0, overlap=0.2, lead_overlap=0.7, seed=3)
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    partner = set(read(tmp_path, "partner_population")["phone"].map(norm_phone).dropna())
    leads = read(tmp_path, "brand_leads")
    non_members = leads[leads["member_id"].isna()]["phone"].map(norm_phone).dropna()
    assert abs(non_members.isin(partner).mean() - 0.7 * 0.97) < 0.03
    members = read(tmp_path, "brand_members")["phone"].map(norm_phone).dropna()
    assert abs(members.isin(partner).mean() - 0.2 * 0.97) < 0.03
    assert truth["rows"]["brand_new_leads"] == 0 and len(read(tmp_path, "brand_new_leads")) == 0


def test_consent_decisions_of_one_person_go_together_and_leads_grant_lead_purposes_more(data: Path) -> None:
    c = read(data, "brand_consent")
    first = c.sort_values("valid_from").groupby(["subject", "purpose"])["action"].first().unstack()
    match = first["audience.match"].dropna()
    scoring = first["modeling.lead_scoring"].reindex(match.index)
    granted_after_refusal = (scoring[match == "refused"] == "granted").mean()
    granted_after_grant = (scoring[match == "granted"] == "granted").mean()
    assert granted_after_grant - granted_after_refusal > 0.3, (granted_after_grant, granted_after_refusal)
    is_lead = first.index.str.startswith(("L", "NL"))
    lead_rate = (first.loc[is_lead, "modeling.lead_scoring"] == "granted").mean()
    member_rate = (first.loc[~is_lead, "modeling.lead_scoring"] == "granted").mean()
    assert lead_rate > member_rate + 0.05 and 0.75 < lead_rate < 0.95


def test_preferences_opt_outs_are_few_and_name_brand_subjects(data: Path) -> None:
    prefs = read(data, "brand_preferences")
    subjects = set(read(data, "brand_members")["member_id"]) | set(read(data, "brand_leads")["lead_id"]) \
        | set(read(data, "brand_new_leads")["lead_id"])
    assert prefs["subject"].is_unique and set(prefs["subject"]) <= subjects
    assert 0.01 < len(prefs) / len(subjects) < 0.05
    assert (prefs["no_personalised_marketing"] == "1").all()
    assert prefs["changed_at"].str.fullmatch(ISO_UTC).all() and prefs["changed_at"].is_monotonic_increasing
    assert (prefs["changed_at"] < "2026-11-01").all()


def test_the_demo_models_features_carry_the_planted_lift(data: Path) -> None:
    """The smaller feature set the demo's federated model trains on shows the partner's value too."""
    truth = json.loads((data / "ground_truth.json").read_text())["lead_scoring_auc_model_features"]
    assert truth["brand_only"] > 0.58
    assert truth["with_partner"] - truth["brand_only"] > 0.06, truth
    for name, cols in (("brand_leads", truth["brand_features"]), ("partner_population", truth["partner_features"])):
        values = read(data, name)[cols]
        assert values.notna().all().all(), name  # the node refuses missing feature values
