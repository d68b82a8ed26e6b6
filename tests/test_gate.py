"""The gate on real SUPPORT2 predictions: a miscalibrated model and a model that fails one subgroup are rejected, each for the right reason."""
import json
import shutil

import numpy as np
import pandas as pd
from conftest import run

from healthml.core.io import write_json
from healthml.core.layout import Layout
from healthml.core.params import load_params
from healthml.evaluation.evaluate import model_evaluation
from healthml.governance.gate import evaluate_gate, gate_evidence
from healthml.data.cohort import subgroup_frame
from healthml.evaluation.subgroups import fairness_columns, fairness_gaps, subgroup_table


def _evidence_for(root, scores):
    "Gate evidence with the candidate's test risks replaced by `scores` (threshold and subgroups recomputed)."
    params = load_params(root/"params.yaml")
    L, cfg = Layout(root), params.evaluate
    test = pd.read_parquet(L.split_file("test"))
    y, pid = test[params.dataset.outcome].to_numpy(), test[params.dataset.patient_id].to_numpy()
    thr = json.loads(L.evaluation.read_text())["lightgbm"]["threshold"]
    evidence = gate_evidence(L)
    evidence["evaluation"]["lightgbm"] = model_evaluation(y, scores, pid, thr, cfg)
    groups = subgroup_frame(test, params.dataset, cfg.intersections, cfg.slices)
    table = subgroup_table(y, scores, groups, pid, thr, cfg.min_subgroup_n, cfg.min_subgroup_events, 100)
    fair = fairness_columns(groups, params.dataset)
    evidence["subgroups"] = {"groups": table.to_dict(orient="records"),
                             "fairness_gaps": fairness_gaps(y, scores, groups[fair], thr, table[table.attribute.isin(fair)])}
    return params, evidence, test


def _candidate_scores(root):
    return pd.read_parquet(root/"data/processed/test_scores.parquet")["lightgbm"].to_numpy()


def test_overconfident_model_is_rejected_for_its_calibration_slope(pipeline_project):
    root, _ = pipeline_project
    p = _candidate_scores(root)
    logit = np.log(p / (1 - p))
    overconfident = 1 / (1 + np.exp(-(2.0 * logit + 1.0)))   # same ranking, risks far too extreme
    params, evidence, _ = _evidence_for(root, overconfident)
    verdict = evaluate_gate(params.gate, evidence)
    assert not verdict["passed"]
    assert "calibration_slope" in verdict["failed_rules"]
    assert "discrimination" not in verdict["failed_rules"]          # ranking unchanged: AUROC rule still passes
    slope_rule = next(r for r in verdict["rules"] if r["name"] == "calibration_slope")
    assert slope_rule["evidence"]["value"] < 0.6 and "must be >= 0.8" in slope_rule["reason"]


def test_model_that_fails_the_oldest_patients_is_rejected_naming_the_subgroup(pipeline_project):
    root, _ = pipeline_project
    p = _candidate_scores(root).copy()
    params, _, test = _evidence_for(root, p)
    oldest = (test["age"] >= 80).to_numpy()
    rng = np.random.default_rng(0)
    p[oldest] = rng.permutation(p[oldest])                       # no information for patients 80+
    params, evidence, _ = _evidence_for(root, p)
    verdict = evaluate_gate(params.gate, evidence)
    assert "subgroup_discrimination" in verdict["failed_rules"]
    reason = next(r for r in verdict["rules"] if r["name"] == "subgroup_discrimination")["reason"]
    assert "age_band = 80+" in reason


def test_healthml_gate_exits_1_and_names_the_failed_rule(pipeline_project, tmp_path):
    root, _ = pipeline_project
    for f in ("params.yaml", "metrics"):
        (shutil.copytree if (root/f).is_dir() else shutil.copy)(root/f, tmp_path/f)
    ev = json.loads((tmp_path/"metrics/evaluate.json").read_text())
    ev["lightgbm"]["auroc_ci_low"] = 0.71                       # as if the test set showed a weak model
    write_json(tmp_path/"metrics/evaluate.json", ev)
    r = run(["healthml", "gate"], tmp_path, check=False)
    assert r.returncode == 1
    assert "gate FAILED" in r.stderr and "discrimination: auroc_ci_low = 0.71 (must be >= 0.8)" in r.stderr
    verdict = json.loads((tmp_path/"metrics/gate.json").read_text())
    assert verdict["failed_rules"] == ["discrimination"]


def test_platt_recalibration_is_fitted_on_validation_and_reported_beside_the_candidate(pipeline_project, tmp_path):
    import yaml
    root, _ = pipeline_project
    proj = tmp_path/"p"
    shutil.copytree(root, proj, ignore=shutil.ignore_patterns("reports", "mlartifacts", ".git", ".dvc"))
    params = yaml.safe_load((proj/"params.yaml").read_text())
    params["evaluate"]["recalibration"] = "platt"
    params["evaluate"]["n_bootstrap"] = 50
    (proj/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["healthml", "evaluate"], proj)
    ev = json.loads((proj/"metrics/evaluate.json").read_text())
    assert set(ev) == {"lightgbm", "logistic", "compact", "lightgbm_recalibrated", "settings"}
    raw, recal = ev["lightgbm"], ev["lightgbm_recalibrated"]
    assert abs(recal["auroc"] - raw["auroc"]) < 1e-9                   # a monotone map keeps the ranking
    assert recal["calibration_slope"] != raw["calibration_slope"]
    assert 0.8 < recal["calibration_slope"] < 1.2 and abs(recal["calibration_intercept"]) < 0.2
    assert ev["settings"]["recalibration"] == "platt"
