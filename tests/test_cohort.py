"""Cohort trust: canary identifiers through a full synthetic pipeline, PHI scanning, de-identification,
leakage audit on SUPPORT2, quarantine, spec drafting, and property-based split disjointness."""
import csv
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from types import SimpleNamespace

from conftest import ROOT, clone_project, copy_project, run, shared_dir
from filelock import FileLock
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

# Planted identifiers: one fake patient whose every identifier is a string no output may hold.
CANARY = {"name": "Quintessa Canarywood", "mrn": "MRN90807060", "ssn": "987-65-4329", "phone": "415-555-0199",
          "email": "quintessa.canarywood@example.org", "address": "77 Canary Wharf Lane", "dob": "1931-07-04",
          "city": "Canaryville"}
# Names that are common words (issue 16, item 7): each planted patient's first and last name are words the report's
# own prose and CSS hold, so only the pair is evidence; and a free-text column, drafted as a categorical feature with
# every observed value as a category, whose notes glue identifiers to other text with hyphens, underscores and dots.
COMMON_WORD_NAMES = [("Will", "Black"), ("Mark", "Brown"), ("Three", "Grey"), ("Grey", "Will")]
GLUED_NOTES = ["ref-will-black-123-45-6789", "x_123-45-6780_y", "cc.mark.brown@example.org", "ref_MRN00991234_x",
               "tel.617-555-0142.home", "three-grey-ssn-321-54-9876"]
RESTRICTED = ("data/raw", "data/interim", ".dvc/cache", ".dvc/tmp", ".git")  # hold identifiers by design


def build_synthetic_project(shared: Path) -> Path:
    """The example synthetic-EHR project, with canaries planted, run end to end by `dvc repro`, in `shared`. Built once
    per test run (xdist workers and the prebuild share it through a file lock)."""
    root, record = shared/"synthetic-project", shared/"synthetic-project.json"
    with FileLock(str(shared/"synthetic-project.lock")):
        if not record.exists():
            root.mkdir()
            copy_project(root)
            (root/"params.yaml").write_text((root/"examples/synthetic-ehr/params.yaml").read_text())
            run(["healthml", "synthetic", "--patients", "4000", "--seed", "7", "-o", "data/raw/synthetic_ehr.csv"], root)
            df = pd.read_csv(root/"data/raw/synthetic_ehr.csv", dtype=str, keep_default_na=False)
            canary_rows = df.mrn == df.mrn.iloc[5]          # every encounter of one patient
            for col, value in CANARY.items(): df.loc[canary_rows, col] = value
            df.loc[canary_rows, "age"] = "95.5"             # and over 89
            first_last = df.name.str.split(" ", n=1, expand=True)
            df["first_name"], df["last_name"] = first_last[0], first_last[1]
            df["note"] = np.where(np.arange(len(df)) % 3 == 0, "routine review", "no note")
            planted = df.mrn.drop_duplicates().iloc[10:10 + len(GLUED_NOTES)]
            for i, mrn in enumerate(planted):
                rows, (first, last) = df.mrn == mrn, COMMON_WORD_NAMES[i % len(COMMON_WORD_NAMES)]
                df.loc[rows, ["first_name", "last_name", "name", "note"]] = [first, last, f"{first} {last}", GLUED_NOTES[i]]
            params = yaml.safe_load((root/"params.yaml").read_text())
            params["dataset"]["identifiers"] |= {"first_name": {"kind": "name"}, "last_name": {"kind": "name"}}
            params["dataset"]["features"]["note"] = {"kind": "categorical", "categories": sorted(set(df.note))}
            (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            df.to_csv(root/"data/raw/synthetic_ehr.csv", index=False, quoting=csv.QUOTE_MINIMAL)
            df.to_parquet(shared/"synthetic-planted.parquet")
            r = run(["healthml", "repro"], root, timeout=1500)
            record.write_text(json.dumps({"stdout": r.stdout, "stderr": r.stderr, "returncode": r.returncode}))
    return record


@pytest.fixture(scope="session")
def synthetic_project(tmp_path_factory):
    "The canary project (`build_synthetic_project`); tests only read it."
    shared = shared_dir(tmp_path_factory)
    result = SimpleNamespace(**json.loads(build_synthetic_project(shared).read_text()))
    return shared/"synthetic-project", result, pd.read_parquet(shared/"synthetic-planted.parquet")


def _outputs(root: Path) -> list[Path]:
    "Every file the pipeline wrote outside the restricted zone (not part of the project's source)."
    source = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split("\n"))
    out = []
    for dirpath, _, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        if any(rel == r or rel.startswith(r + "/") for r in RESTRICTED): continue
        out += [Path(dirpath)/f for f in files if (Path(rel)/f).as_posix().lstrip("./") not in source]
    return out


def test_synthetic_cohort_runs_the_whole_pipeline_through_params_alone(synthetic_project):
    root, result, _ = synthetic_project
    stages = re.findall(r"Running stage '(\w+)'", result.stdout)
    assert stages[0] == "ingest" and stages[-2:] == ["phi_scan", "gate"] and "deidentify" in stages
    assert json.loads((root/"metrics/gate.json").read_text())["verdict"] == "PASS"
    split = json.loads((root/"metrics/split.json").read_text())
    assert split["method"] == "temporal"
    assert (root/"report/validation.html").exists() and not (root/"reports").exists()   # rendered; filed only on register


SHAPES = [rb"MRN\d{8}", rb"E\d{9}", rb"\d{3}-\d{2}-\d{4}", rb"\d{3}-555-\d{4}", rb"[\w.+-]+@example\.org",
          rb"(?:19|20)\d\d-\d\d-\d\d", rb"[A-Z][a-z]+ [A-Z][a-z]+", rb"\d+ [A-Z][a-z]+ [A-Z][a-z]+(?: [A-Z][a-z]+)?"]


def test_planted_canaries_and_every_raw_identifier_never_reach_any_output(synthetic_project):
    # Independent of healthml's scanner: exact byte search for the canaries, and every string shaped like
    # one of the generator's identifiers checked against the set of raw identifier values.
    root, _, raw = synthetic_project
    values = set()
    for col in ("mrn", "name", "ssn", "phone", "email", "address", "encounter_id", "dob"):
        values |= set(raw[col].unique())
    values = {v.encode() for v in values}
    shapes = re.compile(b"|".join(SHAPES))
    outputs = _outputs(root)
    assert len(outputs) > 50 and any(p.name == "mlflow.db" for p in outputs)
    leaks = {}
    for p in outputs:
        data = p.read_bytes()
        found = [c for c in CANARY.values() if c.encode() in data]
        found += [m.group() for m in shapes.finditer(data) if m.group() in values]
        if found: leaks[str(p.relative_to(root))] = len(found)
    assert not leaks, leaks
    # the search works: the raw file (restricted zone) is full of them
    data = (root/"data/raw/synthetic_ehr.csv").read_bytes()
    assert CANARY["name"].encode() in data and sum(m.group() in values for m in shapes.finditer(data)) > 10_000


def test_common_word_names_and_glued_identifiers_neither_block_nor_leak(synthetic_project):
    # No false block: the report, PHI scan and gate ran although "will", "black", "three", "mark", "grey" and "brown"
    # (values of the name columns) fill the report's prose and CSS. No leak: no planted pair of names and no glued
    # identifier in any output file (mlflow.db included: every MLflow field), nor in the pipeline's own log.
    root, result, _ = synthetic_project
    assert result.returncode == 0, result.stderr[-2000:]
    scan = json.loads((root/"metrics/phi_scan.json").read_text())
    assert scan["passed"] and scan["mlflow_scanned"]
    pair = lambda a, b: rf"{a}[\W_]{{1,3}}{b}"
    names = "|".join(pair(a, b) + "|" + pair(b, a) for a, b in COMMON_WORD_NAMES)
    planted = re.compile(("(?i)" + names + "|" + "|".join(re.escape(n) for n in GLUED_NOTES)
                          + r"|123-45-678|321-54-9876|mark\.brown@|MRN00991234|617-555-0142").encode())
    leaks = {str(p.relative_to(root)): m.group().decode() for p in _outputs(root)
             for m in [planted.search(p.read_bytes())] if m}
    # dvc.lock copies params.yaml, where this spec (as a careless draft would) declares every note as a category:
    # the user's configuration, not an output healthml derived; it may hold nothing params.yaml does not
    config = {m.group() for m in planted.finditer((root/"params.yaml").read_bytes())}
    lock = {m.group() for m in planted.finditer((root/"dvc.lock").read_bytes())}
    assert lock <= config and leaks.pop("dvc.lock", None) in {None, *(v.decode() for v in lock)}
    assert not leaks, leaks
    assert not planted.search((result.stdout + result.stderr).encode())
    # where the free text went: its unique notes pooled into one level before any split, model, card or report
    actions = json.loads((root/"metrics/deidentify.json").read_text())["actions"]
    pooled = [a for a in actions if a["column"] == "note"]
    assert pooled and pooled[0]["kind"] == "rare category" and pooled[0]["action"].startswith(f"{len(GLUED_NOTES)} level(s)")
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(next((root/"models/onnx").glob("*.onnx")))).metadata_props}
    assert json.loads(meta["training_support"])["note"]["categories"] == ["(other)", "no note", "routine review"]
    assert json.loads(meta["feature_schema"])["note"]["categories"] == ["no note", "routine review", "(other)"]
    # ...and the planted pairs really are in the raw file the pipeline read, so the search above can find them
    assert planted.search((root/"data/raw/synthetic_ehr.csv").read_bytes())


def test_phi_scan_names_the_file_and_place_of_a_leak_but_never_the_value(synthetic_project, tmp_path):
    root = clone_project(synthetic_project[0], tmp_path/"project")
    card = root/"datacard/dataset_card.md"
    original = card.read_bytes()
    card.write_bytes(original + f"\nReviewed with {CANARY['name']} (SSN on file).\n".encode())
    r = run(["healthml", "phi", "scan", "--no-mlflow"], root, check=False)
    assert r.returncode == 1
    assert "datacard/dataset_card.md: line" in r.stderr and "(name)" in r.stderr
    scan = (root/"metrics/phi_scan.json").read_text()
    for leaked in (r.stdout + r.stderr, scan):
        assert CANARY["name"] not in leaked and "Canarywood" not in leaked
    card.write_bytes(original)
    assert run(["healthml", "phi", "scan"], root).returncode == 0


def test_deidentification_generalises_the_canary_patient(synthetic_project):
    root, _, raw = synthetic_project
    deid = pd.read_parquet(root/"data/deid/cohort.parquet")
    assert not {"name", "address", "city", "phone", "email", "ssn"} & set(deid.columns)
    assert deid.age.max() == 90 and deid.dob.max() < 2010 and set(deid.zip.str.len()) == {3}
    assert "000" in set(deid.zip)                                  # restricted 3-digit areas
    record = json.loads((root/"metrics/deidentify.json").read_text())
    assert [o["column"] for o in record["outside_safe_harbor"]] == ["lactate_time", "index_rank"]
    assert record["restricted_zip3"]["version"] == "census-2000/hhs-2012"
    report = root/"report"
    page = (report/"validation.html").read_text()
    assert "De-identification (HIPAA Safe Harbor)" in page and "OUTSIDE" in page
    assert (report/"dataset_card.html").exists()


def test_an_identifier_declared_as_a_feature_never_reaches_the_deidentified_cohort(tmp_path):
    from healthml.data.synthetic import synthetic_ehr
    params = yaml.safe_load((ROOT/"examples/synthetic-ehr/params.yaml").read_text())
    del params["dataset"]["identifiers"]["phone"]
    params["dataset"]["features"]["phone"] = {"kind": "categorical"}   # a mistake a person could make
    (tmp_path/"data/raw").mkdir(parents=True)
    raw = synthetic_ehr(200, seed=1)
    raw.to_csv(tmp_path/"data/raw/synthetic_ehr.csv", index=False)
    (tmp_path/"params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("ingest", "validate"): run(["healthml", stage], tmp_path)
    run(["healthml", "deidentify"], tmp_path)   # every phone number is one patient's: pooled, so the scan is clean
    deid = pd.read_parquet(tmp_path/"data/deid/cohort.parquet")
    assert set(deid.phone.dropna()) == {"(other)"} and not set(raw.phone) & set(deid.phone)
    record = json.loads((tmp_path/"metrics/deidentify.json").read_text())
    assert any(a["column"] == "phone" and a["kind"] == "rare category" for a in record["actions"])
    assert record["scan"]["passed"]
    # the scan still guards the stage: with pooling off (every level kept), the phone numbers are caught
    params["dataset"]["rare_category_min"] = 1
    (tmp_path/"params.yaml").write_text(yaml.safe_dump(params))
    r = run(["healthml", "deidentify"], tmp_path, check=False)
    assert r.returncode == 1 and "suspected identifier(s) remain" in r.stderr


def test_leakage_audit_flags_avtisst_when_it_is_put_back_into_support2(tmp_path):
    root = copy_project(tmp_path)
    params = yaml.safe_load((root/"params.yaml").read_text())
    del params["dataset"]["excluded_columns"]["avtisst"]
    params["dataset"]["features"]["avtisst"] = {"kind": "numeric", "min": 0, "max": 100}
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("ingest", "validate", "deidentify"): run(["healthml", stage], root)
    r = run(["healthml", "split"], root)
    assert "leakage audit: `avtisst` alone has AUROC" in r.stderr
    audit = json.loads((root/"metrics/leakage.json").read_text())
    assert audit["suspected_leakage"] == ["avtisst"] and audit["single_feature_auroc"]["avtisst"] > 0.8
    # the plan's leakage rule blocks promotion on this audit, and passes it only once review accepts avtisst with a reason
    from healthml.core.params import load_params
    from healthml.governance.gate import evaluate_gate
    plan = load_params(root/"params.yaml").gate
    gate = plan.model_copy(update={"rules": [r for r in plan.rules if r.kind == "leakage"]})
    evidence = {"evaluation": {gate.candidate: {"auroc": 0.9}}, "leakage": audit}
    rule = evaluate_gate(gate, evidence)["rules"][0]
    assert rule["status"] == "FAIL" and "`avtisst` alone has train AUROC" in rule["reason"], rule
    gate = gate.model_copy(update={"rules": [gate.rules[0].model_copy(update={"accepted": {"avtisst": "reviewed"}})]})
    assert evaluate_gate(gate, evidence)["rules"][0]["status"] == "pass"


def test_quarantine_sets_failing_rows_aside_with_reasons_and_goes_on(tmp_path):
    root = copy_project(tmp_path)
    params = yaml.safe_load((root/"params.yaml").read_text())
    params["validation"]["on_failure"] = "quarantine"
    params["dataset"]["provenance"]["sha256"] = None
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lines = (root/"data/raw/support2.csv").read_text().splitlines()
    header = lines[0].split(",")
    bad = lines[5].split(","); bad[header.index("hrt")] = "400"          # data row 5
    lines[5] = ",".join(bad)
    lines.append(lines[9])                                              # a duplicated patient: data row 9106
    (root/"data/raw/support2.csv").write_text("\n".join(lines) + "\n")
    run(["healthml", "ingest"], root)
    r = run(["healthml", "validate"], root)
    assert "9104 of 9106 rows passed" in r.stderr and "2 quarantined" in r.stderr
    q = pd.read_parquet(root/"data/interim/quarantine.parquet")
    assert q.source_row.tolist() == [5, 9106]
    assert q.reasons.tolist() == ["hrt: <= 300 beats/min", "sno: unique (one row per patient)"]
    assert len(pd.read_parquet(root/"data/interim/validated.parquet")) == 9104


def test_spec_draft_proposes_a_spec_that_parses(tmp_path):
    r = run(["healthml", "spec", "draft", str(ROOT/"data/raw/support2.csv"), "-o", str(tmp_path/"spec.yaml")], tmp_path)
    assert "item(s) to review" in r.stderr
    text = (tmp_path/"spec.yaml").read_text()
    assert text.startswith("# DRAFT dataset spec")
    from healthml.core.params import parse_params
    spec = parse_params({"dataset": yaml.safe_load(text)["dataset"], "report": {"model_name": "x"}}).dataset
    assert spec.patient_id == "sno" and spec.features["sex"].categories == ["female", "male"]
    from healthml.core.io import sha256_file
    assert spec.provenance.sha256 == sha256_file(ROOT/"data/raw/support2.csv")


# --- property-based: any cohort, any method, no patient in two splits --------------------------------------
@st.composite
def cohorts(draw):
    n_patients = draw(st.integers(30, 200))
    rows_per = draw(st.lists(st.integers(1, 4), min_size=n_patients, max_size=n_patients))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    pid = np.repeat(rng.permutation(n_patients) * 7 + 3, rows_per)
    died = np.repeat((rng.uniform(size=n_patients) < draw(st.floats(0.15, 0.6))).astype(int), rows_per)
    sites = np.repeat(rng.choice(["a", "b", "c"], n_patients), rows_per)
    rank = rng.integers(0, 1000, len(pid))
    return pd.DataFrame({"pid": pid, "died": died, "site": sites, "index_rank": rank, "t": rank})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=cohorts(), method=st.sampled_from(["random", "temporal", "site"]), seed=st.integers(0, 1000))
def test_splits_are_disjoint_by_patient_on_any_cohort(df, method, seed):
    from healthml.core.params import SplitConfig, parse_params
    from healthml.data.split import SPLITS, assert_disjoint, assign_splits
    spec = parse_params({"dataset": {"name": "p", "file": "p.csv", "provenance": {"source": "t"}, "patient_id": "pid",
                                     "outcome": "died", "index_time": "t", "site": "site", "features": {"x": {"kind": "numeric"}}},
                         "report": {"model_name": "p"}}).dataset
    home = df.groupby("pid").site.first()
    if method == "site": assume((home != df.site.iloc[0]).sum() >= 5)
    cfg = SplitConfig(method=method, seed=seed, test_site=df.site.iloc[0] if method == "site" else None,
                      stratify=method == "random" and df.groupby("pid").died.max().value_counts().min() >= 5)
    label = assign_splits(df, spec, cfg)
    assert label.notna().all() and set(label) <= set(SPLITS) | ({"dropped"} if method == "temporal" else set())
    assert_disjoint({s: df[label == s] for s in SPLITS}, "pid")
    kept = label != "dropped"
    assert (label[kept].groupby(df.pid[kept]).nunique() == 1).all()       # one split per patient
    if method == "temporal":
        first = df[kept].groupby("pid").index_rank.min()
        per = label[kept].groupby(df.pid[kept]).first()
        if (per == "test").any() and (per == "train").any():
            assert first[per == "train"].max() <= first[per == "test"].min()
            assert df.index_rank[label == "train"].max() <= df.index_rank[label == "test"].min()  # rows cut: no train row after the test start


def test_a_patient_split_across_part_files_keeps_one_surrogate_key(tmp_path):
    """`dataset.file` may name a folder of Parquet part files. Cut so that patients' encounters fall into different
    part files, it gives the very de-identified cohort the one file gives, and each patient one surrogate key whichever
    file a row came from. This holds by construction today: the data stages run in one process, and a surrogate key is
    a random permutation over the whole (concatenated) key column, drawn once, with no crosswalk kept. De-identifying
    partitions on separate workers would need a keyed scheme instead (not built: issue 19 item 2)."""
    from healthml.core.io import sha256_file
    from healthml.core.layout import Layout
    from healthml.core.params import load_params
    from healthml.data.cohort import ingest, validate
    from healthml.data.phi import deidentify
    from healthml.data.synthetic import synthetic_ehr
    raw = synthetic_ehr(300, seed=4)                                  # rows in admission order: patients recur over time
    cut = np.array_split(np.arange(len(raw)), 4)
    part_of = pd.Series(np.repeat(np.arange(4), [len(c) for c in cut]), index=raw.index)
    spanning = raw.groupby("mrn").apply(lambda g: part_of[g.index].nunique(), include_groups=False)
    assert (spanning > 1).sum() >= 50                                  # many patients have rows in two or more files

    def run_stages(project: Path, file: str) -> pd.DataFrame:
        params = yaml.safe_load((ROOT/"examples/synthetic-ehr/params.yaml").read_text())
        params["dataset"]["file"] = file
        (project/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        p, layout = load_params(project/"params.yaml"), Layout(project)
        record = ingest(p.dataset, layout)
        validate(p.dataset, layout, p.validation)
        deidentify(p.dataset, p.deidentify, layout)
        return record, pd.read_parquet(layout.validated), pd.read_parquet(layout.deidentified)

    one, parts = tmp_path/"one-file", tmp_path/"partitioned"
    (one/"data/raw").mkdir(parents=True)
    raw.to_parquet(one/"data/raw/extract.parquet")
    for i, rows in enumerate(cut):
        (parts/"data/raw/extract"/f"batch={i}").mkdir(parents=True)
        raw.iloc[rows].to_parquet(parts/"data/raw/extract"/f"batch={i}"/"part.parquet")
    record, validated, deid = run_stages(parts, "data/raw/extract")
    assert record["rows"] == len(raw) and record["sha256"] == sha256_file(parts/"data/raw/extract")
    assert validated.source_row.tolist() == list(range(1, len(raw) + 1))   # rows over the files in path order
    mrn = raw.mrn.to_numpy()[validated.source_row.to_numpy() - 1]        # de-identification keeps the row order
    surrogate = deid["mrn"].to_numpy()
    per_patient = pd.DataFrame({"mrn": mrn, "key": surrogate}).groupby("mrn")["key"].nunique()
    assert (per_patient == 1).all() and pd.Series(surrogate).nunique() == raw.mrn.nunique()
    assert not set(raw.mrn) & set(deid["mrn"].astype(str))
    _, _, deid_one = run_stages(one, "data/raw/extract.parquet")
    pd.testing.assert_frame_equal(deid, deid_one)                        # the same de-identified cohort as the one file


def test_arrow_csv_reader_gives_exactly_what_pandas_reads(tmp_path):
    """The fast CSV path (pyarrow) on the synthetic EHR extract as `healthml synthetic` writes it: the same frame as
    pandas, values and dtypes; SUPPORT2's file (spaces after commas) is left to pandas and reads as before."""
    from healthml.data.cohort import _arrow_csv, read_cohort
    from healthml.data.synthetic import synthetic_ehr
    path = tmp_path / "synthetic_ehr.csv"
    path.write_text(synthetic_ehr(6000, seed=7).to_csv(index=False))
    assert path.stat().st_size > 1 << 20                        # large enough for the fast path
    fast = _arrow_csv(path, ",", ".")
    assert fast is not None
    pandas_read = pd.read_csv(path, skipinitialspace=True, encoding="utf-8", low_memory=False)
    pd.testing.assert_frame_equal(fast, pandas_read, check_exact=True)
    assert (read_cohort(path).drop(columns="source_row").columns == pandas_read.columns).all()
    support2 = ROOT / "data/raw/support2.csv"
    assert _arrow_csv(support2, ",", ".") is None
    pd.testing.assert_frame_equal(read_cohort(support2).drop(columns="source_row"),
                                  pd.read_csv(support2, skipinitialspace=True, low_memory=False).rename(columns=lambda c: c.replace(".", "_")),
                                  check_exact=True)
