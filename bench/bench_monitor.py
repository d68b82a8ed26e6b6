"""Benchmarks of production monitoring.

1. A 1M-row x 30-feature current window (Parquet, 13 synthetic-EHR features + 17 extra labs) against a
   20,000-row reference, with an ONNX LightGBM model: the whole `healthml.deploy.monitor.monitor` as the CLI runs it
   (chunked read, exact data-quality counts, stratified sample, scoring, Evidently drift, outcome monitors,
   Papermill report, PHI scan), in a child process: wall time and peak memory (VmHWM).
2. Scenario detection on the synthetic EHR (library level, no rendering): false-alarm rate of scenario (a)
   over 20 seeds, and detection rate of (b)-(e) over 5 seeds each.

Targets (issue 8, 2 cores): 1M x 30 under 30 s and under 4 GB; (a) alarms in at most 1 of 20 seeds.
Writes bench/results/monitor.json.  Run: .venv/bin/python bench/bench_monitor.py
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXTRA = [f"lab_{i:02d}" for i in range(1, 18)]


def params_30():
    "The synthetic example's params with 17 extra numeric labs: 30 features."
    import yaml
    from healthml.core.params import parse_params
    raw = yaml.safe_load((ROOT/"examples/synthetic-ehr/params.yaml").read_text())
    for c in EXTRA: raw["dataset"]["features"][c] = {"kind": "numeric", "min": -10, "max": 10}
    raw["monitor"]["template"] = str(ROOT/"nbs/templates/monitoring.ipynb")
    return parse_params(raw)


def window(n_patients: int, seed: int, **knobs):
    from healthml.data.synthetic import synthetic_ehr
    df = synthetic_ehr(n_patients, seed=seed, **knobs)
    rng = np.random.default_rng(seed + 7)
    for c in EXTRA: df[c] = rng.normal(0, 1, len(df)).round(3)
    return df


def build(tmp: Path, rows: int):
    from healthml.modelling.export import to_onnx
    from healthml.modelling.train import model_frame, model_pipelines, outcome
    params = params_30()
    spec = params.dataset
    dev = window(8000, 1)
    pipe = model_pipelines(params)["lightgbm"].fit(model_frame(dev, spec), outcome(dev, spec))
    (tmp/"model.onnx").write_bytes(to_onnx(pipe, spec, {"model_name": "bench", "decision_threshold": 0.15}).SerializeToString())
    window(8000, 2).to_parquet(tmp/"reference.parquet", index=False)
    t = time.perf_counter()
    cur = window(int(rows / 2.5), 3, age_shift=5.0)
    cur.to_parquet(tmp/"current.parquet", index=False)
    return params, len(cur), cur.shape[1], time.perf_counter() - t


CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[2])
from bench_monitor import params_30
from healthml.core.layout import Layout
from healthml.deploy.monitor import monitor
tmp = sys.argv[1]
t = time.perf_counter()
r = monitor(params_30(), Layout(tmp), f"{tmp}/current.parquet", f"{tmp}/reference.parquet", f"{tmp}/model.onnx",
            out_dir=f"{tmp}/report", render=sys.argv[3] == "1")
wall = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": round(wall, 2), "seconds_with_imports": round(time.perf_counter() - t0, 2),
                  "peak_rss_mb": round(hwm / 1024), "status": r["status"], "alerts": [a["message"] for a in r["alerts"]],
                  "sampling": r["sampling"]}))
"""


def run_child(tmp: Path, render: bool) -> dict:
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp), str(HERE), "1" if render else "0"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    if out.returncode: raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def scenario_rates(null_seeds: int, shift_seeds: int) -> dict:
    from healthml.core.params import load_params
    from healthml.deploy.monitor import compare_windows, known_categories, summarise
    from healthml.deploy.monitor_scenarios import SCENARIOS, caught, synthetic_setup, synthetic_window
    params = load_params(ROOT/"examples/synthetic-ehr/params.yaml")
    ref, threshold, scored = synthetic_setup(params, 4000, seed=0)
    def one(key, seed):
        cur = summarise(scored(synthetic_window(key, 4000, seed)), params.dataset, params.monitor, known_categories(ref))
        return compare_windows(ref, cur, threshold, params.monitor, key, report=False)[0]
    out = {}
    for key in SCENARIOS:
        n = null_seeds if key == "a-no-change" else shift_seeds
        results = [one(key, 5000 + s) for s in range(n)]
        ok = sum(caught(key, r) for r in results)
        out[key] = {"seeds": n, "as_expected": ok, "rate": round(ok / n, 3),
                    "monitors_fired": sorted({a["monitor"] for r in results for a in r["alerts"]})}
    out["a-no-change"]["false_alarm_rate"] = round(1 - out["a-no-change"]["rate"], 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--null-seeds", type=int, default=20)
    ap.add_argument("--shift-seeds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        params, rows, cols, gen_s = build(tmp, args.rows)
        print(f"window: {rows:,} rows x {cols} columns ({len(params.dataset.features)} features), generated in {gen_s:.0f} s")
        full = run_child(tmp, render=True)
        print(f"monitor 1M (report filed): {full['seconds']} s, peak {full['peak_rss_mb']} MB, status {full['status']}")
        bare = run_child(tmp, render=False)
        print(f"monitor 1M (no report): {bare['seconds']} s, peak {bare['peak_rss_mb']} MB")
    rates = scenario_rates(args.null_seeds, args.shift_seeds)
    for k, v in rates.items(): print(k, v)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "window": {"rows": rows, "columns": cols, "features": len(params.dataset.features), "reference_rows": "~20,000",
                         "max_rows_sample": params.monitor.max_rows},
              "monitor_1m_with_report": full, "monitor_1m_without_report": bare,
              "targets": {"seconds": 30, "peak_rss_mb": 4096},
              "met": {"seconds": full["seconds"] < 30, "memory": full["peak_rss_mb"] < 4096},
              "scenarios_synthetic": rates,
              "false_alarm_target_met": rates["a-no-change"]["seeds"] - rates["a-no-change"]["as_expected"] <= max(1, args.null_seeds // 20)}
    (HERE/"results").mkdir(exist_ok=True)
    (HERE/"results/monitor.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/monitor.json")


if __name__ == "__main__":
    main()
