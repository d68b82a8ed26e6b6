"""A tiny cohort, one row per person and no identifier column, configured through params alone: the real pipeline
(`dvc repro`) renders every report section with "insufficient" in place of numbers and fails the gate closed."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import copy_project, run

pytestmark = pytest.mark.slow


def tiny_params(params: dict) -> dict:
    "The project's params with a dataset block for the tiny cohort and nothing tied to the default one."
    params["dataset"] = {
        "name": "tiny", "file": "data/raw/tiny.csv",
        "provenance": {"source": "generated at test time", "version": "1", "licence": "generated; no real person"},
        "patient_id": None,                               # one row per person, no identifier column
        "outcome": "died", "positive_value": 1, "outcome_description": "death",
        "features": {"age": {"kind": "numeric", "min": 18, "max": 100},
                     "sex": {"kind": "categorical", "categories": ["female", "male"]},
                     "lab": {"kind": "numeric", "min": -10, "max": 20}},
        "sensitive_attributes": {"sex": {"column": "sex"}}, "identifiers": {},
        "abstention": {"min_present_fraction": 0.5, "support_margin": 0.1}}
    ev = params["evaluate"]
    ev.update(slices={}, intersections=[], n_bootstrap=20)
    ev["robustness"]["unit_errors"] = {}
    params["models"]["lightgbm"]["n_estimators"] = 20
    params["report"]["model_name"] = params["tracking"]["experiment"] = "tiny"
    params["gate"]["plan"] = "tiny plan"
    return params


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("tiny"))
    rng = np.random.default_rng(3)
    n = 150
    age, lab = rng.integers(20, 90, n), rng.normal(5, 2, n).round(2)
    died = (rng.random(n) < 1 / (1 + np.exp(3.2 - 0.03 * (age - 55) - 0.3 * (lab - 5)))).astype(int)
    pd.DataFrame({"age": age, "sex": rng.choice(["female", "male"], n), "lab": lab, "died": died}).to_csv(root/"data/raw/tiny.csv", index=False)
    (root/"params.yaml").write_text(yaml.safe_dump(tiny_params(yaml.safe_load((root/"params.yaml").read_text())), sort_keys=False))
    return root, run(["healthml", "repro"], root, check=False), int(died.sum())


def test_a_tiny_cohort_without_identifiers_renders_its_report_with_insufficient_in_place_of_numbers(tiny_project):
    root, r, events = tiny_project
    assert events < 20                                                   # few events: the test split holds fewer than 10
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "failed unexpectedly" not in out, out[-3000:]
    assert "! evaluate: every estimate insufficient" in out
    page = (root/"report/validation.html").read_text()
    assert page.count("insufficient") > 10
    for section in ("4. Discrimination", "5. Calibration", "7. Subgroups and fairness", "9. Robustness", "Promotion gate"):
        assert section in page
    assert "one row per person" in page and "Internal validation (random split by patient)" in page
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)\b.*?</\1>", " ", page, flags=re.S))
    assert not re.search(r"\bnan\b|\bNone\b", text)                    # no raw missing value where a number would be
    split = json.loads((root/"metrics/split.json").read_text())
    assert sum(split[s]["patients"] for s in ("train", "validation", "test")) == 150   # each row its own patient


def test_the_gate_fails_closed_on_a_tiny_cohort(tiny_project):
    root, r, _ = tiny_project
    assert r.returncode != 0 and "gate FAILED" in r.stderr
    gate = json.loads((root/"metrics/gate.json").read_text())
    assert gate["verdict"] == "FAIL" and not any(rule["passed"] for rule in gate["rules"])
