"""Reasons with every score on the real pipeline's models: the explainer export wrote next to each ONNX graph reconciles
with the model's log-odds, is loaded only with the hash the audited ONNX file records, and names plausible reasons;
the slim service install explains the logistic model and says why it cannot explain the trees without lightgbm."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from test_slim_install import slim_python, slim_site

from healthml.core.layout import Layout
from healthml.core.params import load_params
from healthml.modelling.explain import explain, load_explainer, native_log_odds, reason_text
from healthml.modelling.scoring import ModelIntegrityError, OnnxScorer
from healthml.modelling.train import load_trained, model_frame

MODELS = ["lightgbm", "logistic"]


def audited(root, name):
    "The ONNX scorer of `name` and its explainer, verified by the hash the ONNX metadata records."
    scorer = OnnxScorer(root/"models/onnx"/f"{name}.onnx")
    meta = scorer.metadata
    return scorer, load_explainer(root/"models/onnx"/meta["explainer_file"], meta["explainer_sha256"])


@pytest.mark.parametrize("name", MODELS)
def test_reasons_reconcile_with_the_models_log_odds_on_the_test_split(pipeline_project, name):
    root, _ = pipeline_project
    params = load_params(root/"params.yaml")
    test = pd.read_parquet(root/"data/processed/test.parquet")
    frame = model_frame(test, params.dataset)
    scorer, explainer = audited(root, name)
    base, contributions = explainer.contributions(frame)
    log_odds = base + contributions.sum(axis=1)
    native = native_log_odds(load_trained(Layout(root), name), frame)
    assert np.abs(log_odds - native).max() <= 1e-6
    risk = scorer.predict_proba(test)
    assert np.abs(1 / (1 + np.exp(-log_odds)) - risk).max() <= params.export.parity_tolerance
    record = json.loads((root/"metrics/export.json").read_text())[name]["explainer"]
    assert record["sha256"] == scorer.metadata["explainer_sha256"] and record["passed"] and record["rows"] == len(test)
    assert {i["feature"] for i in record["global_importance"]} == set(params.dataset.features)


def test_a_tampered_explainer_is_refused(pipeline_project, tmp_path):
    root, _ = pipeline_project
    meta = OnnxScorer(root/"models/onnx/logistic.onnx").metadata
    copy = tmp_path/meta["explainer_file"]
    shutil.copy(root/"models/onnx"/meta["explainer_file"], copy)
    art = json.loads(copy.read_text())
    art["coef"][0] += 0.5                                                    # a quiet change to one coefficient
    copy.write_text(json.dumps(art, sort_keys=True, separators=(",", ":")))
    with pytest.raises(ModelIntegrityError, match="refusing to load it"):
        load_explainer(copy, meta["explainer_sha256"])


@pytest.mark.parametrize("name", MODELS)
def test_the_highest_risk_patients_reasons_are_severity_scores(pipeline_project, name):
    root, _ = pipeline_project
    test = pd.read_parquet(root/"data/processed/test.parquet")
    scorer, explainer = audited(root, name)
    features = list(scorer.schema)
    top = test.iloc[np.argsort(-scorer.predict_proba(test))[:5]]
    records = [{f: (None if pd.isna(v) else v) for f, v in r.items()} for r in top[features].to_dict("records")]
    for reasons in explain(explainer, records, top_k=3):                    # the call the service makes
        assert len(reasons) == 3
        assert {r["feature"] for r in reasons} & {"aps", "sps", "scoma", "age", "dzgroup"}, [reason_text(r) for r in reasons]
        assert reasons[0]["contribution"] > 0 and reasons[0]["value_direction"] in ("high", "missing")


def test_the_slim_install_explains_the_logistic_model_and_says_why_not_the_trees(pipeline_project, tmp_path):
    root, _ = pipeline_project
    site = slim_site(tmp_path/"site")
    code = ("import json\nfrom healthml.modelling.explain import load_explainer, explain, ExplainerError\n"
            "from healthml.modelling.scoring import OnnxScorer\n"
            "for name in ['logistic', 'lightgbm']:\n"
            "    meta = OnnxScorer(f'models/onnx/{name}.onnx').metadata\n"
            "    try: ex = load_explainer('models/onnx/' + meta['explainer_file'], meta['explainer_sha256'])\n"
            "    except ExplainerError as e: print(name, 'unavailable:', e, e.hint); continue\n"
            "    print(name, json.dumps(explain(ex, [{'age': 80, 'aps': 90, 'sps': 40}], top_k=2)))\n")
    r = slim_python(site, code, root)
    assert r.returncode == 0, r.stderr
    logistic, trees = r.stdout.strip().split("\n")
    assert logistic.startswith("logistic [[{")
    assert trees.startswith("lightgbm unavailable:") and "healthml[explain]" in trees


def test_export_refuses_an_explainer_that_disagrees_with_the_model(project_clone, monkeypatch):
    import healthml.modelling.export as export
    from healthml.core.layout import Layout
    from healthml.modelling.explain import build_explainer
    from healthml.modelling.export import ParityError, export_models

    def off_by_a_little(pipeline, *args, **kwargs):                          # a logistic explainer one coefficient off
        artifact = build_explainer(pipeline, *args, **kwargs)
        if artifact["kind"] == "linear": artifact["coef"][0] += 1e-3
        return artifact
    monkeypatch.setattr(export, "build_explainer", off_by_a_little)
    layout = Layout(project_clone)
    for f in ("logistic.onnx", "logistic.explain.json"): (layout.onnx_models/f).unlink()
    with pytest.raises(ParityError, match="logistic: the explainer's log-odds differ"):
        export_models(load_params(project_clone/"params.yaml"), layout, "test")
    assert not (layout.onnx_models/"logistic.onnx").exists() and not (layout.onnx_models/"logistic.explain.json").exists()
    record = json.loads(layout.export_metrics.read_text())["logistic"]
    assert record["passed"] and not record["explainer"]["passed"]            # the ONNX graph agreed; its explainer did not


def test_batch_scoring_writes_the_same_reasons_as_text_columns(pipeline_project, tmp_path):
    from conftest import run
    root, _ = pipeline_project
    test = pd.read_parquet(root/"data/processed/test.parquet").head(300)
    test.to_parquet(tmp_path/"in.parquet")
    run(["healthml", "predict", str(tmp_path/"in.parquet"), "-o", str(tmp_path/"out.csv"), "--reasons", "2"], root)
    out = pd.read_csv(tmp_path/"out.csv", keep_default_na=False)
    assert [c for c in out.columns if c.startswith("reason_")] == ["reason_1", "reason_2"]
    _, explainer = audited(root, "lightgbm")
    params = load_params(root/"params.yaml")
    expected = explain(explainer, model_frame(test, params.dataset), 2)
    abstained = out.abstained.astype(str) == "True"
    assert (~abstained).sum() > 290
    for i in np.flatnonzero(~abstained.to_numpy()):
        assert [out.reason_1[i], out.reason_2[i]] == [reason_text(r) for r in expected[i]]
    assert (out.loc[abstained, "reason_1"] == "").all()
