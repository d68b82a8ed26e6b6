"""The filed report as compliance staff meet it: in a real headless Chromium, verifiable, reproducible, never overwritten."""
import json
import re
from pathlib import Path

from conftest import open_page, run

from healthml.core.io import sha256_file

SECTIONS = ["0. Items a person must supply", "1. Data source", "2. Participant flow", "4. Discrimination", "5. Calibration",
            "6. Clinical utility", "7. Subgroups and fairness", "8. Comparison on the same patients", "9. Robustness",
            "10. Privacy risk", "12. Promotion gate", "13. TRIPOD+AI reporting items"]


def filed_report(root: Path) -> Path:
    "The report `dvc repro` rendered (report/)."
    return root/json.loads((root/"metrics/report.json").read_text())["report"]


def registered_report(root: Path) -> Path:
    "Where `healthml model register` filed it: reports/<model>/<ONNX hash>."
    return root/"reports/support2-mortality"/json.loads((root/"metrics/report.json").read_text())["version"]


def test_validation_report_renders_offline_with_every_section_and_figure(pipeline_project, browser, tmp_path):
    root, _ = pipeline_project
    page, errors, requests = open_page(browser, filed_report(root)/"validation.html")
    for title in SECTIONS:
        assert page.get_by_role("heading", name=re.compile("^" + re.escape(title))).first.is_visible(), title
    assert page.locator("nav.toc li").count() >= len(SECTIONS)
    assert page.evaluate("Array.from(document.images).filter(i => i.naturalWidth > 100).length") >= 4
    alts = page.evaluate("Array.from(document.images).map(i => i.alt)")       # every figure described for a screen reader
    assert alts and all(len(a) > 40 and "No description" not in a for a in alts), alts
    assert page.get_by_text("Internal validation (random split by patient)").first.is_visible()
    assert page.get_by_text("Gate verdict: PASS").is_visible()
    assert page.locator(".np").first.is_visible()                      # NOT PROVIDED items shown, in red
    assert page.locator(".np").first.evaluate("e => getComputedStyle(e).color") == "rgb(207, 34, 46)"
    text = page.inner_text("body")
    assert "import " not in text and "ReportContext.load" not in text   # no code cells, only their results
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), [u for u in requests if not u.startswith(("file:", "data:"))]
    page.screenshot(path=str(tmp_path/"validation.png"), full_page=True)
    assert (tmp_path/"validation.png").stat().st_size > 50_000


def test_report_index_and_model_card_render_and_link(pipeline_project, browser):
    root, _ = pipeline_project
    page, errors, requests = open_page(browser, root/"reports/index.html")
    link = page.locator("table a").first
    assert link.is_visible() and page.get_by_text("PASS").first.is_visible()
    link.click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/validation.html") and page.get_by_role("heading", name="Validation report").is_visible()
    card, card_errors, card_requests = open_page(browser, filed_report(root)/"model_card.html")
    for block in ("Basic information", "Release information", "Uses and directions", "Warnings", "Trust ingredients",
                  "Key metrics: usefulness", "Key metrics: fairness", "Key metrics: safety", "Resources", "Evidence for the NIST AI RMF"):
        assert card.get_by_role("heading", name=block).is_visible(), block
    for sub in ("MAP 1.1", "MEASURE 2.11", "MANAGE 2.4"):
        assert card.get_by_role("cell", name=sub).is_visible(), sub
    assert errors == card_errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests + card_requests)


def test_dataset_card_renders_offline_with_table_one_and_sample_size(pipeline_project, browser, tmp_path):
    root, _ = pipeline_project
    page, errors, requests = open_page(browser, filed_report(root)/"dataset_card.html")
    for title in ("Provenance", "Participant flow", "Table 1 by outcome", "Table 1 by split", "Missing data (% of rows)",
                  "Subgroup sizes", "Sample size (Riley et al. 2020)", "Leakage audit", "De-identification"):
        assert page.get_by_role("heading", name=title).is_visible(), title
    assert page.get_by_role("cell", name="age, mean (SD)").first.is_visible()
    assert page.get_by_text("NOT PROVIDED").first.evaluate("e => getComputedStyle(e).color") == "rgb(176, 0, 32)"
    assert errors == [] and all(u.startswith(("file:", "data:")) for u in requests)
    shot = tmp_path/"dataset_card.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    report, _, _ = open_page(browser, filed_report(root)/"validation.html")
    for title in ("Table 1: cohort characteristics by outcome", "Sample size (Riley et al. 2020)", "Leakage audit",
                  "De-identification (HIPAA Safe Harbor)", "Data-quality warnings"):
        assert report.get_by_role("heading", name=re.compile("^" + re.escape(title))).first.is_visible(), title


def test_model_card_json_says_what_people_have_not_provided(pipeline_project):
    root, _ = pipeline_project
    card = json.loads((filed_report(root)/"model_card.json").read_text())
    assert "Ethics approval" in card["not_provided"] and "Sign-off name" in card["not_provided"]
    assert card["uses_and_directions"]["intended_use"] == "NOT PROVIDED"
    assert 0.84 <= float(card["key_metrics"]["usefulness"]["AUROC"].split()[0]) <= 0.91
    assert [m["subcategory"] for m in card["nist_ai_rmf"]][:2] == ["MAP 1.1", "MEASURE 2.1"]


def test_report_verify_detects_one_edited_byte_in_the_report_or_the_model(project_clone):
    root = project_clone
    report = registered_report(root)
    rel = report.relative_to(root)
    assert run(["healthml", "report", "verify", str(rel)], root).returncode == 0
    for victim in (report/"validation.html", report/"model_card.json", root/"models/onnx/lightgbm.onnx", report/"manifest.json"):
        original = victim.read_bytes()
        edited = bytearray(original)
        edited[len(edited) // 2] ^= 0x01                              # one bit of one byte
        victim.write_bytes(bytes(edited))
        try:
            r = run(["healthml", "report", "verify", str(rel)], root, check=False)
            assert r.returncode == 1 and "FAILED verification" in r.stderr, victim.name
        finally:
            victim.write_bytes(original)
    assert run(["healthml", "report", "verify", str(rel)], root).returncode == 0


def test_forced_rerun_on_the_same_inputs_reproduces_the_filed_numbers(project_clone):
    from healthml.governance.report import file_report
    root = project_clone
    filed = registered_report(root)
    html_sha = sha256_file(filed/"validation.html")
    r = run(["dvc", "repro", "--force", "--single-item", "report"], root)
    assert "Running stage 'report'" in r.stdout
    assert (root/"report/manifest.json").read_bytes() != (filed/"manifest.json").read_bytes()   # a new render (new time)
    folder, filed_now = file_report(root/"reports", "support2-mortality", root/"report")
    assert (folder, filed_now) == (filed, False)                         # same inputs, same numbers: the filed one stands
    assert sha256_file(filed/"validation.html") == html_sha             # and was not rewritten


def test_compact_model_section_shows_its_metrics_beside_the_candidate(pipeline_project):
    import html
    from healthml.governance.report import _outputs_text, difference
    root, _ = pipeline_project
    page = (filed_report(root)/"validation.html").read_text()
    start = page.index(">Compact model beside the candidate")
    section = page[start:page.index(">Reasons: what drives", start)]
    text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", section)))
    metrics = {n: json.loads((root/"metrics"/f"{n}.json").read_text()) for n in ("evaluate", "comparison", "footprint", "export")}
    ev, fp = metrics["evaluate"], metrics["footprint"]
    for m in ("lightgbm", "compact"):                                  # the candidate and the compact model, side by side
        assert f"{ev[m]['auroc']:.3f} ({ev[m]['auroc_ci_low']:.3f} to {ev[m]['auroc_ci_high']:.3f})" in text, m
        assert f"{ev[m]['calibration_slope']:.3f} ({ev[m]['calibration_slope_ci_low']:.3f} to {ev[m]['calibration_slope_ci_high']:.3f})" in text, m
        assert f"{fp[m]['trees']:,} trees, {fp[m]['leaves']:,} leaves" in text and f"{fp[m]['onnx_bytes'] / 1000:,.1f} KB" in text, m
        assert f"{fp[m]['latency']['median_us']:,.1f}" in text, m
        assert f"{metrics['export'][m]['max_abs_diff']:.1e}" in text, m   # the float32 vs float64 gap beside the quantisation figures
        assert f"{fp[m]['quantisation']['float16']['max_abs_risk_change']:.1e}" in text, m
    paired = metrics["comparison"]["compact"]["auroc"]                  # the evaluation's own paired DeLong comparison
    d, ci = difference(paired["difference"], paired["ci_low"], paired["ci_high"])
    assert f"candidate minus compact AUROC {d} (95% CI {ci}, paired DeLong" in text
    assert f"{fp['lightgbm']['quantisation']['int8_dynamic']['operators_quantised']} operators quantised" in text
    assert fp["compact"]["trees"] < fp["lightgbm"]["trees"] and fp["compact"]["onnx_bytes"] < 0.2 * fp["lightgbm"]["onnx_bytes"]
    outputs = _outputs_text(filed_report(root)/"validation.ipynb")       # the timing is provenance; the rest is compared on re-runs
    assert any("Of the candidate&#x27;s bytes" in o or "Of the candidate's bytes" in o for o in outputs)
    assert not any("Median / candidate" in o for o in outputs)
