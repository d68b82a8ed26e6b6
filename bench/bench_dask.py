"""Training and batch scoring: one process vs a Dask LocalCluster on this machine (issue 19).

    python bench/bench_dask.py --rows 1000000 --score-rows 10000000 --out bench/results/dask.json

Training: rows are drawn with replacement from the pipeline's de-identified train split
(`data/processed/train.parquet`, so `dvc repro split` first), numeric features jittered by 1% of their SD so the trees
see more than 9,105 distinct patients' values. The candidate LightGBM pipeline of params.yaml is fitted (1) here, as
`compute.engine: local` does, and (2) with `healthml.modelling.train.fit_on_cluster` on a LocalCluster on 127.0.0.1
(`--workers` workers, 1 thread each), as `compute.engine: dask` does.

Scoring (`--score-rows N`, 0 to skip): N rows resampled the same way from the test split are written as partitioned
Parquet (part files of `--part-rows` rows, row groups of 100,000), chunk by chunk. The candidate's exported ONNX model
(`models/onnx/`, verified against `metrics/export.json`, so `dvc repro export` first) scores them (1) in this process,
part file after part file with `healthml.deploy.serve.predict_file` (what `healthml predict` does on one file: one
onnxruntime thread, 100,000-row chunks), and (2) with `healthml.deploy.cluster.predict_partitioned` on the
LocalCluster (what `healthml predict <folder> --scheduler` does: each worker scores whole partitions into part files).

Peak memory is the resident set size sampled every 0.1-0.2 s: for local work, of a fresh process that does only that
work (so nothing an earlier measurement left behind counts); for Dask, of each worker (the client's own peak beside it:
this process, which also ran the earlier measurements). The JSON states where Dask wins on this machine and where it does not
(`crossover`). On a shared machine the times are noisy: read them as orders of magnitude.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd


class PeakRSS:
    "The largest value `measure()` returned while the block ran, sampled every `every` seconds."
    def __init__(self, measure, every: float = 0.1):
        self.measure, self.every, self.peak, self._stop = measure, every, {}, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.measure().items(): self.peak[k] = max(self.peak.get(k, 0), v)
            self._stop.wait(self.every)

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True); self.thread.start(); return self

    def __exit__(self, *exc):
        self._stop.set(); self.thread.join()
        for k, v in self.measure().items(): self.peak[k] = max(self.peak.get(k, 0), v)


def resample(frame: pd.DataFrame, numeric: list[str], rows: int, rng: np.random.Generator) -> pd.DataFrame:
    """`rows` rows drawn with replacement from `frame`, numeric columns jittered by 1% of their SD and kept within the
    column's observed range, so every row stays valid under the dataset spec (missing stays missing)."""
    out = frame.iloc[rng.integers(0, len(frame), rows)].reset_index(drop=True)
    for c in numeric:
        sd = frame[c].std() or 1
        out[c] = (out[c] + rng.normal(0, 0.01 * sd, rows) * out[c].notna()).clip(frame[c].min(), frame[c].max())
    return out


def cohort(root: Path, rows: int, seed: int):
    from healthml.core.params import load_params
    from healthml.modelling.train import model_frame, outcome
    params = load_params(root/"params.yaml")
    train = pd.read_parquet(root/"data/processed/train.parquet")
    rng = np.random.default_rng(seed)
    take = rng.integers(0, len(train), rows)
    X, y = model_frame(train, params.dataset).iloc[take].reset_index(drop=True), outcome(train, params.dataset)[take]
    for c in params.dataset.numeric:
        X[c] = X[c] + rng.normal(0, 0.01 * (X[c].std() or 1), rows) * X[c].notna()
    return params, X, y


def mb(n: float) -> float: return round(n / 2**20, 1)


def worker_memory(client, me):
    "The client's RSS and each worker's, as the scheduler last heard it."
    def measure():
        info = client.scheduler_info(n_workers=-1)["workers"]
        return {"client": me.memory_info().rss, **{w: v["metrics"]["memory"] for w, v in info.items()}}
    return measure


def in_fresh_process(fn, *args):
    "`fn(*args)` in a new interpreter (spawn): its peak RSS is its own, not what earlier work left in this process."
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool: return pool.submit(fn, *args).result()


def local_fit(root: Path, rows: int) -> dict:
    "Fit the candidate pipeline in this process, as `compute.engine: local` does; time and peak RSS (run in a fresh process)."
    import psutil
    from healthml.modelling.train import model_pipelines
    me = psutil.Process()
    params, X, y = cohort(root, rows, 0)
    pipe = model_pipelines(params)[params.candidate]
    base = me.memory_info().rss
    with PeakRSS(lambda: {"process": me.memory_info().rss}) as peak:
        t0 = time.perf_counter(); pipe.fit(X, y); local_s = time.perf_counter() - t0
    return {"seconds": round(local_s, 2), "peak_rss_mb": mb(peak.peak["process"]), "peak_rss_above_start_mb": mb(peak.peak["process"] - base),
            "threads": "LightGBM default (all cores)", "how": "a fresh process: read the split, resample, fit (its whole RSS)"}


def train_benchmark(a, cluster_client, me) -> dict:
    from healthml.modelling.train import fit_on_cluster, model_pipelines
    local = in_fresh_process(local_fit, a.root, a.rows)
    params, X, y = cohort(a.root, a.rows, 0)
    pipe = model_pipelines(params)[params.candidate]
    local_s = local["seconds"]
    with PeakRSS(worker_memory(cluster_client, me), 0.2) as peak:
        t0 = time.perf_counter(); fit_on_cluster(pipe, X, y, cluster_client, a.partition_rows); dask_s = time.perf_counter() - t0
    workers = {k: v for k, v in peak.peak.items() if k != "client"}
    dask = {"seconds": round(dask_s, 2), "workers": a.workers, "memory_limit": a.memory_limit, "partition_rows": a.partition_rows,
            "peak_rss_per_worker_mb": mb(max(workers.values())), "client_peak_rss_mb": mb(peak.peak["client"])}
    return {"rows": a.rows, "features": X.shape[1], "model": params.candidate, "local": local, "dask_local_cluster": dask,
            "dask_over_local_time": round(dask_s / local_s, 2),
            "note": "the client holds the whole frame (the split is read by the client, as the train stage does); "
                    "workers hold their partitions and LightGBM's binned copy"}


def write_scoring_input(root: Path, rows: int, part_rows: int, folder: Path) -> dict:
    "Partitioned Parquet of `rows` resampled test-split rows, one part in memory at a time; what was written."
    import pyarrow as pa
    import pyarrow.parquet as pq
    from healthml.core.params import load_params
    params = load_params(root/"params.yaml")
    test = pd.read_parquet(root/"data/processed/test.parquet")
    rng, written, parts = np.random.default_rng(1), 0, 0
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    while written < rows:
        n = min(part_rows, rows - written)
        part = resample(test, params.dataset.numeric, n, rng)
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder/f"part-{parts:05d}.parquet", row_group_size=100_000)
        written, parts = written + n, parts + 1
    return {"rows": written, "part_files": parts, "bytes": sum(f.stat().st_size for f in folder.iterdir()),
            "seconds": round(time.perf_counter() - t0, 1)}


def local_score(root: Path, files: list[Path], out: Path) -> dict:
    "Score the part files one after another in this process, as `healthml predict` does a file (run in a fresh process)."
    import psutil
    from healthml.core.layout import Layout
    from healthml.core.params import load_params
    from healthml.deploy.serve import RecordScorer, predict_file
    from healthml.modelling.scoring import load_verified
    me, params = psutil.Process(), load_params(root/"params.yaml")
    sha = json.loads((root/"metrics/export.json").read_text())[params.candidate]["sha256"]
    scorer = RecordScorer(load_verified(Layout(root).model_file(params.candidate, "onnx"), sha), sha)
    out.mkdir()
    base = me.memory_info().rss
    with PeakRSS(lambda: {"process": me.memory_info().rss}) as peak:
        t0, rows, scored = time.perf_counter(), 0, 0
        for f in files:
            r = predict_file(scorer, f, out/f.name, chunk_rows=100_000)
            rows, scored = rows + r["rows"], scored + r["scored"]
        seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"seconds": round(seconds, 1), "rows_per_second": round(rows / seconds), "scored": scored,
            "peak_rss_mb": mb(peak.peak["process"]), "peak_rss_above_start_mb": mb(peak.peak["process"] - base),
            "onnxruntime_threads": 1, "how": "a fresh process: healthml.deploy.serve.predict_file on each part file in turn"}


def score_benchmark(a, cluster_client, me, work: Path) -> dict:
    from healthml.core.compute import parquet_parts
    from healthml.core.layout import Layout
    from healthml.core.params import load_params
    from healthml.deploy.cluster import predict_partitioned
    from healthml.deploy.serve import RecordScorer
    from healthml.modelling.scoring import load_verified
    params = load_params(a.root/"params.yaml")
    exported = json.loads((a.root/"metrics/export.json").read_text())[params.candidate]
    model = load_verified(Layout(a.root).model_file(params.candidate, "onnx"), exported["sha256"])
    scorer = RecordScorer(model, exported["sha256"])
    data = write_scoring_input(a.root, a.score_rows, a.part_rows, work/"extract")
    files = parquet_parts(work/"extract")

    local = in_fresh_process(local_score, a.root, files, work/"local")
    local_s = local["seconds"]

    t0 = time.perf_counter()
    cluster_client.run(lambda: __import__("healthml.deploy.cluster"))  # warm workers, as on a cluster already in use
    warm_s = time.perf_counter() - t0
    with PeakRSS(worker_memory(cluster_client, me), 0.2) as peak:
        t0 = time.perf_counter()
        r = predict_partitioned(cluster_client, scorer, model, work/"extract", work/"dask", chunk_rows=100_000,
                                partition_rows=a.partition_rows)
        dask_s = time.perf_counter() - t0
    workers = {k: v for k, v in peak.peak.items() if k != "client"}
    dask = {"seconds": round(dask_s, 1), "rows_per_second": round(a.score_rows / dask_s), "scored": r["scored"],
            "partitions": r["partitions"], "workers": a.workers, "threads_per_worker": 1, "memory_limit": a.memory_limit,
            "peak_rss_per_worker_mb": mb(max(workers.values())), "client_peak_rss_mb": mb(peak.peak["client"]),
            "how": "healthml.deploy.cluster.predict_partitioned: each worker scores whole partitions into part files",
            "worker_import_seconds_before_the_clock": round(warm_s, 1)}
    assert local["scored"] == r["scored"], (local["scored"], r["scored"])
    return {"rows": a.score_rows, "input": data, "model": params.candidate, "local": local, "dask_local_cluster": dask,
            "dask_speedup": round(local_s / dask_s, 2)}


def crossover(train: dict | None, score: dict | None, cpus: int) -> str:
    "What the figures say, in words: where Dask wins on this machine and where it does not."
    said = []
    if train:
        ratio, rows = train["dask_over_local_time"], f"{train['rows']:,}"
        w, p = train["dask_local_cluster"]["peak_rss_per_worker_mb"], train["local"]["peak_rss_mb"]
        said.append(f"training at {rows} rows: the LocalCluster is {ratio:.1f}x {'slower' if ratio > 1 else 'faster'} "
                    f"than one process ({train['dask_local_cluster']['seconds']} s vs {train['local']['seconds']} s); "
                    + (f"one LightGBM process already uses all {cpus} cores, so on one machine Dask adds only the transfer of "
                       f"partitions and the network between workers: no time crossover on this machine up to {rows} rows. "
                       if ratio > 1 else "the time crossover is below this size on this machine. ")
                    + f"Memory per process: peak {w:.0f} MB per worker against {p:.0f} MB for one process (the client "
                    f"still holds the whole frame); " + ("each worker holds only its share, which is what lets data beyond "
                    "one machine's memory train on several" if w < p else "no saving per process at this size"))
    if score:
        s = score["dask_speedup"]
        said.append(f"scoring at {score['rows']:,} rows: the LocalCluster ({score['dask_local_cluster']['workers']} workers x 1 "
                    f"thread) scores {score['dask_local_cluster']['rows_per_second']:,} rows/s against "
                    f"{score['local']['rows_per_second']:,} rows/s for one process (1 onnxruntime thread): "
                    f"{s:.2f}x, with peak {score['dask_local_cluster']['peak_rss_per_worker_mb']:.0f} MB per worker "
                    f"(bounded by the chunk, not the input) against {score['local']['peak_rss_mb']:.0f} MB for the process; "
                    + ("scoring is embarrassingly parallel (one onnxruntime thread a worker, every core busy), so Dask wins "
                       "on time at this size" if s > 1 else "no time crossover at this size on this machine"))
    return "; ".join(said)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="training rows (0: skip training)")
    ap.add_argument("--score-rows", type=int, default=0, help="scoring rows (0: skip scoring)")
    ap.add_argument("--part-rows", type=int, default=500_000, help="rows per part file of the scoring input")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GiB", help="per Dask worker")
    ap.add_argument("--partition-rows", type=int, default=100_000)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--work", type=Path, default=None, help="folder for the scoring input and outputs (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/dask.json"))
    a = ap.parse_args()

    import psutil
    from distributed import Client, LocalCluster
    me = psutil.Process()
    work = Path(tempfile.mkdtemp(prefix="healthml-bench-dask-", dir=a.work))
    result = {"machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "python": platform.python_version(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}}
    try:
        with LocalCluster(n_workers=a.workers, threads_per_worker=1, memory_limit=a.memory_limit, host="127.0.0.1",
                          dashboard_address=None, processes=True, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            client.run(lambda: None)                                    # workers up before any clock starts
            if a.rows:
                print(f"training on {a.rows:,} rows", flush=True)
                result["training"] = train_benchmark(a, client, me)
            if a.score_rows:
                client.restart()                                        # scoring starts from fresh workers
                print(f"scoring {a.score_rows:,} rows", flush=True)
                result["scoring"] = score_benchmark(a, client, me, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["crossover"] = crossover(result.get("training"), result.get("scoring"), result["machine"]["cpus"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
