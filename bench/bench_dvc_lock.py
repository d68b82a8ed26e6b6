"""Benchmark of DVC's lock-file bookkeeping: what `dvc repro` does to dvc.lock after each stage, as DVC does it and as
`healthml repro` runs DVC (`healthml.cli.dvc_lock`: the lock read by the C parser, each stage's entry re-emitted only
when it changed, the file replaced atomically).

On a copy of this project's dvc.lock (one entry a stage), for each stage in pipeline order, one update of that stage's
entry (a changed output hash, what a rerun writes) through:
- DVC's own `modify_yaml` (ruamel round-trip parse, then a dump of the whole file): the anchor;
- the patched `modify_yaml` that `faster_lock_file` installs, in one process across the updates (as one
  `dvc repro` run makes them).
Both files are compared byte for byte after every run. Reports the seconds of a run's updates (each round a fresh patch,
as each `dvc repro` is a fresh process; the least disturbed of 3 rounds), the median update and the ratio. With --pipeline, also times `dvc repro --force` on a copy of the project both ways
(plain `python -m dvc` and `python -m healthml.cli.dvc_lock`, the stages run cold in both: heavy, run alone).

Writes bench/results/dvc_lock.json.  Run: .venv/bin/python bench/bench_dvc_lock.py [--pipeline]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def updates(lock_path: Path, modify_yaml, stages: list[str], round_: int) -> list[float]:
    "Seconds of each stage's update of its first output's hash through `modify_yaml`."
    out = []
    for i, name in enumerate(stages):
        t0 = time.perf_counter()
        with modify_yaml(str(lock_path)) as data:
            entry = data["stages"][name]
            key = "outs" if entry.get("outs") else "deps"
            entry[key][0]["md5"] = f"{round_:04d}{i:04d}".ljust(32, "0")
        out.append(time.perf_counter() - t0)
    return out


def lock_updates(rounds: int = 3) -> dict:
    """Each round is one run's worth of updates, as a fresh `dvc repro` process makes them: the patch is installed anew
    (its memory of what it wrote is empty), so its first update parses the file and dumps every entry."""
    import dvc.dvcfile as dvcfile
    from dvc.utils.serialize._yaml import parse_yaml
    from healthml.cli.dvc_lock import faster_lock_file

    original = dvcfile.modify_yaml
    text = (ROOT/"dvc.lock").read_text()
    stages = list(parse_yaml(text, "dvc.lock")["stages"])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        plain, fast = Path(tmp)/"plain"/"dvc.lock", Path(tmp)/"fast"/"dvc.lock"
        for p in (plain, fast):
            p.parent.mkdir()
            p.write_text(text)
        for r in range(rounds):
            dvcfile.modify_yaml = original
            assert faster_lock_file()
            patched = dvcfile.modify_yaml
            a = updates(plain, original, stages, r)
            b = updates(fast, patched, stages, r)
            assert plain.read_bytes() == fast.read_bytes(), "the patched lock differs from DVC's"
            runs.append((sum(a), sum(b), a, b))
        dvcfile.modify_yaml = original
    total_plain, total_fast, a, b = min(runs, key=lambda x: x[0] + x[1])     # the round least disturbed by the VM
    return {"lock_bytes": len(text.encode()), "updates_per_run": len(stages), "rounds": rounds, "identical_bytes": True,
            "anchor_dvc_modify_yaml": {"seconds_per_run": round(total_plain, 2), "median_s_per_update": round(statistics.median(a), 4)},
            "healthml": {"seconds_per_run": round(total_fast, 2), "median_s_per_update": round(statistics.median(b), 4),
                         "first_update_s": round(b[0], 4)},
            "ratio_healthml_to_dvc_per_run": round(total_fast / total_plain, 3),
            "seconds_saved_per_run_of_every_stage": round(total_plain - total_fast, 2)}


def pipeline_ab() -> dict:
    "`dvc repro --force` on a copy of the project, DVC as it comes and through healthml.cli.dvc_lock."
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.setdefault("HEALTHML_AUDIT_KEY", "healthml-bench-audit-key")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp)/"project"
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split("\n")
        for f in filter(None, files):
            if (ROOT/f).is_file():
                (proj/f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT/f, proj/f)
        subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
        subprocess.run(["dvc", "repro", "-q"], cwd=proj, check=True, env=env, capture_output=True)   # outputs and cache exist
        for label, cmd in (("dvc", [sys.executable, "-m", "dvc"]), ("healthml_dvc_lock", [sys.executable, "-m", "healthml.cli.dvc_lock"])):
            t0 = time.perf_counter()
            r = subprocess.run([*cmd, "repro", "--force", "-q"], cwd=proj, env=env, capture_output=True, text=True)
            out[label] = {"seconds": round(time.perf_counter() - t0, 1), "exit": r.returncode}
    out["seconds_saved"] = round(out["dvc"]["seconds"] - out["healthml_dvc_lock"]["seconds"], 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", action="store_true", help="also time dvc repro --force both ways (minutes; run alone)")
    ap.add_argument("--out", type=Path, default=HERE/"results/dvc_lock.json")
    a = ap.parse_args()
    result = {"benchmark": "dvc.lock bookkeeping after each stage: DVC's modify_yaml (anchor) vs healthml.cli.dvc_lock",
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "per_stage_update": lock_updates()}
    if a.pipeline: result["dvc_repro_force"] = pipeline_ab()
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
