"""Model-agnostic pipeline: the models are whatever params.yaml lists, and `gate.candidate` is the one every stage follows."""
import json

import pandas as pd
import pytest
import yaml

from conftest import clone_project, run

MODELS = ["logistic", "lightgbm", "compact", "lightgbm_small"]  # the candidate first, then the others in params.yaml order


@pytest.mark.slow
def test_three_models_with_logistic_as_candidate_flow_through_every_stage(pipeline_project, tmp_path):
    root = clone_project(pipeline_project[0], tmp_path/"project")                # data stages done; models change
    params = yaml.safe_load((root/"params.yaml").read_text())
    params["models"]["lightgbm_small"] = {"kind": "lightgbm", "n_estimators": 100, "learning_rate": 0.05,
                                          "num_leaves": 7, "seed": 7}            # a second LightGBM configuration
    params["gate"]["candidate"] = "logistic"
    for rule in params["gate"]["rules"]:                                          # the trees are now the comparison
        if rule.get("against") == "logistic": rule["against"] = "lightgbm"
    params["evaluate"]["n_bootstrap"] = 50                                        # fast: the statistics are tested elsewhere
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    r = run(["healthml", "repro"], root, check=False)               # every stage; the gate may fail
    gate = json.loads((root/"metrics/gate.json").read_text())
    assert r.returncode == (0 if gate["passed"] else 1), r.stderr[-3000:]
    assert "Traceback" not in r.stderr

    # train, evaluate, export: all three models, the candidate first
    train = json.loads((root/"metrics/train.json").read_text())
    assert set(MODELS) <= set(train) and all(train[m]["validation_auroc"] > 0.75 for m in MODELS)
    assert sorted(p.name for p in (root/"models/native").iterdir()) == sorted(f"{m}.skops" for m in MODELS)
    evaluation = json.loads((root/"metrics/evaluate.json").read_text())
    assert sorted(evaluation) == sorted([*MODELS, "settings"]) and evaluation["settings"]["bootstrap_replicates"] == 50
    comparison = json.loads((root/"metrics/comparison.json").read_text())
    assert sorted(comparison) == ["compact", "lightgbm", "lightgbm_small"]    # every other model against the candidate
    assert comparison["lightgbm"]["auroc"]["difference"] == pytest.approx(
        evaluation["logistic"]["auroc"] - evaluation["lightgbm"]["auroc"], abs=2e-6)
    assert list(pd.read_parquet(root/"data/processed/test_scores.parquet").columns) == ["outcome", *MODELS]
    for folder in ("roc", "calibration", "calibration_smooth", "risk_histogram", "decision_curve"):
        assert sorted(p.stem for p in (root/"plots"/folder).iterdir()) == sorted(MODELS), folder
    export = json.loads((root/"metrics/export.json").read_text())
    assert sorted(export) == sorted(MODELS) and all(export[m]["passed"] for m in MODELS)
    trees = [m for m in MODELS if export[m]["compiled"]["built"]]                  # compiled trees beside each tree model
    assert sorted(trees) == ["compact", "lightgbm", "lightgbm_small"] and not export["logistic"]["compiled"]["built"]
    assert sorted(p.name for p in (root/"models/onnx").iterdir()) == sorted(
        [f"{m}{s}" for m in MODELS for s in (".onnx", ".explain.json")] + [f"{m}.trees.so" for m in trees])
    assert all(export[m]["explainer"]["passed"] for m in MODELS)                 # each model with its reasons
    from healthml.modelling.scoring import OnnxScorer
    meta = OnnxScorer(root/"models/onnx/lightgbm_small.onnx").metadata
    assert (meta["model_name"], meta["model_kind"]) == ("support2-mortality-lightgbm_small", "lightgbm")

    # report: versioned by the logistic ONNX hash, about the logistic model, naming every model
    record = json.loads((root/"metrics/report.json").read_text())
    assert record["report"] == "report" and record["version"] == export["logistic"]["sha256"][:12]
    report = root/record["report"]
    manifest = json.loads((report/"manifest.json").read_text())
    assert manifest["candidate"] == "logistic" and sorted(manifest["metrics"]) == sorted(MODELS)
    assert {f"model_{m}_onnx" for m in MODELS} <= set(manifest["inputs"])
    card = json.loads((report/"model_card.json").read_text())
    assert card["basic_information"]["model_type"].startswith("L2-penalised logistic regression")
    assert card["key_metrics"]["usefulness"]["AUROC"].startswith(f"{evaluation['logistic']['auroc']:.3f}")
    page = (report/"validation.html").read_text()
    for label in ("logistic (candidate)", "lightgbm_small (lightgbm)", "Candidate vs"):
        assert label in page, label
    assert page.index("logistic (candidate)") < page.index("lightgbm_small (lightgbm)")  # tables list the candidate first

    # gate: judges the logistic model, compared with the LightGBM
    assert gate["candidate"] == "logistic"
    reasons = {rule["name"]: rule["reason"] for rule in gate["rules"]}
    assert reasons["discrimination"] == f"auroc_ci_low = {evaluation['logistic']['auroc_ci_low']} (must be >= 0.8)"
    assert "vs lightgbm" in reasons["non_inferior_to_baseline"]

    # registry: the candidate's files, registered by the explicit step, its report filed under its hash
    run(["healthml", "model", "register"], root)
    from healthml.governance.audit import AuditLog
    registered = [e["details"] for e in AuditLog(root/"audit/audit.jsonl").entries() if e["action"] == "register"][-1]
    assert registered["onnx_sha256"] == export["logistic"]["sha256"] and registered["gate"] == gate["verdict"]
    assert registered["report"] == f"reports/support2-mortality/{export['logistic']['sha256'][:12]}"
    index = (root/"reports/index.html").read_text()
    assert f"{evaluation['logistic']['auroc']:.3f} ({evaluation['logistic']['auroc_ci_low']:.3f}" in index
