"""Benchmark: the full per-model metric set with 1,000 patient-level bootstrap replicates on 100,000 predictions.

Target (issue 4): under 60 s on 2 cores. Writes bench/results/evaluate.json.
Run: .venv/bin/python bench/bench_evaluate.py [--n 100000] [--boot 1000]
"""
import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

from healthml.core.io import write_json
from healthml.core.params import EvaluateConfig
from healthml.evaluation.evaluate import compare, model_evaluation


def simulate(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.26).astype(int)
    lp = -1.2 + 1.4 * (y - 0.26) + rng.normal(0, 1, n)
    other = -1.1 + 1.0 * (y - 0.26) + rng.normal(0, 1, n)
    return y, 1 / (1 + np.exp(-lp)), 1 / (1 + np.exp(-other)), np.arange(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent/"results/evaluate.json")
    a = ap.parse_args()
    y, p, q, pid = simulate(a.n)
    cfg = EvaluateConfig(n_bootstrap=a.boot)
    t0 = time.perf_counter()
    ev = model_evaluation(y, p, pid, 0.3, cfg)
    t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    compare(y, p, q, pid, 0.3, 0.3, cfg)
    t_compare = time.perf_counter() - t0
    result = {"benchmark": "model_evaluation: AUROC (DeLong + bootstrap), AUPRC, O/E, calibration intercept and slope, "
                           "Brier, scaled Brier, ICI/E50/E90, ECE, sensitivity, specificity, PPV, NPV, alerts/100, NNE, net benefit",
              "predictions": a.n, "bootstrap_replicates": a.boot, "metrics_with_ci": sum(k.endswith("_ci_low") for k in ev),
              "seconds_model_evaluation": round(t_model, 2), "seconds_paired_comparison": round(t_compare, 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "target_seconds": 60, "met": t_model < 60, "machine": {"cores": __import__("os").cpu_count(), "python": platform.python_version()},
              "auroc": round(ev["auroc"], 4), "auroc_ci": [round(ev["auroc_ci_low"], 4), round(ev["auroc_ci_high"], 4)]}
    write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
