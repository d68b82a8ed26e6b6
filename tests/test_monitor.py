"""Production monitoring: each kind of dataset shift is caught by the monitor that can see it, nothing is flagged
when nothing changed (false-alarm rate over 20 seeds), and `healthml monitor` files a report a scheduler and a
compliance reader can use, with no identifier in it."""
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BIN, ROOT, open_page, run

from healthml.core.params import MonitorConfig, load_params
from healthml.deploy.monitor import OUTCOME, PATIENT, RISK, compare_windows, known_categories, outcome_monitors, summarise
from healthml.deploy.monitor_scenarios import SCENARIOS, caught, synthetic_setup, synthetic_window

CANARY_NAME, CANARY_KEY = "Quillon Zebrowski-Fairweather", "CANARY-PT-7731904"
GLUED_SSN = "ref-ann-lee-123-45-6789"


@pytest.fixture(scope="module")
def synthetic():
    params = load_params(ROOT/"examples/synthetic-ehr/params.yaml")
    return params, *synthetic_setup(params, 4000, seed=0)


def monitor_window(synthetic, key, seed):
    params, ref, threshold, scored = synthetic
    cur = summarise(scored(synthetic_window(key, 4000, seed)), params.dataset, params.monitor, known_categories(ref))
    return compare_windows(ref, cur, threshold, params.monitor, key, report=False, window_file=f"data/live/{key}.csv")[0]


@pytest.mark.slow
def test_no_change_raises_no_alert_in_at_least_19_of_20_seeds(synthetic):
    alarms = {seed: [a["message"] for a in monitor_window(synthetic, "a-no-change", 1000 + seed)["alerts"]] for seed in range(20)}
    false_alarms = [s for s, a in alarms.items() if a]
    print(f"false-alarm rate: {len(false_alarms)}/20")
    assert len(false_alarms) <= 1, {s: alarms[s] for s in false_alarms}


@pytest.mark.slow
@pytest.mark.parametrize("key", ["b-covariate-shift", "c-prevalence-shift", "d-concept-shift", "e-pipeline-break"])
def test_each_kind_of_shift_is_flagged_by_the_monitor_that_can_see_it(synthetic, key):
    for seed in (2000, 2001):
        result = monitor_window(synthetic, key, seed)
        fired = {a["monitor"] for a in result["alerts"]}
        assert caught(key, result), (key, seed, fired)
        if key == "b-covariate-shift":
            assert any(a["feature"] == "age" for a in result["alerts"] if a["monitor"] == "feature drift")
        if key == "e-pipeline-break":
            dq = {(a["feature"], a["statistic"]) for a in result["alerts"] if a["monitor"] == "data quality"}
            assert {("creatinine", "out-of-range fraction"), ("albumin", "missing fraction rise")} <= dq
            assert result["recommendation"]["action"] == "fix the data feed" and result["recommendation"]["command"] is None
        if key in ("c-prevalence-shift", "d-concept-shift"):
            assert result["recommendation"]["command"].startswith(f"healthml retrain prepare --window data/live/{key}.csv")


def test_concept_shift_is_invisible_without_outcomes(synthetic):
    "Same inputs, different outcome relationship: until outcomes arrive no input monitor can see it, and none pretends to."
    params, ref, threshold, scored = synthetic
    window = scored(synthetic_window("d-concept-shift", 4000, 2003)).drop(columns=params.dataset.outcome)
    result = compare_windows(ref, summarise(window, params.dataset, params.monitor, known_categories(ref)), threshold, params.monitor, report=False)[0]
    assert result["status"] == "ok" and result["outcomes"]["status"].startswith("no outcomes")


def outcome_frame(events: int, n: int, seed: int) -> pd.DataFrame:
    "A window as the outcome monitors see it: outcomes, patients and risks (risk higher for events, as a model gives)."
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(events), np.zeros(n - events)]
    return pd.DataFrame({OUTCOME: y, PATIENT: np.arange(n), RISK: 1 / (1 + np.exp(-(rng.normal(-1, 1, n) + 1.5 * y)))})


def test_a_large_certain_change_in_few_events_alerts_and_a_tiny_noisy_window_does_not():
    "Issue 14: deaths 5.0% in a window against 29.9% in development, on fewer than 20 events, was 'not enough outcomes'."
    cfg = MonitorConfig()
    ref = outcome_frame(299, 1000, seed=1)
    out, alerts = outcome_monitors(ref, outcome_frame(10, 200, seed=2), (299, 1000), (10, 200), cfg)
    prevalence = out["prevalence"]
    lo, hi = prevalence["change_ci"]
    print(f"5.0% vs 29.9% on 10 events: change {prevalence['change']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f}")
    assert prevalence["alert"] and hi < -0.15 and [a["monitor"] for a in alerts] == ["prevalence"]
    assert prevalence["events"] == {"current": 10, "reference": 299} and prevalence["known"]["current"] == 200
    assert out["status"].startswith("outcome rate only") and "10 events" in out["status"]   # AUROC and calibration say why not
    for events, n in ((2, 5), (0, 4), (1, 3), (3, 12)):                                      # tiny, noisy: no alert
        out, alerts = outcome_monitors(ref, outcome_frame(events, n, seed=3), (299, 1000), (events, n), cfg)
        assert not alerts and not out["prevalence"]["alert"], (events, n, out["prevalence"]["change_ci"])
    out, _ = outcome_monitors(ref, outcome_frame(300, 1000, seed=4), (299, 1000), (300, 1000), cfg)
    assert {k: out[k]["events"]["current"] for k in ("auroc", "calibration_intercept", "calibration_slope")} == \
        {"auroc": 300, "calibration_intercept": 300, "calibration_slope": 300}             # every statistic says what it rests on


def support2_window(root: Path, rows: int = 1200) -> pd.DataFrame:
    "Raw SUPPORT2 rows as an EHR extract sends them (raw column names, raw ages), plus planted identifiers."
    raw = pd.read_csv(root/"data/raw/support2.csv").tail(rows).reset_index(drop=True)
    raw["patient_name"] = CANARY_NAME
    raw["sno"] = [f"{CANARY_KEY}-{i}" for i in range(len(raw))]
    return raw


def all_output_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def test_monitor_cli_files_a_report_and_exit_code_tells_the_scheduler(project_clone, tmp_path):
    root = project_clone
    window = support2_window(root)
    window.to_csv(tmp_path/"ward_2026_11.csv", index=False)
    broken = window.copy()
    broken["crea"] *= 88.4                                              # creatinine sent in umol/L
    broken.loc[:199, "race"] = CANARY_NAME                              # a name typed into a coded field
    broken.loc[200:399, "dzgroup"] = GLUED_SSN                          # free text glued to an SSN
    for i, rows in enumerate(np.array_split(np.arange(len(broken)), 3)):   # delivered partitioned: three part files, one folder
        (tmp_path/"ward_2026_12"/f"part={i}").mkdir(parents=True)
        broken.iloc[rows].to_parquet(tmp_path/"ward_2026_12"/f"part={i}"/"data.parquet", index=False)

    r = run([str(BIN/"healthml"), "monitor", "--current", str(tmp_path/"ward_2026_11.csv")], root, check=False)
    assert r.returncode in (0, 3, 4), r.stderr
    today = datetime.now(timezone.utc).date().isoformat()
    folder = root/"reports/monitoring"/today/"ward_2026_11"
    result = json.loads((folder/"monitor.json").read_text())
    assert r.returncode == {"ok": 0, "warning": 3, "critical": 4}[result["status"]]
    assert {"monitoring.html", "evidently.html", "monitoring.ipynb"} <= {p.name for p in folder.iterdir()}
    assert result["windows"]["current"]["rows"] == 1200 and result["outcomes"]["status"] == "ok"
    assert set(result["drift"]) >= set(load_params(root/"params.yaml").dataset.features) | {"predicted_risk"}

    r = run([str(BIN/"healthml"), "monitor", "--current", str(tmp_path/"ward_2026_12")], root, check=False)
    assert r.returncode == 4, r.stderr                                  # critical: a scheduler pages someone
    assert "retrain prepare" not in r.stderr                            # never retrain on a broken feed
    assert "crea" in r.stderr and "outside the plausible range" in r.stderr and "Traceback" not in r.stderr
    broken_result = json.loads((root/"reports/monitoring"/today/"ward_2026_12/monitor.json").read_text())
    assert broken_result["windows"]["current"]["rows"] == 1200                 # every part read
    alert = next(a for a in broken_result["alerts"] if a["feature"] == "crea" and a["monitor"] == "data quality")
    assert alert["severity"] == "critical" and alert["statistic"] == "out-of-range fraction" and alert["value"] > 0.9
    assert alert["threshold"] == 0.01 and broken_result["recommendation"]["action"] == "fix the data feed"
    for col in ("race", "dzgroup"):                                     # counted as one unseen level, never named
        assert "(unseen category) 17%" in broken_result["drift"][col]["current"]

    assert result["overlap"]["duplicate_rows"] == 1200 and result["warnings"] == [result["overlap"]["text"]]  # rows of the development file
    assert "overlaps the data the model was developed on" in r.stderr + (folder/"monitoring.html").read_text()
    assert not result["maturity"]["checked"] and "not checked" in result["maturity"]["text"]   # SUPPORT2 declares no horizon

    (tmp_path/"other_site").mkdir()                                     # another window with the same file name, the same day
    window.head(600).to_csv(tmp_path/"other_site/ward_2026_11.csv", index=False)
    run([str(BIN/"healthml"), "monitor", "--current", str(tmp_path/"other_site/ward_2026_11.csv")], root, check=False)
    second = json.loads((folder.with_name("ward_2026_11-2")/"monitor.json").read_text())
    assert second["windows"]["current"]["rows"] == 600 and json.loads((folder/"monitor.json").read_text()) == result

    index = (root/"reports/index.html").read_text()
    assert f'href="monitoring/{today}/ward_2026_11/monitoring.html"' in index and "ward_2026_12" in index
    assert f'href="monitoring/{today}/ward_2026_11-2/monitoring.html"' in index
    for name in ("ward_2026_11", "ward_2026_12"):                     # the planted identifiers reached no output
        text = all_output_text(root/"reports/monitoring"/today/name)
        assert CANARY_NAME not in text and CANARY_KEY not in text and "123-45-6789" not in text
    assert CANARY_KEY not in r.stderr + r.stdout and CANARY_NAME not in r.stderr + r.stdout
    assert "123-45-6789" not in r.stderr + r.stdout


def test_monitor_report_renders_offline_in_chromium(project_clone, browser, tmp_path):
    root = project_clone
    support2_window(root, 800).to_csv(tmp_path/"ward_render.csv", index=False)
    run([str(BIN/"healthml"), "monitor", "--current", str(tmp_path/"ward_render.csv"), "--out", str(tmp_path/"report")],
        root, check=False)
    page, errors, requests = open_page(browser, tmp_path/"report/monitoring.html")
    for title in ("1. What to do", "2. Alerts", "3. Feature and prediction drift", "4. Predicted risk and alert rate",
                  "5. Outcomes: rate, discrimination, calibration", "6. Data quality", "7. Method"):
        assert page.get_by_role("heading", name=title).is_visible(), title
    assert page.evaluate("Array.from(document.images).filter(i => i.naturalWidth > 100).length") >= 2
    assert re.search(r"Status: (OK|WARNING|CRITICAL)", page.inner_text("body"))
    assert errors == [] and all(u.startswith(("file:", "data:")) for u in requests)
    ev, ev_errors, ev_requests = open_page(browser, tmp_path/"report/evidently.html")
    ev.wait_for_timeout(1500)
    assert "age" in ev.inner_text("body") and ev_errors == []
    assert all(u.startswith(("file:", "data:")) for u in ev_requests), ev_requests[:3]


def test_a_prediction_log_window_runs_the_prediction_monitors_only(project_clone, tmp_path):
    root = project_clone
    from healthml.modelling.scoring import OnnxScorer
    test = pd.read_parquet(root/"data/processed/test.parquet")
    risks = OnnxScorer(root/"models/onnx/lightgbm.onnx").predict_proba(test) * 1.6     # the service now scores everyone higher
    log = tmp_path/"predictions.jsonl"
    log.write_text("".join(json.dumps({"time": f"2026-11-{1 + i % 28:02d}T10:00:00.000+00:00", "risk": float(min(p, 1.0))}) + "\n"
                           for i, p in enumerate(risks)))
    r = run([str(BIN/"healthml"), "monitor", "--current", str(log), "--since", "2026-11-01", "--until", "2026-11-15",
             "--out", str(tmp_path/"log_report")], root, check=False)
    result = json.loads((tmp_path/"log_report/monitor.json").read_text())
    assert result["data_quality"] is None and "prediction log" in result["notes"][0]
    assert {a["monitor"] for a in result["alerts"]} <= {"prediction drift", "alert rate"}
    assert {"prediction drift", "alert rate"} & {a["monitor"] for a in result["alerts"]}
    n_window = sum(1 for i in range(len(risks)) if 1 + i % 28 < 15)
    assert result["windows"]["current"]["rows"] == n_window and r.returncode == 3
    assert result["recommendation"]["command"] is None and "retrain prepare" not in r.stderr


def test_bad_windows_get_a_clear_error_and_no_report(project_clone, tmp_path):
    root = project_clone
    r = run([str(BIN/"healthml"), "monitor", "--current", str(tmp_path/"missing.csv")], root, check=False)
    assert r.returncode == 1 and "missing.csv not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path/"bad.jsonl"
    bad.write_text('{"time": "2026-11-01T00:00:00+00:00", "risk": 0.1}\nnot json\n')
    r = run([str(BIN/"healthml"), "monitor", "--current", str(bad), "--out", str(tmp_path/"never")], root, check=False)
    assert r.returncode == 1 and "line 2" in r.stderr and not (tmp_path/"never").exists()


def test_monitor_demo_on_support2_flags_every_scenario_as_expected(project_clone):
    root = project_clone
    index_before = (root/"reports/index.html").read_bytes() if (root/"reports/index.html").exists() else None
    r = run([str(BIN/"healthml"), "monitor", "demo", "--dataset", "support2"], root)
    assert "5 of 5 scenarios flagged as expected" in r.stderr
    for key in SCENARIOS:
        result = json.loads((root/"reports/monitoring-demo"/f"support2-{key}/monitor.json").read_text())
        assert result["scenario"]["caught"] and caught(key, result), (key, result["alerts"])
    assert not (root/"reports/monitoring").exists()                    # the demo never files into production monitoring...
    index_after = (root/"reports/index.html").read_bytes() if (root/"reports/index.html").exists() else None
    assert index_after == index_before                                  # ...nor touches its index


def ward_with_more_deaths(root: Path, n: int = 800) -> pd.DataFrame:
    "A new window as an EHR extract sends it: half deaths (prevalence shift), new patient keys, ages recorded a little later."
    raw = pd.read_csv(root/"data/raw/support2.csv").tail(3000)
    window = pd.concat([raw[raw.hospdead == 1].head(n // 2), raw[raw.hospdead == 0].head(n // 2)]).sample(frac=1, random_state=0)
    return window.assign(age=window.age + 0.37, sno=9_100_001 + np.arange(len(window))).reset_index(drop=True)


def test_the_retrain_command_the_monitor_prints_runs_as_printed(project_clone, tmp_path):
    "Issue 14: the printed retraining step failed at ingest (pinned hash) and would have trained on the window alone."
    import shlex
    root = project_clone
    ward_with_more_deaths(root).to_csv(tmp_path/"ward_2027_01.csv", index=False)
    r = run([str(BIN/"healthml"), "monitor", "--current", str(tmp_path/"ward_2027_01.csv"), "--out", str(tmp_path/"report")],
            root, check=False)
    assert (tmp_path/"report/monitor.json").exists(), r.stderr
    result = json.loads((tmp_path/"report/monitor.json").read_text())
    assert "prevalence" in {a["monitor"] for a in result["alerts"]}, r.stderr
    command = result["recommendation"]["command"]
    assert command.startswith("healthml retrain prepare --window ") and command in r.stderr
    prepared = run(shlex.split(command), root)                         # step 1, exactly as printed
    experiment = prepared.stdout.strip()
    record = json.loads(next((root/"data/raw/retrain").glob("*.json")).read_text())
    assert experiment == record["command"] and experiment.startswith("healthml warm dvc exp run -n retrain-ward_2027_01-")
    assert f"-S dataset.file={record['file']} -S dataset.provenance.sha256={record['sha256']}" in experiment
    assert record["rows"]["development"] == 9105 and 780 <= record["rows"]["added"] <= 800   # top-coded ages repeat a few rows
    assert not run(["git", "status", "--porcelain", "data/raw/retrain"], root).stdout  # patient data: git-ignored
    exp = run(shlex.split(experiment), root, check=False, timeout=1200)    # step 2, exactly as printed
    ingested = json.loads((root/"data/interim/ingest.json").read_text())
    assert ingested["sha256"] == record["sha256"] and ingested["rows"] == record["rows"]["total"], exp.stderr[-2000:]
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
