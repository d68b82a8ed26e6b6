"""Benchmark: validation (pandera schema, hard + soft rules) and Safe Harbor de-identification of 1M synthetic encounters.

Target (issue 3): validation + de-identification under 60 s and under 4 GB on 2 cores.
Writes bench/results/cohort.json.
Run: .venv/bin/python bench/bench_cohort.py [--patients 400000]

The extract is generated first in a separate process and written to Parquet, so the measured process's
peak memory covers only reading, validating, de-identifying and scanning it, as in the pipeline.
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

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def generate(path: Path, patients: int) -> None:
    from healthml.data.synthetic import synthetic_ehr
    synthetic_ehr(patients, seed=11).to_parquet(path, index=False)


def measure(path: Path) -> dict:
    from healthml.data.cohort import read_cohort, select_cohort, validate_cohort
    from healthml.core.params import parse_params
    from healthml.data.phi import PhiScanner, deidentify_cohort, identifier_values, scan_paths
    params = parse_params(yaml.safe_load((ROOT/"examples/synthetic-ehr/params.yaml").read_text()))
    spec = params.dataset
    t = {}
    t0 = time.perf_counter()
    raw = read_cohort(path)
    cohort, _ = select_cohort(raw, spec)
    del raw
    t["read_and_select"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    clean, result, _ = validate_cohort(cohort, spec, params.validation)
    t["validate"] = time.perf_counter() - t0
    assert result["passed"], result["n_failed"]
    del cohort
    t0 = time.perf_counter()
    deid, record = deidentify_cohort(clean, spec, params.deidentify)
    t["deidentify"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)/"deid.parquet"
        deid.to_parquet(out, index=False)
        t0 = time.perf_counter()
        scanner = PhiScanner(identifier_values(spec, clean))
        scan = scan_paths(scanner, [out], root=Path(d))
        t["phi_scan_of_output"] = time.perf_counter() - t0
    return {"rows": len(clean), "patients": int(clean[spec.patient_id].nunique()), "checks": result["n_checks"],
            "warnings": result["n_warnings"], "identifier_values_searched": len(scanner.values), "scan_passed": scan["passed"],
            "seconds": {k: round(v, 2) for k, v in t.items()},
            "peak_rss_mb": round(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=400_000, help="~2.5 encounters each: 400,000 gives ~1M rows")
    ap.add_argument("--out", type=Path, default=HERE/"results/cohort.json")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate: return generate(a.generate, a.patients)
    if a.measure: return print(json.dumps(measure(a.measure)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d)/"ehr.parquet"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(path), "--patients", str(a.patients)], check=True)
        gen = time.perf_counter() - t0
        r = json.loads(subprocess.run([sys.executable, __file__, "--measure", str(path)], check=True,
                                      capture_output=True, text=True).stdout)
    core = r["seconds"]["validate"] + r["seconds"]["deidentify"]
    result = {"benchmark": "validate (pandera, hard + soft rules) + Safe Harbor de-identification of synthetic encounters",
              **r, "seconds_validate_plus_deidentify": round(core, 2), "seconds_generate_extract": round(gen, 1),
              "target": {"seconds": 60, "peak_rss_mb": 4096},
              "met": core < 60 and r["peak_rss_mb"] < 4096,
              "machine": {"cores": os.cpu_count(), "python": platform.python_version()}}
    from healthml.core.io import write_json
    write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
