"""Outcome rules configured through params.yaml alone: a 3-valued outcome (positive / negative / invalid) on a small
synthetic cohort runs through ingest, validate, de-identify and split with the invalid rows excluded and counted; bad
rules stop with one clear line (no traceback, exit 1)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, run
from healthml.core.layout import Layout

STAGES = ("ingest", "validate", "deidentify", "split")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    "A 250-patient synthetic extract whose outcome is written as text, with 12 rows `invalid`."
    root = tmp_path_factory.mktemp("outcome-rules")
    run(["healthml", "synthetic", "--patients", "250", "--seed", "3", "-o", "data/raw/cohort.csv"], root)
    df = pd.read_csv(root/"data/raw/cohort.csv", dtype=str, keep_default_na=False)
    df["in_hospital_death"] = np.where(df.in_hospital_death == "1", "positive", "negative")
    df.loc[df.index[::max(len(df) // 12, 1)][:12], "in_hospital_death"] = "invalid"
    df.to_csv(root/"data/raw/cohort.csv", index=False)
    return root, df


def write_params(root: Path, **dataset) -> Path:
    "The synthetic example's params, the outcome settings replaced by `dataset`."
    params = yaml.safe_load((ROOT/"examples/synthetic-ehr/params.yaml").read_text())
    params["dataset"].pop("positive_value")
    params["dataset"].update(file="data/raw/cohort.csv", **dataset)
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root/"params.yaml"


def stage(root: Path, name: str):
    "Run one stage; its output (messages go to stderr) as `out`."
    r = run(["healthml", *name.split()], root, check=False)
    r.out = r.stdout + r.stderr
    return r


def test_undefined_outcome_rows_are_excluded_and_counted(cohort):
    root, df = cohort
    write_params(root, positive_value="positive", undefined_values=["invalid"])
    for name in STAGES:
        r = stage(root, name)
        assert r.returncode == 0, (name, r.stdout, r.stderr)
    invalid = int((df.in_hospital_death == "invalid").sum())
    v = json.loads((root/"metrics/validation.json").read_text())
    assert (v["rows"], v["rows_outcome_undefined"], v["rows_kept"]) == (len(df), invalid, len(df) - invalid)
    assert v["outcome"]["undefined"] == {"invalid": invalid}
    assert v["outcome"]["events"] == int((df.in_hospital_death == "positive").sum())
    splits = [pd.read_parquet(Layout(root).split_file(s)) for s in ("train", "validation", "test")]
    dropped = json.loads((root/"metrics/split.json").read_text()).get("rows_dropped_at_time_boundaries", 0)
    assert sum(map(len, splits)) == len(df) - invalid - dropped      # a temporal split cuts rows at its boundaries
    assert set(pd.concat(splits).in_hospital_death.unique()) == {0, 1}


def test_a_three_valued_outcome_without_a_rule_fails_naming_its_values(cohort):
    root, df = cohort
    write_params(root, positive_value="positive")
    assert stage(root, "ingest").returncode == 0
    r = stage(root, "validate")
    counts = df.in_hospital_death.value_counts()
    assert r.returncode == 1 and "Traceback" not in r.out
    line = next(l for l in r.out.splitlines() if "validate failed" in l)
    assert "not binary" in line and all(f"{v} {n:,}" in line for v, n in counts.items()), line
    assert "undefined_values" in r.out


def test_a_rule_failing_on_two_rows_names_two_rows(cohort):
    root, df = cohort
    bad = df.assign(in_hospital_death=np.where(df.in_hospital_death == "positive", "1", "0"))
    bad.loc[bad.index[[3, 7]], "in_hospital_death"] = "pending"
    bad.to_csv(root/"data/raw/two_bad.csv", index=False)
    params = write_params(root, outcome_rule="> 0")
    params.write_text(params.read_text().replace("data/raw/cohort.csv", "data/raw/two_bad.csv"))
    assert stage(root, "ingest").returncode == 0
    r = stage(root, "validate")
    assert r.returncode == 1 and "Traceback" not in r.out
    row = next(l for l in r.out.splitlines() if "comparable by" in l)
    assert row.split()[-3:] == ["2", "4,", "8"], row        # the count of failing rows and their source rows, no values


@pytest.mark.parametrize("rule, says", [("=> 0", "not a comparison"), ({"any_of": [{"column": "x", "op": "~", "value": 1}]}, "unknown operator"),
                                         ("> high", "needs a number")])
def test_an_unreadable_rule_is_one_line_naming_the_key(cohort, rule, says):
    root, _ = cohort
    write_params(root, outcome_rule=rule)
    r = stage(root, "ingest")
    assert r.returncode == 1 and "Traceback" not in r.out
    problem = next(l for l in r.out.splitlines() if says in l)
    assert problem.startswith("dataset.outcome_rule: "), r.out
