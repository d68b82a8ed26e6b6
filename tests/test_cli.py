"""The `healthml` command as a user meets it: help, bad params, bad cohort files."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, run

SUBCOMMANDS = ["ingest", "validate", "split", "train", "evaluate", "export", "report"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_stage_has_help(cmd, tmp_path):
    r = run(["healthml", cmd, "--help"], tmp_path)
    assert "--params" in r.stdout and "Usage" in r.stdout


def _project(tmp_path: Path, csv_text: str | None = None, **dataset) -> Path:
    "A tiny project: params.yaml from the real one, pointing at `cohort.csv`."
    params = yaml.safe_load((ROOT/"params.yaml").read_text())
    params["dataset"].update(file="cohort.csv", **dataset)
    params["dataset"]["provenance"]["sha256"] = None
    (tmp_path/"params.yaml").write_text(yaml.safe_dump(params))
    if csv_text is not None: (tmp_path/"cohort.csv").write_text(csv_text)
    return tmp_path


def _support2_rows(n=400) -> pd.DataFrame:
    "A random sample of SUPPORT2 (the first rows come from sites that did not record some labs)."
    df = pd.read_csv(ROOT/"data/raw/support2.csv", skipinitialspace=True)
    return df.sample(n, random_state=0).reset_index(drop=True)


def test_bad_params_key_is_named_and_exits_1(tmp_path):
    params = yaml.safe_load((ROOT/"params.yaml").read_text())
    params["split"]["tset_size"] = 0.3
    params["models"]["lightgbm"]["learning_rate"] = "fast"
    (tmp_path/"params.yaml").write_text(yaml.safe_dump(params))
    r = run(["healthml", "split"], tmp_path, check=False)
    assert r.returncode == 1
    assert "split.tset_size: unknown key" in r.stderr
    assert "models.lightgbm.learning_rate" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_out_of_range_lab_stops_validation_naming_row_and_rule(tmp_path):
    df = _support2_rows()
    df.loc[6, "sod"] = 250          # sodium 250 mmol/L: row 7 of the file
    df["age"] = df["age"].astype(object)
    df.loc[9, "age"] = "unknown"    # a non-number: row 10
    df.to_csv(tmp_path/"cohort.csv", index=False)
    _project(tmp_path)
    run(["healthml", "ingest"], tmp_path)
    r = run(["healthml", "validate"], tmp_path, check=False)
    assert r.returncode == 1
    lines = r.stderr
    assert "sod" in lines and "<= 200 mmol/L" in lines and " 7" in lines
    assert "age" in lines and "numeric" in lines and "10" in lines
    assert "250" not in lines and "unknown" not in lines  # rows, never values
    assert "Traceback" not in lines
    assert not (tmp_path/"data/interim/validated.parquet").exists()  # nothing half-made for the next stage
    result = json.loads((tmp_path/"metrics/validation.json").read_text())
    assert result["passed"] is False and result["n_failed"] == 2


def test_missing_column_is_named(tmp_path):
    _support2_rows().drop(columns=["crea"]).to_csv(tmp_path/"cohort.csv", index=False)
    _project(tmp_path)
    r = run(["healthml", "ingest"], tmp_path, check=False)
    assert r.returncode == 1 and "lacks column(s) the spec needs: crea" in r.stderr
    assert not (tmp_path/"data/interim/cohort.parquet").exists()


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("sno,age\n", "no rows"),
    (b"sno,name\n1,Jos\xe9\n", "not UTF-8"),
    ("sno,age,hospdead\n1,2,0\n3,4,5,6,7\n", "line 3 has 5 fields"),
    ("sno,age,age\n1,2,3\n", "duplicated column names: age"),
])
def test_broken_cohort_files_give_one_clear_error(tmp_path, content, message):
    p = tmp_path/"cohort.csv"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    _project(tmp_path)
    r = run(["healthml", "ingest"], tmp_path, check=False)
    assert r.returncode == 1, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_a_different_extract_than_the_pinned_one_is_refused(tmp_path):
    shutil.copy(ROOT/"data/raw/support2.csv", tmp_path/"cohort.csv")
    with open(tmp_path/"cohort.csv", "a") as f: f.write("\n")
    params = yaml.safe_load((ROOT/"params.yaml").read_text())
    params["dataset"]["file"] = "cohort.csv"
    (tmp_path/"params.yaml").write_text(yaml.safe_dump(params))
    r = run(["healthml", "ingest"], tmp_path, check=False)
    assert r.returncode == 1 and "params.yaml pins" in r.stderr
    from healthml.core.io import sha256_file   # the hint gives the whole digest, to paste once the extract is reviewed
    assert f"dataset.provenance.sha256: {sha256_file(tmp_path/'cohort.csv')}" in " ".join(r.stderr.split()), r.stderr


# A Python file object whose methods and release record when one of Arrow's native threads calls them, and whose
# release there then waits a second: long enough for the main thread to reach interpreter shutdown. Before
# `read_parquet`, pandas handed Arrow such a handle; an Arrow scan thread dropping it after the read returned, during
# shutdown, aborted the process ("terminate called without an active exception", exit -6) after the stage's ✓.
LATE_RELEASE = """
import builtins, io, sys, threading, time
from healthml.core.io import read_parquet, write_parquet
import pandas as pd
real_open, from_arrow = builtins.open, []
class Watched(io.BufferedReader):
    def _arrow(self, what):
        if threading.current_thread() is not threading.main_thread(): from_arrow.append(what); return True
    def read(self, *a): self._arrow("read"); return super().read(*a)
    def seek(self, *a): self._arrow("seek"); return super().seek(*a)
    def __del__(self):
        if self._arrow("release"): time.sleep(1)
def watched_open(file, mode="r", *a, **k):
    if str(file).endswith(".parquet") and mode == "rb": return Watched(io.FileIO(file, "rb"))
    return real_open(file, mode, *a, **k)
builtins.open = watched_open
path = write_parquet(sys.argv[1], pd.DataFrame({"age": range(500), "sex": ["f", "m"] * 250}))
for _ in range(100):
    assert len(read_parquet(path)) == 500
    if "release" in from_arrow: break
print("calls from Arrow threads:", len(from_arrow))
"""


def test_reading_parquet_leaves_no_python_object_to_arrow_threads_at_exit(tmp_path):
    "The read every stage uses: Arrow's threads never call into Python, so the process ends with exit 0, whatever the timing."
    import subprocess, sys
    r = subprocess.run([sys.executable, "-c", LATE_RELEASE, str(tmp_path/"x.parquet")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "terminate called" not in r.stderr, (r.returncode, r.stderr)
    assert "calls from Arrow threads: 0" in r.stdout, r.stdout
