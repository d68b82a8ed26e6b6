"""Long fuzz of the scoring service over HTTP: hypothesis-generated request bodies (valid, malformed, hostile; empty,
sparse and unfamiliar records; keys of up to 6,000 characters) sent with a user key to a live `healthml serve` on
loopback; counts every status. Targets (issues 6, 15): never a 5xx; no response echoes an unknown key.

Writes bench/results/fuzz.json.  Run: .venv/bin/python bench/fuzz_serve.py [--requests 10000] [--project DIR]
DIR is a project on which `dvc repro` has run (default: this repository).
"""
import argparse
import collections
import http.client
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from bench_serve import free_port, wait_ready  # bench/ is on sys.path when this script runs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent


def strategies(features: list[str]):
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=40), st.sampled_from(["male", "female", "yes", "no", "metastatic", "white", "", "NaN"]))
    values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
                          max_leaves=8)
    record = st.dictionaries(st.one_of(st.sampled_from(features), st.text(max_size=12)), values, max_size=12)
    valid_ish = st.fixed_dictionaries({f: st.one_of(st.none(), st.floats(-1e3, 1e4)) for f in features[:6]})
    empty = st.just({})
    sparse = st.dictionaries(st.sampled_from(features), st.one_of(st.floats(0, 100), st.sampled_from(["male", "female"])),
                             min_size=1, max_size=3)
    unfamiliar = st.dictionaries(st.sampled_from(features), st.one_of(st.floats(-1e6, 1e6), st.text(min_size=1, max_size=200)),
                                 min_size=1, max_size=len(features))
    oversized = st.dictionaries(st.text(alphabet="abcdefghij KLMNOP.", min_size=200, max_size=6000), scalars, min_size=1, max_size=3)
    records = st.lists(st.one_of(record, valid_ish, empty, sparse, unfamiliar, oversized), max_size=30)
    body = st.one_of(st.fixed_dictionaries({"records": records}), values, st.dictionaries(st.text(max_size=8), values, max_size=4),
                     st.fixed_dictionaries({"records": st.just([{}])}))
    return st.one_of(body.map(lambda b: ("json", b)), st.binary(max_size=400).map(lambda b: ("raw", b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--project", type=Path, default=HERE.parent)
    ap.add_argument("--out", type=Path, default=HERE/"results/fuzz.json")
    a = ap.parse_args()
    root = a.project.resolve()
    manifest = root/json.loads((root/"metrics/report.json").read_text())["report"]/"manifest.json"
    schema = json.loads(subprocess.run([sys.executable, "-c", "import json,sys; from healthml.deploy.serve import RecordScorer, "
                                        f"expected_sha256; s = RecordScorer.from_file({str(root/'models/onnx/lightgbm.onnx')!r}, "
                                        f"expected_sha256({str(manifest)!r}, 'lightgbm.onnx')); print(json.dumps(list(s.schema)))"],
                                       capture_output=True, text=True, check=True).stdout)
    port = free_port()
    log = Path("/tmp")/f"healthml-fuzz-{port}.jsonl"
    key = secrets.token_urlsafe(32)
    proc = subprocess.Popen([str(Path(sys.executable).parent/"healthml"), "serve", "--port", str(port), "--log", str(log),
                             "--max-records", "25"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1", "HEALTHML_API_KEYS": key,
                                 "HEALTHML_LOG_KEY": secrets.token_hex(32)})
    counts, examples_5xx, echoes = collections.Counter(), [], 0
    conn = {"c": None}
    try:
        wait_ready(port, tries=300, timeout=2)

        @settings(max_examples=a.requests, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategies(schema))
        def send(case):
            nonlocal echoes
            kind, body = case
            data = json.dumps(body, allow_nan=True).encode() if kind == "json" else body
            long_keys = [k for r in (body.get("records") if kind == "json" and isinstance(body, dict) else None) or []
                         if isinstance(r, dict) for k in r if isinstance(k, str) and len(k) >= 200]
            if conn["c"] is None: conn["c"] = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn["c"].request("POST", "/v1/predict", data, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
                r = conn["c"].getresponse(); text = r.read().decode("utf-8", "replace")
                counts[r.status] += 1
                echoes += any(k[:40] in text for k in long_keys)
                if r.status >= 500 and len(examples_5xx) < 5: examples_5xx.append(data[:200].decode("utf-8", "replace"))
            except (OSError, http.client.HTTPException):
                counts["connection_error"] += 1
                conn["c"] = None
        t0 = time.perf_counter()
        send()
        seconds = time.perf_counter() - t0
    finally:
        proc.terminate(); proc.wait(10)
    total = sum(counts.values())
    result = {"benchmark": "hypothesis-generated request bodies over HTTP against healthml serve", "requests": total,
              "status_counts": {str(k): v for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))},
              "server_errors_5xx": sum(v for k, v in counts.items() if isinstance(k, int) and k >= 500),
              "connection_errors": counts.get("connection_error", 0), "seconds": round(seconds, 1),
              "examples_of_5xx": examples_5xx, "unknown_keys_echoed": echoes,
              "met": total >= a.requests and not echoes and not any(isinstance(k, int) and k >= 500 for k in counts)}
    from healthml.core.io import write_json
    write_json(a.out, result)
    log.unlink(missing_ok=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
