"""Three public cohorts healthml was not built on, each configured only as a user would: `healthml init <file>`, then
edits to params.yaml (recorded below, and in docs/cohorts.md), then `dvc repro` to a rendered report. No CSV edit.

- `medpar`: Medicare admissions in Arizona (1991) at 54 hospitals, one row per stay, no patient key: multi-site,
  external validation at the largest hospital.
- `rwm5yr`: the German health registry 1984-1988, one row per person and year (700 people sampled, 2,245 rows):
  temporal validation on the later entrants, a train person's later years cut at the boundary.
- `whas500`: the Worcester Heart Attack Study (500 patients) with implausible diastolic pressures (6-29 mmHg, one
  above the systolic): the user states the plausible range, the rows are quarantined and counted.

The data are shipped in `tests/data/cohorts/<name>/` with their licence and provenance; nothing is fetched."""
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, copy_project, run

DATA = ROOT/"tests/data/cohorts"
QUICK = {"evaluate.n_bootstrap": 100, "privacy.n_bootstrap": 50, "privacy.reference_models": 2, "privacy.screen_folds": 3}


def _set(params: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = params
    for k in path: node = node[k]
    if value is DELETE: node.pop(last, None)
    else: node[last] = value


DELETE = object()

# The edits a person made after reading each drafted params.yaml (the review list at its head), as dotted keys.
EDITS = {
    "medpar": {
        "dataset.outcome_description": "death in hospital",
        "dataset.positive_value": [1],
        "dataset.site": "provnum",                                  # the provider number is the hospital: not a predictor
        "dataset.features.provnum": DELETE,
        "dataset.features.type1": DELETE, "dataset.features.type2": DELETE, "dataset.features.type3": DELETE,
        "dataset.excluded_columns.type1": "indicator of type (admission type), a duplicate",
        "dataset.excluded_columns.type2": "indicator of type (admission type), a duplicate",
        "dataset.excluded_columns.type3": "indicator of type (admission type), a duplicate",
        "dataset.sensitive_attributes": {"white": {"column": "white"}, "age80": {"column": "age80"}},
        "split.method": "site", "split.test_site": "30061",            # the largest hospital, held out
        "evaluate.slices": {}, "evaluate.intersections": [],
        "privacy.sensitive_attribute": "white",
    },
    "rwm5yr": {
        "dataset.outcome": "hospvis",                               # the draft chose `outwork` (out of work)
        "dataset.outcome_rule": "> 0",                              # any night in hospital that year, from the count
        "dataset.positive_value": DELETE,
        "dataset.outcome_description": "any day in hospital during the year",
        "dataset.features.hospvis": DELETE,
        "dataset.features.outwork": {"kind": "numeric", "min": 0, "max": 1},
        "dataset.features.docvis": DELETE,
        "dataset.excluded_columns.docvis": "doctor visits during the same year: recorded alongside the outcome, not before it",
        **{f"dataset.features.edlevel{i}": DELETE for i in range(1, 5)},
        **{f"dataset.excluded_columns.edlevel{i}": "indicator of edlevel, a duplicate" for i in range(1, 5)},
        "split.method": "temporal",
        "report.model_name": "rwm5yr-hospital-stay", "tracking.experiment": "rwm5yr-hospital-stay",
        "gate.plan": "rwm5yr-hospital-stay promotion plan v1 (drafted by healthml init)",
    },
    "whas500": {
        "dataset.outcome": "fstat",                                 # the draft chose `cvd` (a history of cardiovascular disease)
        "dataset.outcome_description": "death during follow-up",
        "dataset.features.fstat": DELETE,
        "dataset.features.cvd": {"kind": "numeric", "min": 0, "max": 1},
        "dataset.features.diasbp": {"kind": "numeric", "min": 30, "max": 150, "unit": "mmHg"},   # plausible, not observed
        "dataset.features.sysbp": {"kind": "numeric", "min": 50, "max": 260, "unit": "mmHg"},
        "validation.on_failure": "quarantine",
        "report.model_name": "whas500-death", "tracking.experiment": "whas500-death",
        "gate.plan": "whas500-death promotion plan v1 (drafted by healthml init)",
    },
}


def configure(root: Path, name: str) -> dict:
    "Ship the cohort into the project, `healthml init` it, apply the person's edits; the params as written."
    (root/"data/raw").mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA/name/f"{name}.csv", root/f"data/raw/{name}.csv")
    run(["healthml", "init", f"data/raw/{name}.csv", "--force"], root)
    params = yaml.safe_load((root/"params.yaml").read_text())
    for dotted, value in {**EDITS[name], **QUICK}.items(): _set(params, dotted, value)
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return params


@pytest.fixture(scope="module")
def cohort_runs(tmp_path_factory):
    "Each cohort's project after `dvc repro`, and the run's output (built once, per cohort, when first asked)."
    done = {}
    def get(name):
        if name not in done:
            root = copy_project(tmp_path_factory.mktemp(name)/"project")
            configure(root, name)
            done[name] = root, run(["healthml", "repro"], root, check=False, timeout=900)
        return done[name]
    return get


def report_text(root: Path) -> str:
    "The report's visible text (the page's own CSS and scripts left out)."
    html = re.sub(r"(?is)<(style|script)\b.*?</\1>", " ", (root/"report/validation.html").read_text())
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EDITS))
def test_a_public_cohort_runs_from_init_to_a_rendered_report(cohort_runs, name):
    root, r = cohort_runs(name)
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "unexpectedly" not in out, out
    assert (root/"report/validation.html").exists(), out
    assert r.returncode == 0 or "gate FAILED" in out, out          # the gate may fail; nothing may crash
    text = report_text(root)
    expected = {"medpar": "external validation", "rwm5yr": "temporal validation", "whas500": "internal validation"}[name]
    assert expected in text.lower(), text[:2000]
    assert "Traceback" not in text and "Error" not in text, text[:2000]
    assert "NOT PROVIDED" in text                                   # what only a person can supply is shown missing


@pytest.mark.slow
def test_medpar_is_validated_externally_at_the_held_out_hospital(cohort_runs):
    root, r = cohort_runs("medpar")
    split = json.loads((root/"metrics/split.json").read_text())
    assert split["method"] == "site", split
    text = report_text(root)
    assert re.search(r"external validation at (site )?30061", text, re.I), text[:3000]
    raw = pd.read_csv(DATA/"medpar/medpar.csv")
    assert split["test"]["patients"] == int((raw.provnum == 30061).sum()) == 92, split
    site = [g for g in json.loads((root/"metrics/subgroups.json").read_text())["groups"] if g["group"] == "30061"]
    assert site and all(g["status"].startswith("the whole test split") for g in site), site   # not "insufficient n"


@pytest.mark.slow
def test_rwm5yr_is_split_in_time_with_no_training_row_after_the_test_start(cohort_runs):
    root, r = cohort_runs("rwm5yr")
    raw = pd.read_csv(DATA/"rwm5yr/rwm5yr.csv")
    assert raw.id.nunique() == 700 < len(raw) == 2245                # repeated patients: one row a year
    split = json.loads((root/"metrics/split.json").read_text())
    leakage = json.loads((root/"metrics/leakage.json").read_text())
    assert split["method"] == "temporal", split
    assert not any(leakage["rows_after_start"].values()), leakage
    assert split["test"]["patients"] < split["test"]["rows"], split    # encounter-level: patients < rows
    assert split["rows_dropped_at_time_boundaries"] > 0, split           # train people's later years were cut
    text = report_text(root)
    assert "temporal validation" in text.lower()
    params = yaml.safe_load((root/"params.yaml").read_text())["dataset"]
    assert (params["index_time"], params["index_time_unit"]) == ("year", "year")   # drafted by init, not edited
    assert all(split[s]["index_time"]["unit"] == "year" for s in ("train", "validation", "test")), split
    assert not re.search(r"\bday 19\d\d", text), "a calendar year labelled as a day"


@pytest.mark.slow
def test_whas500_quarantines_the_implausible_pressures_and_counts_them(cohort_runs):
    root, r = cohort_runs("whas500")
    raw = pd.read_csv(DATA/"whas500/whas500.csv")
    bad = int(((raw.diasbp < 30) | (raw.diasbp > 150)).sum())
    assert bad == 10
    validation = json.loads((root/"metrics/validation.json").read_text())
    assert validation["rows_quarantined"] == bad, validation
    assert f"{bad} quarantined" in r.stdout + r.stderr
    assert "lenfol" in yaml.safe_load((root/"params.yaml").read_text())["dataset"]["excluded_columns"]   # drafted by init
