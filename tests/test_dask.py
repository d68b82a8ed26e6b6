"""Scale out on a real Dask cluster: a scheduler and two worker processes started here (loopback only), training with
`compute.engine: dask` through `healthml train`, and `healthml predict` on a partitioned input with `--scheduler`."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import project_env, run

pytest.importorskip("distributed")


def _complete_json(path: Path) -> bool:
    "Whether `path` holds a whole JSON document (the scheduler creates its file before it writes it)."
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError): return False


def _wait_for(path: Path, procs: list, logs: Path, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while not _complete_json(path):
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a Dask process exited early:\n" + "\n".join(f.read_text() for f in logs.glob("*.log")))
        if time.monotonic() > end: raise AssertionError(f"no {path.name} after {seconds} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """`dask scheduler` on 127.0.0.1 (a free port) and two `dask worker` processes (1 thread, 1 GiB each), the way a
    site starts them on its machines; stopped (and waited for) afterwards."""
    from distributed import Client
    d = tmp_path_factory.mktemp("dask")
    info, env, procs = d/"scheduler.json", project_env(), []
    logs = []
    def start(*cmd):
        logs.append(open(d/f"process-{len(logs)}.log", "w"))   # the processes' logs (LightGBM's network lines included)
        procs.append(subprocess.Popen([*cmd], cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=logs[-1]))
    try:
        start("dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(info))
        _wait_for(info, procs, d)
        address = json.loads(info.read_text())["address"]
        for i in range(2):
            start("dask", "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--memory-limit", "1GiB",
                  "--no-nanny", "--no-dashboard", "--local-directory", str(d/f"worker-{i}"))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            hosts = {w["host"] for w in client.scheduler_info()["workers"].values()}
        assert address.startswith("tcp://127.0.0.1:") and hosts == {"127.0.0.1"}   # loopback only
        yield address
    finally:
        for p in reversed(procs):   # one at a time, workers before the scheduler: a worker stopping while the scheduler
            p.terminate()           # closes could hang on its connections to the other worker (20 s, then killed)
            try: p.wait(timeout=20)
            except subprocess.TimeoutExpired: p.kill(); p.wait()
        for f in logs: f.close()


def _auroc(root: Path, model: str, test: pd.DataFrame) -> float:
    from sklearn.metrics import roc_auc_score
    from healthml.core.layout import Layout
    from healthml.core.params import load_params
    from healthml.modelling.train import load_trained, model_frame, outcome
    spec = load_params(root/"params.yaml").dataset
    return roc_auc_score(outcome(test, spec), load_trained(Layout(root), model).predict_proba(model_frame(test, spec))[:, 1])


def test_train_on_dask_matches_local(pipeline_project, dask_cluster, tmp_path):
    """`healthml train` with `compute.engine: dask` against the cluster: LightGBM trained by the two workers
    (lightgbm.dask), saved as the same kind of pipeline; its test AUROC within 0.01 of the local model's on the same
    patients, and it exports to ONNX within the parity tolerance."""
    from healthml.core.layout import Layout
    from healthml.core.params import load_params
    from healthml.modelling.export import to_onnx
    from healthml.modelling.scoring import OnnxScorer
    from healthml.modelling.train import load_trained, model_frame
    src = pipeline_project[0]
    root = tmp_path/"project"
    (root/"data").mkdir(parents=True)
    shutil.copytree(src/"data"/"processed", root/"data"/"processed")       # the pipeline's own splits (de-identified)
    params = yaml.safe_load((src/"params.yaml").read_text())
    params["compute"] = {"engine": "dask", "scheduler": dask_cluster, "partition_rows": 1000}   # ~6 partitions over 2 workers
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["healthml", "train"], root, timeout=300)
    record = json.loads((root/"metrics/train.json").read_text())
    candidate = load_params(root/"params.yaml").candidate
    assert (record[candidate]["engine"], record[candidate]["dask_workers"]) == ("dask", 2)
    assert all(record[m]["engine"] == "local" for m in params["models"] if params["models"][m]["kind"] != "lightgbm")
    assert (root/"mlflow.db").exists()                                      # logged as before

    test = pd.read_parquet(src/"data/processed/test.parquet")
    local, dask = _auroc(src, candidate, test), _auroc(root, candidate, test)
    assert abs(dask - local) <= 0.01, (dask, local)
    assert json.loads((src/"metrics/train.json").read_text())[candidate].get("engine", "local") == "local"

    pipe = load_trained(Layout(root), candidate)
    assert [type(s).__name__ for _, s in pipe.steps] == ["ColumnTransformer", "LGBMClassifier"]
    spec = load_params(root/"params.yaml").dataset
    X = model_frame(test, spec)
    onnx = OnnxScorer(to_onnx(pipe, spec, {"model_name": candidate}).SerializeToString()).predict_proba(X)
    assert np.abs(onnx - pipe.predict_proba(X)[:, 1]).max() < params["export"]["parity_tolerance"]


def test_predict_on_dask_equals_local(pipeline_project, dask_cluster, tmp_path):
    """`healthml predict` on a partitioned copy of the test split with `--scheduler`: every row's risk equals the
    local scoring to 1e-6, with the same columns, decisions, abstentions and rejects."""
    root = pipeline_project[0]
    test = pd.read_parquet(root/"data/processed/test.parquet")
    parts = tmp_path/"extract"
    for i, chunk in enumerate(np.array_split(np.arange(len(test)), 3)):   # three files, a Hive-style folder, small row groups
        (parts/f"site={i}").mkdir(parents=True)
        test.iloc[chunk].to_parquet(parts/f"site={i}"/"part.parquet", row_group_size=250)
    whole = tmp_path/"test.parquet"
    test.to_parquet(whole)

    local = run(["healthml", "predict", str(whole), "-o", str(tmp_path/"local.parquet")], root)
    on_dask = run(["healthml", "predict", str(parts), "-o", str(tmp_path/"dask.parquet"), "--scheduler", dask_cluster,
                   "--chunk-rows", "200"], root)
    assert "on 2 Dask worker(s) (3 file(s)" in on_dask.stderr + on_dask.stdout, on_dask.stderr

    a, b = pd.read_parquet(tmp_path/"local.parquet"), pd.read_parquet(tmp_path/"dask.parquet")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == len(test) - (0 if not (tmp_path/"local.rejects.parquet").exists()
                                                                                  else len(pd.read_parquet(tmp_path/"local.rejects.parquet")))
    assert (a.source_row.to_numpy() == b.source_row.to_numpy()).all()
    assert np.nanmax(np.abs(a.risk.to_numpy() - b.risk.to_numpy()), initial=0) <= 1e-6
    assert (a.risk.isna() == b.risk.isna()).all() and np.abs(a.raw_risk - b.raw_risk).max() <= 1e-6
    pd.testing.assert_frame_equal(a.drop(columns=["risk", "raw_risk"]), b.drop(columns=["risk", "raw_risk"]))
    assert a.model_version.nunique() == 1 and a.alert.any()


DEID_KEY = "custodian-held-deid-key-7f3a9c"   # the test's de-identification key: must appear in no output and no log


def _ehr_project(root: Path, engine: dict) -> tuple[Path, pd.DataFrame]:
    """The synthetic-EHR spec (encounter level) with quarantine and keyed surrogates, and an ingested cohort of ~3,500
    encounters in random order, written in row groups of 1,000 (four partitions): most patients' encounters lie in
    several partitions. Rows that fail (an impossible age, a missing outcome, an encounter key repeated in a later
    partition) and PHI canaries (names that are common words, an SSN glued into a category) are planted."""
    from healthml.core.io import SOURCE_ROW
    from healthml.data.synthetic import synthetic_ehr
    params = yaml.safe_load((Path(__file__).parent.parent/"examples/synthetic-ehr/params.yaml").read_text())
    params["dataset"]["features"]["unit"] = {"kind": "categorical"}
    params["validation"] = {"on_failure": "quarantine", "max_quarantine_fraction": 0.05, "max_missing_fraction": 0.5}
    params["deidentify"]["surrogate"] = "keyed"
    params["compute"] = engine
    ehr = synthetic_ehr(1400, seed=3).sample(frac=1, random_state=0).reset_index(drop=True)
    ehr["unit"] = np.where(ehr.index % 2 == 0, "ICU", "Ward")
    step = ehr.drop_duplicates("mrn").mrn
    ehr.loc[ehr.mrn.isin(step.iloc[:12]), "unit"] = "step-down"                # 12 patients overall, under 10 in every partition
    ehr.loc[5, "unit"] = f"ref-ann-lee-{ehr.loc[5, 'ssn']}"                    # an identifier glued to text: one patient, pooled
    ehr.loc[ehr.mrn.isin(step.iloc[20:22]), "name"] = ["Will Black", "Mark Three"][0]
    ehr.loc[100, "age"] = 300.0                                               # out of range: quarantined
    ehr.loc[1500, "in_hospital_death"] = None                                 # outcome missing: quarantined
    ehr.loc[3200, "encounter_id"] = ehr.loc[10, "encounter_id"]               # the same encounter in partitions 1 and 4
    cohort = ehr.assign(**{SOURCE_ROW: np.arange(1, len(ehr) + 1)})
    (root/"data/interim").mkdir(parents=True)
    cohort[[SOURCE_ROW, *[c for c in ehr.columns]]].to_parquet(root/"data/interim/cohort.parquet", row_group_size=1000)
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root, ehr


def test_validate_and_deidentify_per_partition_on_dask_equal_the_local_keyed_run(dask_cluster, tmp_path, monkeypatch,
                                                                                  tmp_path_factory):
    """`healthml validate` and `healthml deidentify` with `compute.engine: dask`: each worker checks and de-identifies
    its partitions. The counts (rows, quarantined, every rule's failures and example rows, every de-identification
    action) equal one process's with the same key; the de-identified rows equal the local keyed run's up to row order;
    a patient whose encounters lie in several partitions has one surrogate; rare levels are counted over the whole
    cohort; no key material and no PHI canary reaches an output or a log."""
    from healthml.core.layout import Layout
    from healthml.core.params import load_params
    from healthml.core.secrets import Secret
    from healthml.data.cohort import validate
    from healthml.data.phi import deidentify, keyed_surrogates
    monkeypatch.setenv("HEALTHML_DEID_KEY", DEID_KEY)
    local, ehr = _ehr_project(tmp_path/"local", {"engine": "local"})
    p = load_params(local/"params.yaml")
    validate(p.dataset, Layout(local), p.validation, p.compute)
    deidentify(p.dataset, p.deidentify, Layout(local), p.compute)

    root, _ = _ehr_project(tmp_path/"dask", {"engine": "dask", "scheduler": dask_cluster, "partition_rows": 1000})
    said = [run(["healthml", c], root, timeout=120) for c in ("validate", "deidentify")]
    record = json.loads((root/"metrics/deidentify.json").read_text())
    assert record["engine"] == "dask" and record["partitions"] >= 2          # the validated parts' row groups (999 + 1,000 ... rows)

    drop = lambda r: {k: v for k, v in r.items() if k not in ("engine", "partitions")}
    a, b = (json.loads((d/"metrics/validation.json").read_text()) for d in (local, root))
    assert (b["engine"], b["partitions"]) == ("dask", 4) and drop(b) == a and a["rows_quarantined"] == 3 and a["rows_kept"] == len(ehr) - 3
    assert {(c["column"], c["rule"]): c["failed"] for c in a["checks"] if c["failed"]} == {
        ("encounter_id", "unique (one row per encounter)"): 1, ("in_hospital_death", "not missing"): 1, ("age", "<= 120 years"): 1}
    assert drop(record) == json.loads((local/"metrics/deidentify.json").read_text())
    pooled = [x for x in record["actions"] if x["kind"] == "rare category"]
    assert [x["action"].split(" level")[0] for x in pooled] == ["1"]          # the glued SSN's level only; step-down (12 patients) kept
    pd.testing.assert_frame_equal(pd.read_parquet(root/"data/interim/quarantine.parquet"),
                                  pd.read_parquet(local/"data/interim/quarantine.parquet"))

    deid, ref = (pd.read_parquet(d/"data/deid/cohort.parquet") for d in (root, local))
    assert set(deid.unit) == {"ICU", "Ward", "step-down", "(other)"}
    by = ["encounter_id", "mrn"]
    pd.testing.assert_frame_equal(deid.sort_values(by).reset_index(drop=True), ref.sort_values(by).reset_index(drop=True))
    kept = pd.read_parquet(root/"data/interim/validated.parquet")               # the rows kept, in file order (as deid's)
    part = (kept.source_row.to_numpy() - 1) // 1000
    spans = pd.DataFrame({"mrn": kept.mrn, "part": part}).groupby("mrn").part.nunique()
    assert (spans > 1).sum() > 300                                            # hundreds of patients span partitions
    per_patient = pd.DataFrame({"raw": kept.mrn.to_numpy(), "surrogate": deid.mrn.to_numpy()}).groupby("raw").surrogate.nunique()
    assert per_patient.max() == 1 and deid.mrn.nunique() == kept.mrn.nunique()
    assert (deid.mrn.to_numpy() == keyed_surrogates(kept.mrn, Secret(DEID_KEY.encode())).to_numpy()).all()
    rank = pd.DataFrame({"t": kept.admit_time, "rank": deid.index_rank}).groupby("t")["rank"].nunique()
    assert rank.max() == 1                                                    # one index time, one rank, in any partition

    logs = [f.read_text() for f in tmp_path_factory.getbasetemp().glob("dask*/process-*.log")]
    outputs = [f.read_bytes() for d in (root, local) for f in d.rglob("*") if f.is_file() and f.name != "params.yaml"]
    said = [s.stdout + s.stderr for s in said]
    assert logs and not any(DEID_KEY in t for t in logs + said) and not any(DEID_KEY.encode() in o for o in outputs)
    public = [f.read_bytes() for d in (root, local) for f in [*(d/"data/deid").rglob("*"), *(d/"metrics").rglob("*")] if f.is_file()]
    for canary in ["ref-ann-lee", ehr.loc[5, "ssn"], "Will Black", ehr.loc[0, "mrn"], ehr.loc[0, "encounter_id"]]:
        assert not any(canary.encode() in o for o in public), canary


def test_dask_deidentification_refuses_random_surrogates_and_a_missing_key(dask_cluster, tmp_path, monkeypatch):
    """Per-partition de-identification needs keyed surrogates, and keyed surrogates need the key: each is one line
    naming the fix, before any worker sees a row."""
    monkeypatch.delenv("HEALTHML_DEID_KEY", raising=False)
    monkeypatch.setenv("HEALTHML_DEID_KEY_FILE", str(tmp_path/"absent.key"))
    root, _ = _ehr_project(tmp_path/"p", {"engine": "dask", "scheduler": dask_cluster, "partition_rows": 1000})
    run(["healthml", "validate"], root, timeout=120)
    r = run(["healthml", "deidentify"], root, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr + r.stdout
    assert "HEALTHML_DEID_KEY" in r.stdout + r.stderr and "absent.key" in r.stdout + r.stderr
    params = yaml.safe_load((root/"params.yaml").read_text())
    params["deidentify"]["surrogate"] = "random"
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = run(["healthml", "deidentify"], root, check=False)
    assert r.returncode != 0 and "deidentify.surrogate: keyed" in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (root/"data/deid/cohort.parquet").exists()


def _deidentified_project(root: Path, split: dict, engine: dict) -> Path:
    """The synthetic-EHR spec and a de-identified cohort (~3,500 encounters in random order, 1,400 patients) written in
    row groups of 1,000, as a cluster's `healthml deidentify` leaves it: four partitions, most patients in several."""
    from healthml.core.io import SOURCE_ROW
    from healthml.core.params import parse_params
    from healthml.data.cohort import select_cohort
    from healthml.data.phi import deidentify_cohort
    from healthml.data.synthetic import synthetic_ehr
    params = yaml.safe_load((Path(__file__).parent.parent/"examples/synthetic-ehr/params.yaml").read_text())
    params["split"] |= split
    params["compute"] = engine
    parsed = parse_params(params)
    ehr = synthetic_ehr(1400, seed=3).sample(frac=1, random_state=0).reset_index(drop=True)
    cohort, _ = select_cohort(ehr.assign(**{SOURCE_ROW: np.arange(1, len(ehr) + 1)}), parsed.dataset)
    deid, _ = deidentify_cohort(cohort, parsed.dataset, parsed.deidentify)
    (root/"data/deid").mkdir(parents=True)
    deid.to_parquet(root/"data/deid/cohort.parquet", index=False, row_group_size=1000)
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.parametrize("split", [{"method": "temporal"}, {"method": "random"}, {"method": "site", "test_site": "west"}])
def test_patient_split_on_dask_equals_the_local_split(dask_cluster, tmp_path, split):
    """`healthml split` with `compute.engine: dask`: per-patient facts gathered from four partitions, the assignment made
    on the client by the local rule, each worker writing its rows. The split files hold the same patients and the same
    rows (in the same order) as one process writes, and the participant flow (metrics/split.json) and the leakage audit
    are exact, on an encounter-level cohort whose patients span partitions (temporal: rows cut at the period starts)."""
    from healthml.core.layout import Layout
    from healthml.core.params import load_params
    from healthml.data.split import SPLITS, split_cohort
    local = _deidentified_project(tmp_path/"local", split, {"engine": "local"})
    p = load_params(local/"params.yaml")
    a = split_cohort(p.dataset, p.split, Layout(local))
    root = _deidentified_project(tmp_path/"dask", split, {"engine": "dask", "scheduler": dask_cluster, "partition_rows": 1000})
    if split["method"] == "temporal": run(["healthml", "split"], root, timeout=120)   # the stage as DVC runs it
    else:
        q = load_params(root/"params.yaml")
        split_cohort(q.dataset, q.split, Layout(root), q.compute)
    summary, ref = (json.loads((d/"metrics/split.json").read_text()) for d in (root, local))
    assert (summary.pop("engine"), summary.pop("partitions")) == ("dask", 4) and summary == ref
    assert json.loads((root/"metrics/leakage.json").read_text()) == json.loads((local/"metrics/leakage.json").read_text())
    for s in SPLITS:
        got, want = (pd.read_parquet(d/f"data/processed/{s}.parquet") for d in (root, local))
        pd.testing.assert_frame_equal(got, want)
        assert set(got.mrn) == set(want.mrn) and len(got) == ref[s]["rows"] > 0
    deid = pd.read_parquet(root/"data/deid/cohort.parquet")
    spans = pd.Series(np.arange(len(deid)) // 1000).groupby(deid.mrn.to_numpy()).nunique()
    assert (spans > 1).sum() > 300                                             # patients whose rows several workers split
    if split["method"] == "temporal":
        assert 0 < a["rows_dropped_at_time_boundaries"] == summary["rows_dropped_at_time_boundaries"]
        assert sum(ref[s]["rows"] for s in SPLITS) + summary["rows_dropped_at_time_boundaries"] == len(deid)
    if split["method"] == "site":
        assert ref["test"]["sites"] == ["west"] and "west" not in ref["train"]["sites"]
    assert not any(f.name.endswith(".parts") for f in (root/"data/processed").iterdir())   # the workers' parts, removed
