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


def _wait_for(path: Path, procs: list, logs: Path, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
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
        for p in reversed(procs): p.terminate()
        for p in procs:
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
