"""Training time and peak memory: one process vs a Dask LocalCluster (issue 19).

    python bench/bench_dask.py --rows 1000000 --out bench/dask_1m.json

Rows are drawn with replacement from the pipeline's de-identified train split (`data/processed/train.parquet`, so
`dvc repro split` first), numeric features jittered by 1% of their SD so the trees see more than 9,105 distinct
patients' values. The candidate LightGBM pipeline of params.yaml is fitted (1) here, as `compute.engine: local`
does, and (2) with `healthml.modelling.train.fit_on_cluster` on a LocalCluster on 127.0.0.1 (`--workers` workers,
1 thread each), as `compute.engine: dask` does. Peak memory is the resident set size sampled every 0.1 s: of this
process for local training, of each worker for Dask (the client's own peak is reported beside it). Prints and
writes JSON. On a shared machine the times are noisy: read them as orders of magnitude.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GiB", help="per Dask worker")
    ap.add_argument("--partition-rows", type=int, default=100_000)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=Path("bench/results/dask.json"))
    a = ap.parse_args()

    import psutil
    from distributed import Client, LocalCluster
    from sklearn.base import clone
    from healthml.modelling.train import fit_on_cluster, model_pipelines

    params, X, y = cohort(a.root, a.rows, 0)
    pipe = model_pipelines(params)[params.candidate]
    me = psutil.Process()
    base = me.memory_info().rss
    with PeakRSS(lambda: {"process": me.memory_info().rss}) as peak:
        t0 = time.perf_counter(); clone(pipe).fit(X, y); local_s = time.perf_counter() - t0
    local = {"seconds": round(local_s, 2), "peak_rss_mb": round(peak.peak["process"] / 2**20, 1),
             "peak_rss_above_start_mb": round((peak.peak["process"] - base) / 2**20, 1)}

    with LocalCluster(n_workers=a.workers, threads_per_worker=1, memory_limit=a.memory_limit, host="127.0.0.1",
                      dashboard_address=None, processes=True, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.run(lambda: None)                                    # workers up before the clock starts
        def measure():
            info = client.scheduler_info(n_workers=-1)["workers"]
            return {"client": me.memory_info().rss, **{w: v["metrics"]["memory"] for w, v in info.items()}}
        with PeakRSS(measure, 0.2) as peak:
            t0 = time.perf_counter(); fit_on_cluster(pipe, X, y, client, a.partition_rows); dask_s = time.perf_counter() - t0
    workers = {k: v for k, v in peak.peak.items() if k != "client"}
    dask = {"seconds": round(dask_s, 2), "workers": a.workers, "memory_limit": a.memory_limit, "partition_rows": a.partition_rows,
            "peak_rss_per_worker_mb": round(max(workers.values()) / 2**20, 1), "client_peak_rss_mb": round(peak.peak["client"] / 2**20, 1)}
    result = {"rows": a.rows, "features": X.shape[1], "model": params.candidate, "machine": {"cpus": os.cpu_count(),
              "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()},
              "local": local, "dask_local_cluster": dask,
              "note": "the client holds the whole frame here (the split is read by the client, as the train stage does); "
                      "workers hold their partitions and LightGBM's binned copy"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
