"""`healthml init` on a cohort healthml has never seen, then `dvc repro` with no edit; the draft's ranges on SUPPORT2;
params left over from another cohort stop a command at their key."""

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, copy_project, run, set_params

HOSPITALS = {"north": "St Mary Hospital", "south": "Riverside Medical Center", "east": "Hope Community Clinic",
             "west": "Lakeside Health Centre"}
STAGES = ("ingest", "validate", "deidentify", "split", "datacard", "train", "evaluate", "export", "footprint", "report", "phi scan")


def unseen_cohort(n_patients: int = 250, seed: int = 3) -> pd.DataFrame:
    """An encounter-level cohort shaped unlike SUPPORT2: outcome `died`, a `sex` column, hospitals named in `hospital_name`,
    free-text notes, three ages coded 999, a result's turnaround time (known only afterwards), a name and a phone."""
    from healthml.data.synthetic import synthetic_ehr
    rng = np.random.default_rng(seed)
    df = synthetic_ehr(n_patients, seed=seed).rename(columns={"in_hospital_death": "died", "site": "hospital_name"})
    df = df.drop(columns=["address", "city", "zip", "email", "ssn", "dob"])
    df["hospital_name"] = df.hospital_name.map(HOSPITALS)
    complaints = ["chest pain", "shortness of breath", "fever and cough", "abdominal pain", "confusion", "a fall at home"]
    df["notes"] = [f"Seen at triage with {rng.choice(complaints)}; onset {rng.integers(1, 72)} hours ago, review {i}"
                   for i in range(len(df))]
    df["result_turnaround_hours"] = np.round(rng.gamma(2, 3, len(df)) + 20 * df.died, 1)
    df.loc[df.sample(3, random_state=seed).index, "age"] = 999
    return df


@pytest.mark.slow
def test_init_then_dvc_repro_runs_an_unseen_cohort_without_an_edit(tmp_path):
    root = copy_project(tmp_path/"project")
    unseen_cohort().to_csv(root/"data/raw/icu.csv", index=False)
    r = run(["healthml", "init", "data/raw/icu.csv"], root, check=False)
    assert r.returncode == 1 and "params.yaml exists" in r.stderr and "--force" in r.stderr   # never over a project's params
    assert "no dvc.yaml" not in run(["healthml", "init", "data/raw/icu.csv", "--force"], root).stderr
    r = run(["healthml", "init", "data/raw/icu.csv", "--dir", str(tmp_path/"elsewhere")], root)   # a folder that is no project:
    assert "has no dvc.yaml, so `dvc repro` cannot run there" in " ".join(r.stderr.split()), r.stderr  # said, with the way out
    text = (root/"params.yaml").read_text()
    p = yaml.safe_load(text)
    ds = p["dataset"]
    # the draft's choices
    assert (ds["outcome"], ds["patient_id"], ds["row_id"], ds["index_time"], ds["site"]) == \
        ("died", "mrn", "encounter_id", "admit_time", "hospital_name")
    assert {"notes", "result_turnaround_hours"} <= set(ds["excluded_columns"])
    assert "notes" not in ds["features"] and "hospital_name" not in ds["features"]
    assert ds["identifiers"]["name"] == {"kind": "name"} and ds["identifiers"]["phone"] == {"kind": "phone"}
    assert "hospital_name" not in ds["identifiers"]                            # a hospital is not a person
    assert ds["features"]["age"]["max"] < 999 and "3 row(s) hold 999" in text  # the code is flagged, not kept as observed
    assert set(ds["sensitive_attributes"]) == {"sex", "age_band"}
    # nothing left over from SUPPORT2
    assert p["report"]["model_name"] == p["tracking"]["experiment"] == "icu-died"
    assert p["evaluate"]["slices"] == {"site": {"column": "hospital_name"}} and p["evaluate"]["robustness"]["unit_errors"] == {}
    assert "support2" not in text.lower() and "dzclass" not in text and "crea:" not in text
    # a user lowers the bootstrap to look quickly, then runs the pipeline
    set_params(root, **{"evaluate.n_bootstrap": 50})
    r = run(["dvc", "repro"], root, check=False, timeout=900)
    out = r.stdout + r.stderr
    assert "unexpectedly" not in out and "Traceback" not in out, out
    for stage in STAGES: assert f"✓ {stage}:" in out, (stage, out)
    assert "3 quarantined" in out                                              # the three coded ages, set aside and counted
    assert r.returncode == 0 or "gate FAILED under plan 'icu-died promotion plan v1" in out, out
    # the draft's open items reach the report, each NOT PROVIDED until a person checks it (governance/model_review.yaml)
    drafted = yaml.safe_load((root/"governance/model_review.yaml").read_text())["draft_review"]
    assert drafted and all(d["checked"] == "" for d in drafted)
    import html
    page = html.unescape((root/"report/validation.html").read_text())
    assert all(f"Drafted by healthml init: {d['item']}" in page for d in drafted)


def test_the_draft_of_support2_accepts_every_row_of_support2():
    from healthml.core.params import parse_params
    from healthml.data.cohort import SOURCE_ROW, read_cohort, validate_cohort
    from healthml.data.spec_draft import draft_cohort, spec_yaml
    d = draft_cohort(ROOT/"data/raw/support2.csv")
    assert d.flagged_rows == 0
    spec = parse_params({"dataset": yaml.safe_load(spec_yaml(d.spec, d.review))["dataset"], "report": {"model_name": "x"}}).dataset
    assert spec.outcome in ("death", "hospdead") and "sex" not in (spec.outcome,)
    df = read_cohort(ROOT/"data/raw/support2.csv")
    _, result, quarantined = validate_cohort(df.drop(columns=SOURCE_ROW), spec)
    assert result["passed"] and result["rows_kept"] == len(df) == 9105 and len(quarantined) == 0, result


def test_a_setting_left_from_another_cohort_stops_a_stage_at_its_key(tmp_path):
    root = tmp_path
    unseen_cohort(40).to_csv(root/"icu.csv", index=False)
    run(["healthml", "init", "icu.csv"], root)
    p = yaml.safe_load((root/"params.yaml").read_text())
    p["evaluate"]["slices"]["disease_class"] = {"column": "dzclass"}
    p["evaluate"]["robustness"]["unit_errors"] = {"crea": 88.4}
    (root/"params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for stage in ("datacard", "evaluate"):
        r = run(["healthml", stage], root, check=False)
        assert r.returncode == 1 and "unexpectedly" not in r.stderr, r.stderr
        assert "evaluate.slices.disease_class.column: 'dzclass' is not a column of the dataset spec" in r.stderr, r.stderr
        assert "evaluate.robustness.unit_errors.crea: 'crea' is not a feature of the dataset spec" in r.stderr, r.stderr
