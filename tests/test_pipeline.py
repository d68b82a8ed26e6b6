"""The whole pipeline, run for real with DVC on SUPPORT2 in a copy of the project."""
import json
import re
import sqlite3

import pandas as pd
import pytest
from conftest import ROOT, run

from healthml.governance.report import remote_references

STAGES = ["ingest", "validate", "deidentify", "split", "datacard", "train", "evaluate", "privacy", "export", "footprint",
          "report", "phi_scan", "gate"]


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_repro_runs_every_stage_in_order(pipeline_project):
    root, result = pipeline_project
    assert ran_stages(result.stdout) == STAGES


def test_lightgbm_test_auroc_on_support2_is_in_the_published_range(pipeline_project):
    root, _ = pipeline_project
    ev = json.loads((root/"metrics/evaluate.json").read_text())
    for model in ("lightgbm", "logistic"):
        m = ev[model]
        assert 0.84 <= m["auroc"] <= 0.91, (model, m["auroc"])
        assert m["auroc_ci_low"] < m["auroc"] < m["auroc_ci_high"]
        assert m["n"] == 1821 and m["events"] == 472
    assert ev["settings"]["bootstrap_unit"] == "patient"


def test_test_metrics_match_scikit_learn_on_the_written_scores(pipeline_project):
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
    root, _ = pipeline_project
    ev = json.loads((root/"metrics/evaluate.json").read_text())
    scores = pd.read_parquet(root/"data/processed/test_scores.parquet")
    assert list(scores.columns) == ["outcome", "lightgbm", "logistic", "compact"]  # no patient identifiers
    for model in ("lightgbm", "logistic"):
        assert abs(ev[model]["auroc"] - roc_auc_score(scores.outcome, scores[model])) < 1e-6
        assert abs(ev[model]["auprc"] - average_precision_score(scores.outcome, scores[model])) < 1e-6
        assert abs(ev[model]["brier"] - brier_score_loss(scores.outcome, scores[model])) < 1e-6


def test_splits_are_disjoint_by_patient_and_cover_the_cohort(pipeline_project):
    root, _ = pipeline_project
    ids = {s: set(pd.read_parquet(root/f"data/processed/{s}.parquet").sno) for s in ("train", "validation", "test")}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["validation"] and not ids["validation"] & ids["test"]
    assert len(ids["train"] | ids["validation"] | ids["test"]) == 9105


def test_support2_is_deidentified_with_surrogate_keys_and_ages_over_89_coded_90(pipeline_project):
    from healthml.data.cohort import read_cohort
    root, _ = pipeline_project
    raw = read_cohort(root/"data/raw/support2.csv")
    deid = pd.read_parquet(root/"data/deid/cohort.parquet")
    assert (raw.age > 89).sum() > 50 and deid.age.max() == 90 and ((deid.age == 90) == (raw.age > 89)).all()
    assert sorted(deid.sno) == list(range(1, 9106))            # a surrogate for every patient...
    assert (deid.sno.to_numpy() != raw.sno.to_numpy()).mean() > 0.99   # ...not the study number
    record = json.loads((root/"metrics/deidentify.json").read_text())
    assert {a["column"]: a["kind"] for a in record["actions"]} == {"sno": "patient key", "age": "age"}
    assert record["scan"]["passed"]


def test_dataset_card_has_flow_table_one_sample_size_and_a_clean_leakage_audit(pipeline_project):
    root, _ = pipeline_project
    card = json.loads((root/"datacard/dataset_card.json").read_text())
    flow = {f["step"]: f for f in card["flow"]}
    assert flow["rows in the source file"]["rows"] == flow["passed validation"]["rows"] == flow["de-identified"]["rows"] == 9105
    assert sum(flow[f"{s} split"]["patients"] for s in ("train", "validation", "test")) == 9105
    t1 = pd.DataFrame(card["table1_by_outcome"])
    death = "hospdead = 1"
    ages = t1[t1["characteristic"].str.startswith("age,")].iloc[0]
    assert float(ages[death].split()[0]) > float(ages["no event"].split()[0])  # those who died were older
    r = card["sample_size"]
    assert r["adequate"] is True and r["n_train"] == 5463 and r["n_required"] < 5463 and r["parameters"] > len(card["missingness_percent"]) - 1
    assert card["leakage"]["clean"] and max(card["leakage"]["single_feature_auroc"].values()) < 0.8
    assert card["leakage"]["patients_in_two_splits"] == {"train/validation": 0, "train/test": 0, "validation/test": 0}


def test_last_stage_scanned_every_output_and_mlflow_for_phi(pipeline_project):
    root, _ = pipeline_project
    scan = json.loads((root/"metrics/phi_scan.json").read_text())
    assert scan["passed"] and scan["mlflow_scanned"] and scan["files_scanned"] > 40
    assert scan["files_not_scanned"] == []


def test_leaking_columns_never_reach_the_models(pipeline_project):
    root, _ = pipeline_project
    ingest = json.loads((root/"data/interim/ingest.json").read_text())
    assert {"avtisst", "death", "slos", "d_time", "surv2m", "dnr"} <= set(ingest["excluded"])
    train = pd.read_parquet(root/"data/processed/train.parquet")
    assert not {"avtisst", "death", "slos", "charges"} & set(train.columns)


def test_onnx_models_match_native_models_on_test_patients(pipeline_project):
    from healthml.core.params import load_params
    from healthml.modelling.scoring import OnnxScorer
    from healthml.core.layout import Layout
    from healthml.modelling.train import load_trained, model_frame
    root, _ = pipeline_project
    spec = load_params(root/"params.yaml").dataset
    test = pd.read_parquet(root/"data/processed/test.parquet")
    for model in ("lightgbm", "logistic"):
        scorer = OnnxScorer(root/f"models/onnx/{model}.onnx")
        native = load_trained(Layout(root), model).predict_proba(model_frame(test, spec))[:, 1]
        assert abs(scorer.predict_proba(test) - native).max() < 1e-5
        assert scorer.metadata["model_name"] == f"support2-mortality-{model}"
    export = json.loads((root/"metrics/export.json").read_text())
    assert all(v["passed"] for v in export.values())


def test_onnx_export_is_byte_reproducible_across_processes(project_clone):
    # Report versions are named by the ONNX SHA-256, so the same model must give the same bytes in any
    # process (skl2onnx ordered opsets by string hash; PYTHONHASHSEED varies that per process).
    from conftest import project_env
    import subprocess
    root = project_clone
    digests = set()
    for seed in ("1", "3"):
        env = project_env() | {"PYTHONHASHSEED": seed}
        subprocess.run(["healthml", "export"], cwd=root, env=env, check=True, capture_output=True)
        from healthml.core.io import sha256_file
        digests.add(sha256_file(root/"models/onnx/lightgbm.onnx"))
    assert len(digests) == 1


def test_report_is_self_contained_html_filed_by_version(pipeline_project):
    from healthml.core.io import sha256_file
    root, _ = pipeline_project
    version = sha256_file(root/"models/onnx/lightgbm.onnx")[:12]
    out = root/"reports/support2-mortality"/version               # filed by `healthml model register` from report/
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (root/"report").iterdir())
    assert (out/"manifest.json").read_bytes() == (root/"report/manifest.json").read_bytes()
    page = (out/"validation.html").read_text()
    assert remote_references(page) == []
    for section in ("Data source", "Participant flow", "Predictors", "Discrimination", "Calibration", "Clinical utility",
                    "Subgroups and fairness", "Comparison on the same patients", "Robustness", "Deployment artefact",
                    "Promotion gate", "Gate verdict: PASS"):
        assert section in page, section
    assert page.count("data:image/png;base64") >= 4  # ROC, calibration, decision curve, subgroup forest plot
    assert "import " not in page  # no code cells
    manifest = json.loads((out/"manifest.json").read_text())
    assert manifest["outputs"]["validation.html"] == sha256_file(out/"validation.html")
    assert manifest["inputs"]["model_lightgbm_onnx"]["sha256"].startswith(version)
    index = (root/"reports/index.html").read_text()
    assert version in index and "<td>v1 candidate</td>" in index


def test_training_runs_are_in_the_embedded_mlflow_store(pipeline_project):
    root, _ = pipeline_project
    with sqlite3.connect(root/"mlflow.db") as db:
        runs = db.execute("select r.name, p.value from runs r join params p on p.run_uuid = r.run_uuid "
                          "where p.key = 'dataset'").fetchall()
        tags = dict(db.execute("select key, value from tags where key = 'git_commit'").fetchall())
    names = sorted(name for name, _ in runs)                        # model (or register-model) and a short hash
    assert [re.sub(r"-[0-9a-f]{8}$", "", n) for n in names] == ["compact", "lightgbm", "logistic", "register-lightgbm"], names
    assert all(value == "support2" for _, value in runs)
    assert len(tags["git_commit"]) >= 40


def test_dvc_metrics_and_plots_show_both_models(pipeline_project):
    root, _ = pipeline_project
    shown = run(["dvc", "metrics", "show", "--json"], root).stdout
    metrics = json.loads(shown)
    data = next(iter(metrics.values()))["data"]
    assert list(data) == ["metrics/summary.json"]               # one small file: `dvc exp show` stays readable
    summary = data["metrics/summary.json"]["data"]
    ev = json.loads((root/"metrics/evaluate.json").read_text())
    for model in ("lightgbm", "logistic"):
        assert summary[model]["auroc"] == ev[model]["auroc"] > 0.8
        assert summary[model]["observed_expected"] == ev[model]["observed_expected"]
    assert summary["gate"] == {"verdict": "PASS", "failed_rules": 0}
    plots = run(["dvc", "plots", "show", "--json"], root).stdout
    for title in ("ROC curve (test patients)", "Calibration (test patients, risk deciles)", "Decision curve (test patients)"):
        assert title in plots, title


def test_second_repro_has_nothing_to_do(pipeline_project):
    root, _ = pipeline_project
    again = run(["dvc", "repro"], root)
    assert ran_stages(again.stdout) == []
    assert "up to date" in again.stdout


def test_changing_a_lightgbm_hyperparameter_reruns_train_and_later_stages_only(pipeline_project, three_versions):
    # three_versions' second version is `dvc repro` after models.lightgbm.n_estimators 300 -> 120 on this project
    assert ran_stages(three_versions.v2_stdout) == ["train", "evaluate", "privacy", "export", "footprint", "report", "phi_scan", "gate"]
    before = json.loads((pipeline_project[0]/"metrics/evaluate.json").read_text())["lightgbm"]["auroc"]
    after = json.loads((three_versions.v2_outputs/"metrics/evaluate.json").read_text())["lightgbm"]["auroc"]
    assert after != before
    assert len(list((three_versions.v2_outputs/"reports/support2-mortality").iterdir())) == 2  # the first version is kept


def test_gate_passes_on_support2_with_every_rule_judged(pipeline_project):
    root, result = pipeline_project
    verdict = json.loads((root/"metrics/gate.json").read_text())
    assert verdict["passed"] and verdict["verdict"] == "PASS"
    status = {r["name"]: r["status"] for r in verdict["rules"]}
    assert status["non_inferior_to_champion"] == "not applicable"  # no champion in service yet
    assert all(s == "pass" for n, s in status.items() if n != "non_inferior_to_champion")
    assert "gate: PASS" in result.stderr


@pytest.mark.parametrize("name", ["export", "evaluate", "comparison", "subgroups", "robustness", "gate", "split", "validation", "summary"])
def test_a_fresh_run_reproduces_the_committed_model_and_metrics(pipeline_project, name):
    # The committed metrics/*.json are the reference: a change that moves a number (or an ONNX hash) must
    # come with the refreshed metrics in the same commit (`dvc repro` and commit metrics/ and dvc.lock).
    root, _ = pipeline_project
    assert json.loads((root/"metrics"/f"{name}.json").read_text()) == json.loads((ROOT/"metrics"/f"{name}.json").read_text())
