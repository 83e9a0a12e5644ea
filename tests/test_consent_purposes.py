"""Purposes: hierarchical keys shipped as data, flags inherited, extensible by file."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.errors import ConfigurationError, ValidationError
from consent.purposes import PurposeRegistry


def test_shipped_purposes_cover_the_issue_keys() -> None:
    reg = PurposeRegistry.load()
    for key in (
        "audience.overlap", "audience.match", "modeling.lead_scoring", "modeling.lookalike",
        "scoring.lead", "activation.ads", "sharing.third_party", "marketing.personalized",
    ):
        assert key in reg


def test_ancestors_most_specific_first_and_rule_coverage() -> None:
    reg = PurposeRegistry.load()
    assert reg.ancestors("modeling.lookalike") == ["modeling.lookalike", "modeling"]
    assert reg.covers("modeling", "modeling.lookalike")
    assert not reg.covers("modeling.lookalike", "modeling")
    assert not reg.covers("model", "modeling.lookalike")  # a prefix is not a parent
    assert reg.descendants("scoring") == ["scoring", "scoring.lead"]


def test_flags_are_inherited_and_personalised_set_matches_pipl_art_24() -> None:
    reg = PurposeRegistry.load()
    assert reg.recipient_specific("sharing.third_party")  # inherited from `sharing`
    assert not reg.recipient_specific("modeling.lookalike")
    personalised = {k for k in reg if reg.personalised(k)}
    assert {"modeling.lookalike", "scoring.lead", "marketing.personalized"} <= personalised
    assert "audience.overlap" not in personalised and "marketing" not in personalised


def test_unknown_purpose_is_a_validation_error_naming_the_field() -> None:
    reg = PurposeRegistry.load()
    with pytest.raises(ValidationError) as exc:
        reg.get("modelling.lookalike", field="events[3].purpose")
    assert exc.value.details["field"] == "events[3].purpose"
    assert "modelling.lookalike" in exc.value.message


def test_extension_file_adds_children(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("purposes:\n  scoring:\n    children:\n      churn:\n        personalised: true\n")
    reg = PurposeRegistry.load(extra)
    assert "scoring.churn" in reg and reg.personalised("scoring.churn")
    assert "scoring.lead" in reg  # shipped keys stay


def test_bad_purpose_file_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("purposes:\n  Bad-Name: {}\n")
    with pytest.raises(ConfigurationError):
        PurposeRegistry.load(bad)
