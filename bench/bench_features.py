"""Benchmark: the feature store on the synthetic EHR's event tables (issue 20).

1. Point-in-time join (`healthml features build`'s `historical_features`): ~1M events (vitals, labs, admissions,
   diagnoses) -> 100,000 training rows x the 16 declared features of examples/synthetic-events/params.yaml; time and peak
   memory of the process (the events are generated in another process first).
2. `materialize`: every patient's features as of one time into the SQLite online store.
3. Online lookup of one patient's 16 features (`OnlineStore.get_online_features`, 4 feature views), p50/p99 over 20,000
   random patients; and over HTTP on loopback (`healthml serve --feature-store`, one uvicorn worker): POST
   /v1/predict/patient (key + age and sex) against POST /v1/predict with the same record sent whole. Target: the lookup
   adds <= 2 ms to a prediction.

Writes bench/results/features.json. Run: .venv/bin/python bench/bench_features.py [--patients 16700 --rows 100000]
"""
import argparse
import hashlib
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from healthml.deploy.serve import free_port, wait_until_ready

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _rss_mb() -> float:
    return round(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024, 1)


def generate(root: Path, patients: int, rows: int) -> None:
    "The event tables and `rows` entity rows (admissions re-predicted at random times in their first day)."
    import pandas as pd
    from healthml.data.synthetic import synthetic_ehr, synthetic_events
    cohort, tables = synthetic_events(synthetic_ehr(patients, seed=21), seed=21)
    (root/"data/raw/events").mkdir(parents=True)
    for name, t in tables.items(): t.to_parquet(root/f"data/raw/events/{name}.parquet", index=False)
    rng = np.random.default_rng(0)
    pick = cohort.iloc[rng.integers(0, len(cohort), rows)].reset_index(drop=True)
    pick["admit_time"] = pick["admit_time"] + pd.to_timedelta(rng.uniform(0, 24, rows), unit="h")
    pick.to_parquet(root/"data/raw/synthetic_admissions.parquet", index=False)


def params(root: Path):
    import yaml
    from healthml.core.params import parse_params
    raw = yaml.safe_load((ROOT/"examples/synthetic-events/params.yaml").read_text())
    raw["feature_store"]["entity_rows"] = "data/raw/synthetic_admissions.parquet"
    return parse_params(raw)


def measure_join(root: Path) -> dict:
    "Read the events and join 100k rows in this process (its peak memory is the join's)."
    import pandas as pd
    from healthml.data.feature_store import historical_features, read_events
    p = params(root)
    spec = p.dataset
    t0 = time.perf_counter()
    events = {t: read_events(spec, t, root) for t in spec.events}
    read = time.perf_counter() - t0
    rows = pd.read_parquet(root/"data/raw/synthetic_admissions.parquet")
    t0 = time.perf_counter()
    built, late = historical_features(rows, spec, events)
    join = time.perf_counter() - t0
    return {"events": int(sum(map(len, events.values()))), "events_by_table": {t: len(e) for t, e in events.items()},
            "rows": len(built), "features": len(spec.declared), "seconds_read_events": round(read, 2),
            "seconds_join": round(join, 2), "late_events_left_out": int(sum(late.values())), "peak_rss_mb": _rss_mb()}




def _post(conn, path: str, body: bytes) -> float:
    t0 = time.perf_counter()
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    return time.perf_counter() - t0


def quantiles(x) -> dict:
    x = np.asarray(x) * 1000
    return {"p50_ms": round(float(np.median(x)), 3), "p99_ms": round(float(np.quantile(x, 0.99)), 3), "n": len(x)}


def measure_online(root: Path, lookups: int, requests: int) -> dict:
    import pandas as pd
    from healthml.data.feature_store import OnlineStore, build_training_set, historical_features, materialize, read_events
    from healthml.modelling.export import to_onnx
    from healthml.modelling.train import model_frame, model_pipeline, outcome
    p = params(root)
    spec = p.dataset
    as_of = pd.Timestamp("2024-01-01 12:00")
    t0 = time.perf_counter()
    views = materialize(p, as_of, root)
    mat = time.perf_counter() - t0
    store = OnlineStore(root/p.feature_store.online_store)
    keys = pd.read_parquet(root/"data/raw/events/vitals.parquet", columns=["mrn"]).mrn.unique()
    rng = np.random.default_rng(1)
    sample = rng.choice(keys, lookups)
    store.get_online_features(sample[0], spec.declared)              # the catalogue is read once
    lat = []
    for k in sample:
        t1 = time.perf_counter()
        store.get_online_features(k, spec.declared)
        lat.append(time.perf_counter() - t1)
    # HTTP: a model on these features, the service with the store; the same record through both routes
    build_training_set(p, root)
    train = pd.read_parquet(root/p.dataset.file)
    train = train.sample(min(20_000, len(train)), random_state=0)
    pipe = model_pipeline(spec, p.models["logistic"]).fit(model_frame(train, spec), outcome(train, spec))
    data = to_onnx(pipe, spec, {"model_name": "bench-features", "decision_threshold": 0.2}).SerializeToString()
    (root/"model.onnx").write_bytes(data)
    (root/"manifest.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
    pats = rng.choice(keys, 200)
    offline, _ = historical_features(pd.DataFrame({"mrn": pats, "admit_time": as_of}), spec,
                                     {t: read_events(spec, t, root) for t in spec.events})
    bodies = []
    for _, row in offline.iterrows():
        fields = {"age": 70.0, "sex": "female"}
        whole = fields | {n: float(row[n]) for n in spec.declared if row[n] == row[n]}
        bodies.append((json.dumps({"patient_id": row.mrn, "fields": fields}).encode(), json.dumps({"records": [whole]}).encode()))
    port = free_port()
    env = {k: v for k, v in os.environ.items()} | {"PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([str(Path(sys.executable).parent/"healthml"), "serve", "--model", str(root/"model.onnx"),
                               "--manifest", str(root/"manifest.json"), "--feature-store", str(root/p.feature_store.online_store),
                               "--insecure-local", "--port", str(port), "--log", str(root/"predictions.jsonl"),
                               "--params", str(ROOT/"examples/synthetic-events/params.yaml")],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until_ready(port, process=server), "the service did not become ready"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(100): _post(conn, "/v1/predict", bodies[i % 200][1]); _post(conn, "/v1/predict/patient", bodies[i % 200][0])
        raw, patient = [], []
        for i in range(requests):                                   # interleaved: both routes see the same machine load
            a, b = bodies[i % 200]
            patient.append(_post(conn, "/v1/predict/patient", a))
            raw.append(_post(conn, "/v1/predict", b))
        conn.close()
    finally:
        server.terminate(); server.wait(timeout=30)
    http_raw, http_patient = quantiles(raw), quantiles(patient)
    return {"materialize": {"seconds": round(mat, 2), "patients": max(v["patients"] for v in views), "views": len(views)},
            "lookup_in_process": quantiles(lat),
            "http": {"predict_raw_record": http_raw, "predict_patient_key": http_patient,
                     "added_p50_ms": round(http_patient["p50_ms"] - http_raw["p50_ms"], 3),
                     "added_p99_ms": round(http_patient["p99_ms"] - http_raw["p99_ms"], 3)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=16_700, help="~60 events each: 16,700 give ~1M events")
    ap.add_argument("--rows", type=int, default=100_000, help="training rows to join")
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--requests", type=int, default=2_000, help="HTTP requests per route")
    ap.add_argument("--out", type=Path, default=HERE/"results/features.json")
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--join", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate: return generate(a.generate, a.patients, a.rows)
    if a.join: return print(json.dumps(measure_join(a.join)))
    root = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(root), "--patients", str(a.patients), "--rows", str(a.rows)], check=True)
        gen = time.perf_counter() - t0
        join = json.loads(subprocess.run([sys.executable, __file__, "--join", str(root)], check=True, capture_output=True,
                                         text=True).stdout)
        online = measure_online(root, a.lookups, a.requests)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "seconds_generate": round(gen, 1),
              "point_in_time_join": join, **online,
              "targets": {"lookup_adds_ms": 2.0, "met": online["http"]["added_p50_ms"] <= 2.0}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
