"""Benchmarks of production inference, side by side in one process on the same data and model.

Peak memory is the child process's VmHWM (ru_maxrss would carry the parent's high-water mark across exec).

1. Single-record latency (p50/p99 over 3,000 calls): healthml's `RecordScorer` (a dict in: field checks,
   encoding and onnxruntime) vs scikit-learn `predict_proba` on a one-row DataFrame vs LightGBM's raw
   `Booster.predict` on a ready numpy row.
2. Batch scoring of 1M rows from Parquet (`healthml predict` in a child process): rows/s and peak memory.
3. HTTP over loopback against `healthml serve` (uvicorn, one worker): p50/p99 and requests/s at 1 and 8
   concurrent keep-alive clients (bounded loops), and p99 at a paced 200 requests/s.

Targets (issue 6, 2 cores): RecordScorer >= 20x faster than predict_proba and within 2x of Booster.predict;
1M-row batch under 1 GB peak; HTTP p99 under 10 ms at 200 requests/s.
Writes bench/results/serve.json.  Run: .venv/bin/python bench/bench_serve.py
"""
import argparse
import hashlib
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def percentiles(xs_ms):
    a = np.asarray(xs_ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4)}


def build_model(tmp: Path):
    "LightGBM pipeline trained on a synthetic extract (example project's spec), exported to ONNX."
    from healthml.data.cohort import clean_cohort, select_cohort
    from healthml.core.params import parse_params
    from healthml.modelling.export import to_onnx
    from healthml.data.synthetic import synthetic_ehr
    from healthml.modelling.train import model_frame, model_pipelines, outcome
    params = parse_params(yaml.safe_load((ROOT/"examples/synthetic-ehr/params.yaml").read_text()))
    spec = params.dataset
    df = clean_cohort(select_cohort(synthetic_ehr(8000, seed=3).assign(source_row=0), spec)[0], spec)
    pipe = model_pipelines(params)["lightgbm"].fit(model_frame(df, spec), outcome(df, spec))
    data = to_onnx(pipe, spec, {"model_name": "bench-lightgbm", "decision_threshold": 0.2}).SerializeToString()
    (tmp/"model.onnx").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    (tmp/"manifest.json").write_text(json.dumps({"sha256": sha}))
    return params, spec, df, pipe, sha


def single_record(spec, df, pipe, tmp, sha, n=3000):
    from healthml.deploy.serve import RecordScorer
    from healthml.modelling.train import model_frame
    scorer = RecordScorer.from_file(tmp/"model.onnx", sha)
    rows = model_frame(df.head(n), spec)
    records = [{k: (None if (isinstance(v, float) and np.isnan(v)) or v is None else v) for k, v in r.items()}
               for r in rows.to_dict("records")]
    records = [{k: v for k, v in r.items() if v is not None} for r in records]
    one_row_frames = [rows.iloc[[i]] for i in range(n)]
    booster = pipe.steps[-1][1].booster_
    encoded = pipe[:-1].transform(rows).astype(np.float64)
    ready = [encoded[[i]] for i in range(n)]

    def timed(fn, items):
        out = []
        for x in items[:50]: fn(x)                    # warm-up
        for x in items:
            t0 = time.perf_counter(); fn(x); out.append((time.perf_counter() - t0) * 1000)
        return out
    t_ort = timed(scorer.score_one, records)
    t_skl = timed(lambda f: pipe.predict_proba(f), one_row_frames[:1000])
    t_raw = timed(lambda a: booster.predict(a), ready)
    # same answers, three ways
    p_ort = np.array([scorer.score_one(r) for r in records[:200]])
    p_raw = np.concatenate([booster.predict(a) for a in ready[:200]])
    p_skl = pipe.predict_proba(rows.head(200))[:, 1]
    r = {"healthml_record_scorer": percentiles(t_ort), "sklearn_predict_proba_one_row_dataframe": percentiles(t_skl),
         "lightgbm_booster_predict_numpy_row": percentiles(t_raw),
         "max_abs_diff_vs_sklearn": float(np.abs(p_ort - p_skl).max()), "max_abs_diff_raw_vs_sklearn": float(np.abs(p_raw - p_skl).max())}
    r["speedup_vs_predict_proba_p50"] = round(r["sklearn_predict_proba_one_row_dataframe"]["p50_ms"] / r["healthml_record_scorer"]["p50_ms"], 1)
    r["ratio_to_booster_p50"] = round(r["healthml_record_scorer"]["p50_ms"] / r["lightgbm_booster_predict_numpy_row"]["p50_ms"], 2)
    r["met"] = r["speedup_vs_predict_proba_p50"] >= 20 and r["ratio_to_booster_p50"] <= 2
    return r, records


def batch(tmp, sha, patients):
    from healthml.data.synthetic import synthetic_ehr
    src = tmp/"batch.parquet"
    synthetic_ehr(patients, seed=5).to_parquet(src, index=False, row_group_size=100_000)
    code = ("import sys, time, json\nfrom healthml.deploy.serve import RecordScorer, predict_file\n"
            f"s = RecordScorer.from_file({str(tmp/'model.onnx')!r}, {sha!r})\nt0 = time.perf_counter()\n"
            f"r = predict_file(s, {str(src)!r}, {str(tmp/'scores.parquet')!r}, keep=['encounter_id'], chunk_rows=100_000)\n"
            "r['seconds'] = time.perf_counter() - t0\n"
            "r['peak_rss_mb'] = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024\n"
            "print(json.dumps(r))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    return {"rows": out["rows"], "scored": out["scored"], "rejected": out["rejected"], "seconds": round(out["seconds"], 2),
            "rows_per_second": round(out["rows"] / out["seconds"]), "peak_rss_mb": round(out["peak_rss_mb"], 1),
            "chunk_rows": 100_000, "met": out["peak_rss_mb"] < 1024}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def wait_ready(port: int, tries: int = 200, timeout: float = 1) -> None:
    "Poll GET /readyz on loopback until the service answers 200 (or the tries run out)."
    for _ in range(tries):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout); c.request("GET", "/readyz")
            if c.getresponse().status == 200: return
        except OSError: time.sleep(0.1)


def http_load(port, records, clients, per_client, rate=None):
    "Each client: its own keep-alive connection, `per_client` requests (paced to `rate` total req/s if given)."
    lat, errors, lock = [], [], threading.Lock()
    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine, gap = [], (clients / rate) if rate else 0
        t_next = start + k / rate if rate else 0   # clients staggered: arrivals evenly spaced, not in bursts
        for i in range(per_client):
            body = json.dumps({"records": [records[(k * per_client + i) % len(records)]]})
            if gap:
                time.sleep(max(0.0, t_next - time.perf_counter()))
                t_next += gap
            t0 = time.perf_counter()
            conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
            resp = conn.getresponse(); resp.read()
            mine.append((time.perf_counter() - t0) * 1000)
            if resp.status != 200: errors.append(resp.status)
        conn.close()
        with lock: lat.extend(mine)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter() + 0.05
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat), "non_200": len(errors), **percentiles(lat),
            "requests_per_second": round(len(lat) / wall, 1)}


def http_bench(tmp, records):
    port = free_port()
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent/"healthml"), "serve", "--model", str(tmp/"model.onnx"),
                             "--manifest", str(tmp/"manifest.json"), "--port", str(port), "--log", str(tmp/"pred.jsonl"),
                             "--insecure-local", "--log-key", str(tmp/"log.key")],   # loopback, no keys: the bench measures scoring
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(port)
        http_load(port, records, 2, 100)  # warm-up
        out = {"one_client": http_load(port, records, 1, 2000), "eight_clients": http_load(port, records, 8, 400),
               "paced_200_rps": http_load(port, records, 8, 500, rate=200)}
        out["met"] = out["paced_200_rps"]["p99_ms"] < 10
        out["prediction_log_lines"] = sum(1 for _ in open(tmp/"pred.jsonl"))
        return out
    finally:
        proc.terminate(); proc.wait(10)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-patients", type=int, default=400_000, help="~2.5 encounters each: 400,000 gives ~1M rows")
    ap.add_argument("--out", type=Path, default=HERE/"results/serve.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        params, spec, df, pipe, sha = build_model(tmp)
        single, records = single_record(spec, df, pipe, tmp, sha)
        print(json.dumps(single, indent=1), flush=True)
        http_r = http_bench(tmp, records)
        print(json.dumps(http_r, indent=1), flush=True)
        batch_r = batch(tmp, sha, a.batch_patients)
    result = {"benchmark": "production inference: single record, batch, HTTP", "single_record": single, "batch": batch_r,
              "http": http_r, "machine": {"cores": os.cpu_count(), "python": platform.python_version()}}
    from healthml.core.io import write_json
    write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
