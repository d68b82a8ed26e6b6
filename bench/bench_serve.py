"""Production inference at the hardware limit, each figure beside its anchor measured in the same run (issue 18).

The model is the project's own export (`dvc repro` first): models/onnx/lightgbm.onnx with its compiled trees, and the
native pipeline it was converted from (models/native/lightgbm.skops, loaded only at its recorded SHA-256). Rows are
sampled with replacement from the test split.

1. Batch (1M rows): healthml's batch path (`scored_chunks`: field checks, encoding, compiled trees, decisions; in
   memory, 100k-row Arrow chunks, as many at once as cores) and `predict_file` (Parquet in, Parquet out), against the anchor: lleaves (LLVM-compiled
   LightGBM) on a ready float64 matrix, all cores; three interleaved rounds, the best of each. Context on 200k rows: `Booster.predict`, onnxruntime (1 thread and
   all cores, from a DataFrame). Parity: predict_file's raw risk against the audited ONNX graph on every row.
   Target: healthml >= 0.5x compiled trees, parity <= 1e-6.
2. Single record (p50 over 2,000 records of the test split): `RecordScorer.score_one` (a dict in: field checks,
   encoding, compiled trees) against `Booster.predict` on a ready 1-row numpy array (1 thread, its fastest); context:
   the ONNX engine and sklearn `predict_proba` on a one-row DataFrame. Target: ratio <= 1.0.
3. HTTP over loopback (`healthml serve`, 1 and 2 worker processes; prediction log durable by group commit; scores
   without reasons, as the issue's baseline: the model and its compiled trees, no explainer beside them): the most
   requests/s 64 keep-alive clients get (closed loop), and p99 at a paced 1,000 requests/s (open loop: latency from
   each request's scheduled time, so a stall is not hidden). The load generator is asyncio on the same 2 cores.
   Targets: >= 4,000 req/s, p99 <= 10 ms at 1,000 req/s. Parity: 50 records in one request against ONNX.
4. Edge bundle (`healthml bundle`) in a fresh venv holding only numpy, onnxruntime and their requirements:
   footprint, cold start (process start to the first scores written), per-record latency.

Writes bench/results/serve.json.  Run once, on a quiet machine if you can: .venv/bin/python bench/bench_serve.py
"""
import argparse
import asyncio
import hashlib
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from healthml.deploy.serve import free_port, wait_until_ready

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
CORES = os.cpu_count() or 1


def best_of(fn, repeat=2):
    "Fastest wall time of `repeat` runs, and the last result."
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter(); out = fn(); best = min(best, time.perf_counter() - t0)
    return best, out


def p50_us(fn, items):
    for x in items[:50]: fn(x)                          # warm-up
    lat = []
    for x in items:
        t0 = time.perf_counter(); fn(x); lat.append((time.perf_counter() - t0) * 1e6)
    return {"p50_us": round(float(np.percentile(lat, 50)), 2), "p99_us": round(float(np.percentile(lat, 99)), 2)}


def setup(rows: int, tmp: Path):
    from healthml.core.layout import Layout
    from healthml.core.params import load_params
    from healthml.core.spec import observed_spec
    from healthml.modelling.train import load_trained, model_frame
    L = Layout(ROOT)
    onnx = L.model_file("lightgbm", "onnx")
    if not onnx.exists(): sys.exit("run `dvc repro` first: the bench scores the project's own exported model")
    params = load_params(ROOT/"params.yaml")
    spec = observed_spec(params.dataset, pd.read_parquet(L.split_file("train")))
    pipe = load_trained(L, "lightgbm")
    test = pd.read_parquet(L.split_file("test"))
    big = test.iloc[np.random.default_rng(0).integers(0, len(test), rows)].reset_index(drop=True)
    src = tmp/"batch.parquet"
    big.to_parquet(src, index=False, row_group_size=100_000)
    sha = hashlib.sha256(onnx.read_bytes()).hexdigest()
    (tmp/"manifest.json").write_text(json.dumps({"sha256": sha}))
    return spec, pipe, test, big, src, onnx, sha, model_frame


def batch(spec, pipe, big, src, onnx, sha, model_frame, tmp, context_rows=200_000):
    import lleaves
    import pyarrow.parquet as pq
    from healthml.deploy.serve import RecordScorer, predict_file, scored_chunks
    from healthml.modelling.scoring import OnnxScorer
    n = len(big)
    scorer = RecordScorer.from_file(onnx, sha, threads=CORES)
    assert scorer.engine == "compiled trees", scorer.engine_note
    X = np.ascontiguousarray(pipe[:-1].transform(model_frame(big, spec)), dtype=np.float64)   # the ready matrix anchors get
    booster = pipe.steps[-1][1].booster_
    booster.save_model(str(tmp/"booster.txt"))
    ll = lleaves.Model(str(tmp/"booster.txt")); ll.compile()
    table = pq.read_table(src)
    chunks = [table.slice(a, 100_000) for a in range(0, n, 100_000)]
    times = {"lleaves": [], "trees": [], "memory": [], "file": []}       # interleaved rounds: load from other jobs hits all alike
    for _ in range(3):
        t0 = time.perf_counter(); p_ll = ll.predict(X, n_jobs=CORES); times["lleaves"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); scorer.trees.predict(X); times["trees"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); list(scored_chunks(scorer, chunks, src, workers=CORES)); times["memory"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); counts = predict_file(scorer, src, tmp/"scores.parquet", chunk_rows=100_000); times["file"].append(time.perf_counter() - t0)
    t_ll, t_raw, t_mem, t_file = (min(times[k]) for k in ("lleaves", "trees", "memory", "file"))
    sub, Xs = big.head(context_rows), X[:context_rows]
    t_boost, p_boost = best_of(lambda: booster.predict(Xs, num_threads=CORES), 1)
    ort1, ortn = OnnxScorer(onnx, 1), OnnxScorer(onnx, CORES)
    t_ort1, p_onnx_sub = best_of(lambda: ort1.predict_proba(sub), 1)
    t_ortn, _ = best_of(lambda: ortn.predict_proba(sub), 1)
    p_onnx = ortn.predict_proba(big)
    p_file = pd.read_parquet(tmp/"scores.parquet", columns=["raw_risk"]).raw_risk.to_numpy()
    rate = lambda t, rows=n: round(rows / t)
    r = {"rows": n, "chunk_rows": 100_000, "threads": CORES,
         "anchor_lleaves_compiled_trees": {"seconds": round(t_ll, 3), "rows_per_second": rate(t_ll)},
         "healthml_in_memory": {"seconds": round(t_mem, 3), "rows_per_second": rate(t_mem),
                                "what": "scored_chunks on 100k-row Arrow chunks, 2 at once: checks, encoding, compiled trees, decisions"},
         "rounds_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
         "healthml_predict_file": {"seconds": round(t_file, 3), "rows_per_second": rate(t_file), "scored": counts["scored"],
                                   "rejected": counts["rejected"], "what": "Parquet in, Parquet out, Arrow only"},
         "healthml_trees_alone": {"seconds": round(t_raw, 3), "rows_per_second": rate(t_raw),
                                  "what": "the exported .trees.so through ctypes on the ready matrix"},
         "context_rows": context_rows,
         "booster_predict": {"rows_per_second": rate(t_boost, context_rows)},
         "onnxruntime_1_thread_from_dataframe": {"rows_per_second": rate(t_ort1, context_rows)},
         f"onnxruntime_{CORES}_threads_from_dataframe": {"rows_per_second": rate(t_ortn, context_rows)},
         "parity": {"predict_file_vs_onnx_max_abs": float(np.abs(p_file - p_onnx).max()),
                    "lleaves_vs_booster_max_abs": float(np.abs(p_ll[:context_rows] - p_boost).max()),
                    "booster_vs_onnx_max_abs": float(np.abs(p_boost - p_onnx_sub).max())}}
    r["ratio_in_memory_to_compiled_trees"] = round(r["healthml_in_memory"]["rows_per_second"] / r["anchor_lleaves_compiled_trees"]["rows_per_second"], 2)
    r["ratio_predict_file_to_compiled_trees"] = round(r["healthml_predict_file"]["rows_per_second"] / r["anchor_lleaves_compiled_trees"]["rows_per_second"], 2)
    r["met"] = r["ratio_in_memory_to_compiled_trees"] >= 0.5 and r["parity"]["predict_file_vs_onnx_max_abs"] <= 1e-6
    return r


def records_of(test, spec, model_frame, n):
    frame = model_frame(test, spec)
    recs = [{k: v for k, v in r.items() if v != "(missing)" and not (isinstance(v, float) and np.isnan(v))} for r in frame.to_dict("records")]
    return (recs * (n // len(recs) + 1))[:n], frame


def single(spec, pipe, test, onnx, sha, model_frame, n=2000):
    from healthml.deploy.serve import RecordScorer
    from healthml.modelling.runtime import Scorer
    scorer = RecordScorer.from_file(onnx, sha)
    onnx_engine = Scorer(onnx.read_bytes(), sha)                 # no folder: the ONNX graph scores
    recs, frame = records_of(test, spec, model_frame, n)
    X = np.ascontiguousarray(pipe[:-1].transform(frame), dtype=np.float64)
    rows = [X[[i % len(X)]] for i in range(n)]
    booster = pipe.steps[-1][1].booster_
    frames = [frame.iloc[[i]] for i in range(300)]
    r = {"records": n, "engine": scorer.engine,
         "anchor_booster_predict_ready_row": p50_us(lambda a: booster.predict(a, num_threads=1), rows),
         "healthml_score_one": p50_us(scorer.score_one, recs),
         "healthml_score_one_onnx_engine": p50_us(onnx_engine.score_one, recs),
         "sklearn_predict_proba_one_row_dataframe": p50_us(lambda f: pipe.predict_proba(f), frames),
         "context_reasons_treeshap_one_record": p50_us(lambda x: scorer.reasons([x]), recs[:300])}
    p = np.array([scorer.score_one(x) for x in recs[:len(X)]])
    r["parity_vs_booster_max_abs"] = float(np.abs(p - booster.predict(X[:len(p)])).max())
    r["parity_vs_onnx_max_abs"] = float(np.abs(p - onnx_engine.score(recs[:len(X)])).max())
    r["ratio_to_booster_p50"] = round(r["healthml_score_one"]["p50_us"] / r["anchor_booster_predict_ready_row"]["p50_us"], 2)
    r["met"] = r["ratio_to_booster_p50"] <= 1.0
    return r, recs





async def _client(port, bodies, n, lat, errors, start, pace=None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(n):
        if pace is not None:
            delay = start + pace[i] - time.perf_counter()
            if delay > 0: await asyncio.sleep(delay)
        t0 = start + pace[i] if pace is not None else time.perf_counter()
        writer.write(bodies[i % len(bodies)])
        head = await reader.readuntil(b"\r\n\r\n")
        size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(size)
        lat.append((time.perf_counter() - t0) * 1000)
        if head[9:12] != b"200": errors.append(int(head[9:12]))
    writer.close()


def http_load(port, records, clients, per_client, rate=None):
    "Keep-alive clients on one asyncio loop; closed loop, or paced to `rate` requests/s in total (open loop)."
    def request(rec):
        b = json.dumps({"records": [rec]}).encode()
        return (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(b)) + b
    bodies = [request(r) for r in records[:2000]]
    lat, errors = [], []
    async def run():
        start = time.perf_counter() + 0.05
        paces = [[(k + i * clients) / rate for i in range(per_client)] if rate else None for k in range(clients)]
        await asyncio.gather(*[_client(port, bodies[k::clients], per_client, lat, errors, start, paces[k]) for k in range(clients)])
        return time.perf_counter() - start
    wall = asyncio.run(run())
    a = np.array(lat)
    return {"clients": clients, "requests": len(lat), "non_200": len(errors), "requests_per_second": round(len(lat) / wall),
            "p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def http_bench(onnx, tmp, records, workers):
    "The service scoring without reasons (model and compiled trees only, as the issue's baseline was measured): TreeSHAP per record is priced in `single_record`."
    import shutil
    from healthml.modelling.scoring import OnnxScorer
    folder = tmp/"http-model"
    if not folder.exists():
        folder.mkdir()
        for f in (onnx, onnx.with_suffix(".trees.so")): shutil.copy(f, folder/f.name)
    onnx = folder/onnx.name
    port, log = free_port(), tmp/f"pred-{workers}.jsonl"
    proc = subprocess.Popen([str(Path(sys.executable).parent/"healthml"), "serve", "--model", str(onnx), "--manifest", str(tmp/"manifest.json"),
                             "--port", str(port), "--log", str(log), "--insecure-local", "--log-key", str(tmp/"log.key"),
                             "--workers", str(workers), "--poll-seconds", "0"],
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until_ready(port, process=proc), "the service did not become ready"
        http_load(port, records, 8, 100)                     # warm-up (every worker)
        out = {"workers": workers, "max": http_load(port, records, 64, 150), "paced_1000_rps": http_load(port, records, 16, 250, rate=1000)}
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", "/v1/predict", json.dumps({"records": records[:50]}), {"Content-Type": "application/json"})
        body = json.loads(c.getresponse().read())
        got = np.array([p["raw_risk"] if p["risk"] is None else p["risk"] for p in body["predictions"]])
        ref = OnnxScorer(onnx).predict_proba(pd.DataFrame(records[:50]).reindex(columns=list(OnnxScorer(onnx).schema)))
        out["parity_vs_onnx_max_abs"] = float(np.abs(got - ref).max())
        scored = sum(r["requests"] - r["non_200"] for r in (out["max"], out["paced_1000_rps"])) + 800 + 50   # + warm-up, parity
        out["log_lines"], out["records_answered"] = sum(1 for _ in open(log)), scored                     # one line per record
        return out
    finally:
        proc.terminate(); proc.wait(20)


def edge(onnx, tmp, records):
    sys.path.insert(0, str(ROOT/"tests"))
    from healthml.deploy.bundle import write_bundle
    from healthml.governance.supply_chain import requirement_closure
    from test_bundle import EDGE, edge_env, fresh_venv
    b = write_bundle(onnx, json.loads((tmp/"manifest.json").read_text())["sha256"], tmp/"edge")
    python = fresh_venv(tmp/"venv")
    size = lambda p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
    dists = {name: sum((Path(d.locate_file(f)).stat().st_size for f in d.files or [] if Path(d.locate_file(f)).is_file()))
             for name, d in requirement_closure(EDGE).items()}
    (tmp/"one.jsonl").write_text(json.dumps(records[0]) + "\n")
    starts = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([str(python), str(tmp/"edge"), "predict", str(tmp/"one.jsonl"), "-o", str(tmp/"one.out.jsonl")],
                       env=edge_env(), check=True, capture_output=True)
        starts.append(time.perf_counter() - t0)
    (tmp/"recs.json").write_text(json.dumps(records[:2000]))
    code = ("import json, sys, time, numpy as np\nsys.path.insert(0, sys.argv[1])\nimport healthml_edge\n"
            "s = healthml_edge.load_bundle(sys.argv[1]); recs = json.load(open(sys.argv[2]))\n"
            "for r in recs[:50]: s.predict([r])\nlat = []\n"
            "for r in recs:\n    t0 = time.perf_counter(); s.predict([r]); lat.append((time.perf_counter() - t0) * 1e6)\n"
            "one = []\nfor r in recs:\n    t0 = time.perf_counter(); s.score_one(r); one.append((time.perf_counter() - t0) * 1e6)\n"
            "print(json.dumps({'predict_p50_us': float(np.percentile(lat, 50)), 'score_one_p50_us': float(np.percentile(one, 50)), 'engine': s.engine}))")
    lat = json.loads(subprocess.run([str(python), "-c", code, str(tmp/"edge"), str(tmp/"recs.json")], env=edge_env(),
                                    check=True, capture_output=True, text=True).stdout)
    return {"engine": b["engine"], "bundle_mb": round(size(tmp/"edge") / 1e6, 2),
            "packages_mb": {k: round(v / 1e6, 1) for k, v in dists.items()}, "install_mb": round((size(tmp/"edge") + sum(dists.values())) / 1e6, 1),
            "cold_start_seconds_median": round(statistics.median(starts), 3),
            "per_record": {k: round(v, 1) if isinstance(v, float) else v for k, v in lat.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="batch rows (sampled from the test split)")
    ap.add_argument("--out", type=Path, default=HERE/"results/serve.json")
    a = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        spec, pipe, test, big, src, onnx, sha, model_frame = setup(a.rows, tmp)
        single_r, records = single(spec, pipe, test, onnx, sha, model_frame)
        print(json.dumps(single_r, indent=1), flush=True)
        batch_r = batch(spec, pipe, big, src, onnx, sha, model_frame, tmp)
        print(json.dumps(batch_r, indent=1), flush=True)
        http_r = {f"workers_{w}": http_bench(onnx, tmp, records, w) for w in (1, 2)}
        meets = lambda r: r["max"]["requests_per_second"] >= 4000 and r["paced_1000_rps"]["p99_ms"] <= 10
        runs = list(http_r.values())
        best = max([r for r in runs if meets(r)] or runs, key=lambda r: r["max"]["requests_per_second"])
        http_r["chosen_workers"], http_r["met"] = best["workers"], meets(best)   # both targets first, then throughput
        print(json.dumps(http_r, indent=1), flush=True)
        edge_r = edge(onnx, tmp, records)
    result = {"benchmark": "production inference against anchors measured in the same run (issue 18)",
              "model": {"file": "models/onnx/lightgbm.onnx", "sha256": sha},
              "batch": batch_r, "single_record": single_r, "http": http_r, "edge_bundle": edge_r,
              "machine": {"cores": CORES, "python": platform.python_version(), "load_average_at_start": [round(x, 2) for x in load],
                          "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}}
    from healthml.core.io import write_json
    write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
