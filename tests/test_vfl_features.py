"""Feature preparation at the node (party_node.features): one-hot over an agreed or node-chosen
vocabulary with an "other" indicator, standardisation fitted on training rows only, the same
transform at scoring time, and clear errors naming the column."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from confide.agreements import AgreementSpec
from confide.errors import ValidationError
from party_node import features as F
from tests.helpers import spec

TYPES = {"age": "int", "spend": "float", "tier": "category", "city": "category", "vip": "bool",
         "note": "string", "joined": "date", "level": "int"}


def frame() -> pd.DataFrame:
    return pd.DataFrame({
        "age": pd.array([20, 30, 40, 50, 60, 70], dtype="Int64"),
        "spend": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "tier": pd.array(["gold", "silver", "gold", "bronze", None, "gold"], dtype="str"),
        "city": pd.array(["sh", "bj", "sh", "gz", "sz", "sh"], dtype="str"),
        "vip": pd.array([True, False, True, False, False, True], dtype="boolean"),
        "level": pd.array([1, 2, 3, 1, 2, 9], dtype="Int64"),
        "note": pd.array(["a", "b", "c", "d", "e", "f"], dtype="str"),
    })


def test_numeric_columns_are_standardised_on_the_training_rows_only() -> None:
    f = frame()
    enc = F.fit(f.iloc[:4], ["age", "spend", "vip"], TYPES)
    X = enc.transform(f, "t")
    age = np.array([20, 30, 40, 50, 60, 70], float)
    mu, sd = age[:4].mean(), age[:4].std()
    assert np.allclose(X[:, 0], (age - mu) / sd)  # rows 4, 5 transformed with the training statistics
    assert np.allclose(X[:4].mean(axis=0), 0.0) and np.allclose(X[:4].std(axis=0), 1.0)
    assert enc.names == ["age", "spend", "vip"] and enc.width == 3
    raw = F.fit(f, ["age"], TYPES, standardize=False).transform(f, "t")
    assert raw[:, 0].tolist() == age.tolist()


def test_categorical_one_hot_with_node_vocabulary_cap_and_other() -> None:
    f = frame()
    enc = F.fit(f, ["city", "age"], TYPES, max_categories=2)
    # sh (3 rows) first, then bj/gz/sz tie at 1 -> value order: bj; the rest fold into other.
    assert enc.names == ["city=sh", "city=bj", f"city={F.OTHER}", "age"]
    X = enc.transform(f, "t")
    assert X[:, :3].tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]]
    # Every row has exactly one indicator per categorical column.
    assert (X[:, :3].sum(axis=1) == 1).all()


def test_agreed_vocabulary_unseen_and_missing_values_go_to_other() -> None:
    f = frame()
    enc = F.fit(f, ["tier"], TYPES, categories={"tier": ["gold", "silver", "platinum"]})
    # platinum has no training row: it folds into other (an all-zero column would learn nothing).
    assert enc.names == ["tier=gold", "tier=silver", f"tier={F.OTHER}"]
    X = enc.transform(f, "t")
    assert X.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]]
    # Scoring-time data: a new value, a missing one, and the agreed value training never saw.
    later = pd.DataFrame({"tier": pd.array(["diamond", None, "platinum", "silver"], dtype="str")})
    assert enc.transform(later, "s").tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 0]]


def test_an_int_column_listed_as_categorical_is_one_hot_and_values_compare_as_text() -> None:
    f = frame()
    enc = F.fit(f, ["level"], TYPES, categories={"level": [1, 2, 3]})  # ints from a JSON job param
    X = enc.transform(f, "t")
    assert enc.names == ["level=1", "level=2", "level=3", f"level={F.OTHER}"]
    assert X.argmax(axis=1).tolist() == [0, 1, 2, 0, 1, 3]
    floats = pd.DataFrame({"level": [1.0, 2.0, 7.0]})  # the same values read as floats
    assert enc.transform(floats, "s").argmax(axis=1).tolist() == [0, 1, 3]


def test_the_encoder_round_trips_through_json_and_transforms_identically() -> None:
    f = frame()
    enc = F.fit(f.iloc[:5], ["age", "tier", "spend", "city"], TYPES, max_categories=3)
    again = F.Encoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert again.names == enc.names
    assert np.array_equal(again.transform(f, "t"), enc.transform(f, "t"))
    # Model parts from before encoders existed: raw numeric columns.
    assert np.array_equal(F.Encoder.identity(["spend"]).transform(f, "t")[:, 0], f["spend"].to_numpy())


def test_bad_input_names_the_column() -> None:
    f = frame()
    with pytest.raises(ValidationError, match=r"unknown column\(s\) \['income'\]"):
        F.fit(f, ["age", "income"], TYPES)
    with pytest.raises(ValidationError, match="vocabulary of 'tier' is empty"):
        F.fit(f, ["tier"], TYPES, categories={"tier": []})
    with pytest.raises(ValidationError, match="lists a value twice"):
        F.fit(f, ["tier"], TYPES, categories={"tier": ["a", "a"]})
    with pytest.raises(ValidationError, match="'note' has type 'string'"):
        F.fit(f, ["note"], TYPES)
    with pytest.raises(ValidationError, match="not features of the job"):
        F.fit(f, ["age"], TYPES, categories={"tier": None})
    with pytest.raises(ValidationError, match="max_categories"):
        F.fit(f, ["city"], TYPES, max_categories=0)
    gaps = f.assign(spend=[1.0, np.nan, 3.0, np.nan, 5.0, 6.0])
    with pytest.raises(ValidationError, match="'spend' has 2 missing values") as err:
        F.fit(gaps, ["spend"], TYPES)
    assert err.value.details["field"] == "features"
    words = f.assign(spend=pd.array(["1", "2", "x", "4", "y", "6"], dtype="str"))
    with pytest.raises(ValidationError, match="'spend' has 2 non-numeric values"):
        F.fit(words, ["spend"], TYPES)
    blank = f.assign(tier=pd.array([None] * 6, dtype="str"))
    with pytest.raises(ValidationError, match="'tier' has no values"):
        F.fit(blank, ["tier"], TYPES)
    enc = F.fit(f, ["age", "tier"], TYPES)
    with pytest.raises(ValidationError, match=r"no column\(s\) \['tier'\]"):
        enc.transform(f[["age"]], "scoring rows")
    with pytest.raises(ValidationError, match="'age' has 1 missing values"):
        enc.transform(f.assign(age=pd.array([1, None, 3, 4, 5, 6], dtype="Int64")), "scoring rows")


def _train_spec() -> AgreementSpec:
    s = spec("vfl-x", jobs=("match", "train"), datasets={"brand": ["leads"], "partner": ["people"]})
    s["parties"][0]["columns"] = {"leads": ["y", "age", "tier"]}
    s["parties"][1]["columns"] = {"people": ["income", "city"]}
    return AgreementSpec.model_validate(s)


def test_the_train_job_checks_categories_before_anything_runs() -> None:
    from coordinator.vfl_jobs import TrainJob

    base = {"match_job": "m", "label": "y", "guest_features": ["age", "tier"],
            "host_features": {"partner": ["income", "city"]}}
    ok = TrainJob().validate_params(_train_spec(), {**base, "categories": {"partner": {"city": None,
                                                                                       "income": [1, 2, 3]}},
                                                    "max_categories": 8})
    assert ok["categories"] == {"partner": {"city": None, "income": ["1", "2", "3"]}}
    assert ok["max_categories"] == 8 and ok["standardize"] is True
    bad = [({"categories": {"partner": {"city": []}}}, "vocabulary is empty"),
           ({"categories": {"partner": {"phone": None}}}, "not one of partner's features"),
           ({"categories": {"mallory": {}}}, "no features in this job"),
           ({"categories": {"partner": {"city": ["a", "a"]}}}, "distinct"),
           ({"categories": ["city"]}, "maps each party"),
           ({"max_categories": 0}, "max_categories"),
           ({"standardize": "yes"}, "standardize")]
    for extra, msg in bad:
        with pytest.raises(ValidationError, match=msg):
            TrainJob().validate_params(_train_spec(), {**base, **extra})


def test_rare_values_fold_into_other_per_mini_batch_so_no_indicator_singles_rows_out() -> None:
    f = pd.DataFrame({"city": pd.array(["sh"] * 6 + ["bj"] * 3 + ["gz"], dtype="str")})
    # Over all rows: sh 6, bj 3, gz 1. With min_count 3, gz folds into other, which (1 row) is dropped.
    enc = F.fit(f, ["city"], TYPES, min_count=3)
    assert enc.names == ["city=sh", "city=bj"]
    assert enc.transform(f, "t")[-1].tolist() == [0.0, 0.0]  # gz: the column's baseline
    # Per mini-batch: bj has 3 rows in all but only 1 in the second batch -> folded; other =
    # bj + gz has 2 + 2 rows -> kept.
    batches = [np.array([0, 1, 2, 6, 7]), np.array([3, 4, 5, 8, 9])]
    enc = F.fit(f, ["city"], TYPES, min_count=2, batches=batches)
    assert enc.names == ["city=sh", f"city={F.OTHER}"]
    assert enc.transform(f, "t").tolist() == [[1, 0]] * 6 + [[0, 1]] * 4
    # An agreed vocabulary is subject to the same rule.
    enc = F.fit(f, ["city"], TYPES, categories={"city": ["bj", "gz"]}, min_count=3)
    assert enc.names == ["city=bj", f"city={F.OTHER}"]
    with pytest.raises(ValidationError, match="no value with at least 7 training rows"):
        F.fit(f, ["city"], TYPES, min_count=7)
    # Survives the JSON round trip without an other column.
    enc = F.fit(f, ["city"], TYPES, min_count=3)
    assert F.Encoder.from_dict(json.loads(json.dumps(enc.to_dict()))).names == ["city=sh", "city=bj"]
