"""Abstention on the real exported model: a record too sparse or too unfamiliar gets no risk and no alert, only the
fields that caused it; a full, familiar record scores exactly as before. Uses the session's pipeline project, read only."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, project_env

from healthml.core.io import sha256_file
from healthml.core.params import load_params
from healthml.modelling.decision import INSUFFICIENT, OUTSIDE, DecisionRules, abstention_rate, decide, decide_record, decide_records
from healthml.deploy.serve import RecordScorer
from healthml.modelling.export import training_support

README_RECORD = {"age": 71, "sex": "male", "aps": 62, "crea": 2.1, "dzgroup": "CHF"}  # the README's curl example


@pytest.fixture(scope="module")
def model(pipeline_project):
    root = pipeline_project[0]
    path = root/"models/onnx/lightgbm.onnx"
    scorer = RecordScorer.from_file(path, sha256_file(path))
    return root, scorer, DecisionRules.from_metadata(scorer.metadata)


@pytest.fixture(scope="module")
def test_records(model):
    "The test split as records (dicts of the present feature values), as the service receives them."
    root, scorer, rules = model
    df = pd.read_parquet(root/"data/processed/test.parquet")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items() if not pd.isna(v)}
            for row in df[list(rules.features)].to_dict("records")]


def judge(scorer, rules, record: dict) -> dict:
    return decide_record(rules, record, scorer.score([record])[0])


def test_an_empty_record_is_insufficient_data_with_no_alert_and_every_field_named(model):
    _, scorer, rules = model
    out = judge(scorer, rules, {})
    assert out["raw_risk"] >= rules.threshold           # scored as before, it would have alerted
    assert (out["band"], out["alert"], out["risk"], out["abstained"]) == (INSUFFICIENT, False, None, True)
    assert out["fields"][:4] == ["age", "aps", "dzgroup", "sps"]  # the required ones first, in the model's feature order
    assert sorted(out["fields"]) == sorted(rules.features)


def test_the_readme_record_abstains_for_a_missing_required_score_and_too_few_features(model):
    "5 of 32 features present, sps (required) among the missing: under the declared rule this must not be scored."
    _, scorer, rules = model
    out = judge(scorer, rules, README_RECORD)
    assert (out["band"], out["alert"], out["risk"]) == (INSUFFICIENT, False, None)
    assert out["fields"][0] == "sps"
    assert set(out["fields"]) == set(rules.features) - set(README_RECORD)
    assert not set(out["fields"]) & set(README_RECORD)


def test_a_value_beyond_the_training_support_or_an_unseen_category_is_outside_training_data(model, test_records):
    root, scorer, rules = model
    support = json.loads(scorer.metadata["training_support"])
    full = next(r for r in test_records if judge(scorer, rules, r)["band"] not in (INSUFFICIENT, OUTSIDE))
    lo, hi = rules.bounds["crea"]
    assert hi > support["crea"]["max"] and hi + 1 < 25   # beyond the support, still a valid value under the spec (max 25)
    out = judge(scorer, rules, full | {"crea": hi + 1})
    assert (out["band"], out["alert"], out["risk"], out["fields"]) == (OUTSIDE, False, None, ["crea"])
    assert judge(scorer, rules, full | {"crea": support["crea"]["max"]})["band"] not in (INSUFFICIENT, OUTSIDE)
    out = judge(scorer, rules, full | {"dzgroup": "Pancreatic Cancer"})  # dzgroup declares no categories: the support does
    assert (out["band"], out["fields"]) == (OUTSIDE, ["dzgroup"])
    assert judge(scorer, rules, full | {"dzgroup": "Pancreatic Cancer", "sps": None})["band"] == INSUFFICIENT  # presence first


def test_test_split_records_that_pass_score_exactly_as_before(model, test_records):
    _, scorer, rules = model
    raw = scorer.score(test_records)
    out = decide_records(rules, test_records, raw)
    scored = [i for i, o in enumerate(out) if not o["abstained"]]
    assert abstention_rate([o["band"] for o in out]) < 0.01
    assert len(scored) > 0.99 * len(out)
    for i in scored:                                     # the service's risk, band and alert of today
        assert out[i]["risk"] == round(float(raw[i]), 6)
        assert out[i]["alert"] == bool(raw[i] >= scorer.threshold)
        assert out[i]["band"] in ("low", "medium", "high", "elevated") and out[i]["fields"] == []
        above, unsure = raw[i] >= scorer.threshold, raw[i] <= rules.sets.no_event_until_
        assert (out[i]["band"] == "high") == (above and not unsure) and (out[i]["band"] == "elevated") == (above and unsure)
        assert out[i]["outcome_set"]["possible"] == ["event"] * bool(raw[i] >= rules.sets.event_from_) + ["no event"] * bool(unsure)
    assert {"high", "elevated"} <= {o["band"] for o in out}     # both kinds of alert occur on real patients


def test_the_batch_form_decides_as_the_per_record_form(model, test_records):
    root, scorer, rules = model
    df = pd.read_parquet(root/"data/processed/test.parquet")
    raw = scorer.model.predict_proba(df)
    batch = decide(rules, {c: df[c].to_numpy() for c in rules.features}, raw)
    assert batch.records() == decide_records(rules, test_records, raw)
    assert np.array_equal(np.isnan(batch.risk), batch.abstained)


def test_the_training_support_is_in_the_audited_model_file(model):
    root, scorer, rules = model
    params = load_params(root/"params.yaml")
    train = pd.read_parquet(root/"data/processed/train.parquet")
    assert json.loads(scorer.metadata["training_support"]) == json.loads(json.dumps(training_support(train, params.dataset)))
    assert json.loads(scorer.metadata["abstention"]) == params.dataset.abstention.model_dump()
    assert json.loads((root/"metrics/export.json").read_text())["lightgbm"]["sha256"] == scorer.sha256
    assert rules.required == ("age", "aps", "dzgroup", "sps") and rules.min_present == 16


def test_the_decision_loads_no_pandas_and_no_training_stack():
    code = ("import sys, healthml.modelling.decision\n"
            "print(sorted(m for m in ('pandas', 'sklearn', 'lightgbm', 'onnxruntime') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=project_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_monitor_warns_when_the_abstention_rate_rises(model, tmp_path):
    "A feed that starts sending creatinine in umol/L for a third of the ward: those records get no score, and the monitor says so."
    from healthml.core.layout import Layout
    from healthml.deploy.monitor import monitor
    root, _, _ = model
    test = pd.read_parquet(root/"data/processed/test.parquet")
    window = test.sample(600, random_state=1).reset_index(drop=True)
    window.loc[:199, "crea"] = window.loc[:199, "crea"] * 88.4
    window.to_csv(tmp_path/"ward.csv", index=False)
    r = monitor(load_params(root/"params.yaml"), Layout(root), tmp_path/"ward.csv", render=False)
    ab = r["abstention"]
    assert ab["reference"] < 0.01 and 0.25 < ab["current"] < 0.4 and ab["change_ci"][0] > 0.2
    assert [a for a in r["alerts"] if a["monitor"] == "abstention rate"]


def test_outcome_sets_keep_their_coverage_on_the_test_split_and_are_in_the_audited_model(model):
    root, scorer, rules = model
    evaluation = json.loads((root/"metrics/evaluate.json").read_text())
    cand = load_params(root/"params.yaml").candidate
    m = evaluation[cand]
    for k in ("coverage", "coverage_event", "coverage_no_event"):        # the promise, on patients the sets never saw
        assert abs(m[k] - m["nominal_coverage"]) <= 0.02, (k, m[k])
    assert 0.5 < m["informative_sets"] < 1
    sets = json.loads(scorer.metadata["outcome_sets"])                   # what the service applies is what was checked
    assert (sets["event_from"], sets["no_event_until"], sets["coverage"]) == (m["event_from"], m["no_event_until"], m["nominal_coverage"])
