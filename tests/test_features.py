"""Features from event data, end to end on a small synthetic cohort: the event tables written by `healthml synthetic
--events`, two models' training sets built by `healthml features build` from the same declared features, the pipeline's
own stages on them (the leakage audit checks every declared feature against the index time, and catches a planted
wrong join), both models trained, `healthml features list` naming both, and `healthml serve --feature-store` scoring a
patient key with exactly the values the training-set join gives for that patient and time."""
import hashlib
import http.client
import json
import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from conftest import BIN, ROOT, project_env, run
from healthml.core.errors import HealthmlError
from healthml.deploy.serve import free_port, wait_until_ready

MODELS = {"params.yaml": "synthetic-events-mortality", "readmission.yaml": "synthetic-events-readmission"}


@pytest.fixture(scope="module")
def events_project(tmp_path_factory):
    "800 synthetic patients with event tables, and both example models' training sets built from them (as a user would)."
    root = tmp_path_factory.mktemp("events")
    run(["healthml", "synthetic", "--patients", "800", "--seed", "3", "-o", "data/raw/synthetic_admissions.csv",
         "--events", "data/raw/events"], root)
    for f in MODELS:
        shutil.copy(ROOT/"examples/synthetic-events"/f, root/f)
        run(["healthml", "features", "build", "-p", f], root)
    return root


def stages(root, params_file: str, out: str, mutate=None):
    "ingest, validate, deidentify, split and train (no MLflow) in their own folder `out`; the parsed params."
    from healthml.core.layout import Layout
    from healthml.core.params import parse_params
    from healthml.data.cohort import ingest, validate
    from healthml.data.phi import deidentify
    from healthml.data.split import split_cohort
    from healthml.modelling.train import train_models
    raw = yaml.safe_load((root/params_file).read_text())
    raw["dataset"]["file"] = str(root/raw["dataset"]["file"])
    if mutate: raw["dataset"]["file"] = mutate(raw["dataset"]["file"])
    p, layout = parse_params(raw), Layout(root/out)
    ingest(p.dataset, layout); validate(p.dataset, layout, p.validation)
    deidentify(p.dataset, p.deidentify, layout); split_cohort(p.dataset, p.split, layout)
    return p, layout, (train_models(p, layout, track=False) if mutate is None else None)


def test_two_models_train_on_the_same_declared_features_and_the_audit_checks_each(events_project):
    root = events_project
    death, dl, dtrain = stages(root, "params.yaml", "mortality")
    readm, rl, rtrain = stages(root, "readmission.yaml", "readmission")
    shared = sorted(set(death.dataset.declared) & set(readm.dataset.declared))
    assert len(shared) == 14 and set(death.dataset.declared) - set(shared) == {"spo2_min_24h", "temperature_max_24h"}
    a = pd.read_parquet(root/"data/raw/synthetic_death_training.parquet")
    b = pd.read_parquet(root/"data/raw/synthetic_readmission_training.parquet")
    pd.testing.assert_frame_equal(a[shared], b[shared])                 # one definition, one value
    for p, layout in ((death, dl), (readm, rl)):
        audit = json.loads(layout.leakage.read_text())
        assert {f: audit["recorded_after_index"][f] for f in p.dataset.declared} == {f: 0 for f in p.dataset.declared}
    assert dtrain["lightgbm"]["validation_auroc"] > 0.75, dtrain         # each model learns its own outcome from them
    assert rtrain["lightgbm"]["validation_auroc"] > 0.6, rtrain          # (~190 validation stays each; seeded data)
    split = json.loads(rl.split_metrics.read_text())                    # deaths are never at risk of readmission
    assert sum(split[s]["rows"] for s in ("train", "validation", "test")) < len(b) - (b.in_hospital_death == 1).sum() + 1


def test_the_leakage_audit_catches_a_join_that_used_a_later_event(events_project, tmp_path):
    def later(share):         # as a join on the stay would: the lactate's time an hour after admission, in `share` of stays
        def mutate(path):
            df = pd.read_parquet(path)
            known = df.lactate_last_24h_at.notna() & (df.index % round(1 / share) == 0)
            df.loc[known, "lactate_last_24h_at"] = pd.to_datetime(df.loc[known, "admit_time"]) + pd.Timedelta(hours=1)
            df.to_parquet(tmp_path/f"joined_on_the_stay_{share}.parquet", index=False)
            return str(tmp_path/f"joined_on_the_stay_{share}.parquet")
        return mutate
    p, layout, _ = stages(events_project, "params.yaml", "mutated", later(0.5))
    audit = json.loads(layout.leakage.read_text())
    assert audit["recorded_after_index"]["lactate_last_24h"] > 100
    assert any(f.startswith("`lactate_last_24h`: ") and "recorded after the index time, set missing" in f for f in audit["flags"])
    train = pd.read_parquet(layout.split_file("train"))               # the late values never reach a model
    late = pd.to_numeric(train["lactate_last_24h_at"], errors="coerce") > 0
    assert late.sum() > 50 and train.loc[late, "lactate_last_24h"].isna().all()
    with pytest.raises(HealthmlError, match="feature `lactate_last_24h` has no value in the train split: its .* set missing"):
        stages(events_project, "params.yaml", "every_stay", later(1))  # every value late: the feature would be empty


def test_features_list_names_every_model_that_uses_a_feature(events_project):
    r = run(["healthml", "features", "list"], events_project)
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert rows["admissions_365d"].endswith("synthetic-events-mortality, synthetic-events-readmission")
    assert rows["spo2_min_24h"].endswith("synthetic-events-mortality")
    assert "16 feature(s) used by 2 model(s)" in r.stderr


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    out = (r.status, json.loads(r.read()))
    c.close()
    return out


def test_serve_scores_a_patient_key_with_the_training_values(events_project, tmp_path):
    from healthml.core.params import load_params
    from healthml.data.feature_store import historical_features, read_events
    from healthml.modelling.export import to_onnx
    from healthml.modelling.train import model_frame, model_pipeline, outcome
    root = events_project
    p = load_params(root/"params.yaml")
    spec, train = p.dataset, pd.read_parquet(root/"data/raw/synthetic_death_training.parquet")
    pipe = model_pipeline(spec, p.models["logistic"]).fit(model_frame(train, spec), outcome(train, spec))
    data = to_onnx(pipe, spec, {"model_name": "synthetic-events-mortality-logistic", "decision_threshold": 0.2}).SerializeToString()
    (tmp_path/"model.onnx").write_bytes(data)
    (tmp_path/"manifest.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
    as_of = pd.Timestamp("2024-01-01 12:00")
    run(["healthml", "features", "materialize", "--as-of", as_of.isoformat()], root)
    port = free_port()
    server = subprocess.Popen([str(BIN/"healthml"), "serve", "--model", str(tmp_path/"model.onnx"), "--manifest",
                               str(tmp_path/"manifest.json"), "--feature-store", "data/features/online.sqlite", "--insecure-local",
                               "--port", str(port), "--log", str(tmp_path/"predictions.jsonl")],
                              cwd=root, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until_ready(port, process=server), "the service did not become ready"
        patients = train.drop_duplicates("mrn").head(8)
        offline, _ = historical_features(pd.DataFrame({"mrn": patients.mrn, "admit_time": as_of}), spec,
                                         {t: read_events(spec, t, root) for t in spec.events})
        for (_, pt), (_, row) in zip(patients.iterrows(), offline.iterrows()):
            fields = {"age": float(pt.age), "sex": pt.sex}
            status, served = post(port, "/v1/predict/patient", {"patient_id": pt.mrn, "fields": fields})
            assert status == 200, served
            record = fields | {n: float(row[n]) for n in spec.declared if row[n] == row[n]}
            status, direct = post(port, "/v1/predict", {"records": [record]})
            assert served["predictions"] == direct["predictions"]
            assert sorted(served["features"]["stale"]) == sorted(spec.events)   # as of 2024: older than 24 h
        status, missing = post(port, "/v1/predict/patient", {"patient_id": "MRN00000001", "fields": {"age": 60.0}})
        assert status == 404 and "MRN" not in json.dumps(missing)
        log = (tmp_path/"predictions.jsonl").read_text()
        assert not any(mrn in log for mrn in patients.mrn)                  # the key is never logged
    finally:
        server.terminate()
        server.communicate(timeout=30)


def test_the_slim_scoring_install_reads_the_online_store_without_pandas(events_project, tmp_path):
    from test_slim_install import slim_python, slim_site
    run(["healthml", "features", "materialize", "--as-of", "2024-01-01T12:00"], events_project)
    code = ("import sys\nfrom healthml.deploy.feature_serving import FeatureLookup\nfrom healthml.data.feature_store import OnlineStore\n"
            "values, info = OnlineStore('data/features/online.sqlite').get_online_features('nobody', ['admissions_365d'])\n"
            "print(values, info['found'], sorted(m for m in ('pandas', 'sklearn', 'pandera', 'lightgbm') if m in sys.modules))")
    r = slim_python(slim_site(tmp_path/"site"), code, events_project)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "{'admissions_365d': 0.0} False []"
