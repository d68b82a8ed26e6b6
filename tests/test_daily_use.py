"""Daily use, readable and offline: `dvc plots show` draws every plot with no network, a run ends with a short table,
MLflow runs say what they are, and a successful command prints no library noise."""
import json
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT, project_env, run

VEGA_TEMPLATE = ROOT/"vendor/vega/dvc_plots.html"   # written by `make setup` (docs/plots/vendor.py)


def need_vega_template():
    assert VEGA_TEMPLATE.exists(), f"{VEGA_TEMPLATE} not found: run `make setup` (it vendors Vega from the npm registry)"


@pytest.fixture(scope="module")
def plots_project(tmp_path_factory):
    "A DVC project holding this project's dvc.yaml, params.yaml and plots/ (nothing is run)."
    root = tmp_path_factory.mktemp("plots")
    for f in ("dvc.yaml", "params.yaml"): shutil.copy(ROOT/f, root/f)
    shutil.copytree(ROOT/"plots", root/"plots")
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    return root


def test_the_vendored_template_holds_pinned_vega_and_no_cdn_link():
    need_vega_template()
    page = VEGA_TEMPLATE.read_text()
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page   # DVC would fill {scripts} with CDN links
    for package in ("vega 5.33.1", "vega-lite 5.23.0", "vega-embed 6.29.0"):
        assert package in page, package
    assert not re.search(r"<script[^>]+src=", page) and "cdn.jsdelivr" not in page


def blocked_page(browser, url: str):
    "A page on which every request that leaves the machine is blocked and recorded."
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, blocked = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    def only_local(route):
        if route.request.url.startswith(("file:", "data:", "blob:")): route.continue_()
        else: blocked.append(route.request.url); route.abort()
    page.route("**/*", only_local)
    page.goto(url)
    return page, errors, blocked


DRAWN = """() => [...document.querySelectorAll('body > div[id]')].map(div => {
  const canvas = div.querySelector('canvas');
  if (!canvas || !canvas.width) return [div.id, [0, 0]];
  const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let inked = 0, coloured = 0;   // paint on the white background (axes, labels, data), and saturated paint (data)
  for (let i = 0; i < px.length; i += 4) if (px[i + 3] > 0 && Math.min(px[i], px[i + 1], px[i + 2]) < 200) {
    inked++;
    if (Math.max(px[i], px[i + 1], px[i + 2]) - Math.min(px[i], px[i + 1], px[i + 2]) > 60) coloured++;
  }
  return [div.id, [inked, coloured]];
})"""


def html_id(name: str) -> str:
    "The id DVC gives a plot's element (dvc_render's remove_special_chars)."
    return re.sub(r"[!@#$%^&*()\[\]{};,<>?\\/:.|`~=_+ ]", "_", name)


def test_dvc_plots_show_draws_every_plot_with_the_network_blocked(plots_project, browser, tmp_path):
    need_vega_template()
    listed = json.loads(run(["dvc", "plots", "show", "--json"], plots_project).stdout)["data"]
    run(["dvc", "plots", "show", "--html-template", str(VEGA_TEMPLATE), "-o", str(tmp_path/"out")], plots_project)
    page, errors, blocked = blocked_page(browser, (tmp_path/"out/index.html").as_uri())
    page.wait_for_function(f"document.querySelectorAll('.vega-embed canvas').length >= {len(listed)}", timeout=30_000)
    drawn = dict(page.evaluate(DRAWN))
    assert sorted(drawn) == sorted(html_id(name) for name in listed), drawn
    for name, plot in listed.items():
        inked, coloured = drawn[html_id(name)]
        assert inked > 2_000, (name, inked)                                       # axes and labels
        if "y" in plot[0]["content"]["encoding"]: assert coloured > 200, (name, coloured)   # and the data
    assert errors == [] and blocked == [], (errors, blocked)


def test_dvc_plots_lists_exactly_the_top_level_plots_with_every_model(plots_project):
    import yaml
    defined = [next(iter(p)) if isinstance(p, dict) else p for p in yaml.safe_load((ROOT/"dvc.yaml").read_text())["plots"]]
    listed = json.loads(run(["dvc", "plots", "show", "--json"], plots_project).stdout)["data"]
    assert list(listed) == defined
    models = yaml.safe_load((ROOT/"params.yaml").read_text())["models"]
    for plot in listed.values():
        shown = {(row.get("filename") or row.get("filename::field", "")).split(".csv")[0] for row in plot[0]["content"]["data"]["values"]}
        assert shown >= set(models), shown


def summary_project(tmp_path, **changes):
    "A project folder holding this project's params and metrics files (`None` drops a file, a dict replaces it)."
    (tmp_path/"metrics").mkdir()
    shutil.copy(ROOT/"params.yaml", tmp_path/"params.yaml")
    for name in ("evaluate", "gate", "report"):
        content = changes.get(name, json.loads((ROOT/f"metrics/{name}.json").read_text()))
        if content is not None: (tmp_path/f"metrics/{name}.json").write_text(json.dumps(content))
    return tmp_path


def test_summary_is_a_short_table_of_what_a_run_found(tmp_path):
    out = run(["healthml", "summary"], summary_project(tmp_path)).stdout
    evaluation = json.loads((ROOT/"metrics/evaluate.json").read_text())
    candidate = evaluation["settings"]["candidate"]       # the file's keys are sorted: "compact" comes first
    auroc = evaluation[candidate]
    assert f"{candidate} (candidate)" in out and "compact (candidate)" not in out
    assert f"{auroc['auroc']:.3f} ({auroc['auroc_ci_low']:.3f}-{auroc['auroc_ci_high']:.3f})" in out
    assert f"{auroc['calibration_slope']:.2f}" in out and f"{auroc['alerts_per_100']:.1f}" in out
    assert re.search(r"^Gate\s+PASS$", out, re.M) and re.search(r"^Report\s+\S", out, re.M)
    assert len(out) < 1_500 and max(len(line) for line in out.splitlines()) <= 100, out


def test_summary_names_what_is_missing_or_failed_and_never_fails_the_run(tmp_path):
    gate = json.loads((ROOT/"metrics/gate.json").read_text()) | {"passed": False, "failed_rules": ["discrimination"]}
    r = run(["healthml", "summary"], summary_project(tmp_path, evaluate=None, report=None, gate=gate))
    assert "not evaluated (metrics/evaluate.json not found)" in r.stdout
    assert re.search(r"^Gate\s+FAIL: discrimination$", r.stdout, re.M) and re.search(r"^Report\s+not rendered$", r.stdout, re.M)


def test_make_run_ends_with_the_summary_even_when_the_gate_fails():
    recipe = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "healthml summary" in recipe and "dvc metrics show" not in recipe, recipe
    assert re.search(r"^healthml repro\b.*\|\| status=\$\?; healthml summary; exit \$\{status:-0\}$", recipe, re.M), recipe


def mlflow_info_lines(verbose: bool, tmp_path) -> list[str]:
    "The INFO lines a command that creates an MLflow store prints."
    code = ("from healthml.cli.common import SETTINGS, run_stage\n"
            f"SETTINGS['verbose'] = {verbose}\n"
            "def work():\n    import mlflow\n    mlflow.MlflowClient('sqlite:///store.db').search_experiments(); return 'ok'\n"
            "run_stage('demo', work)\n")
    env = {k: v for k, v in project_env().items() if k != "MLFLOW_LOGGING_LEVEL"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    return [line for line in r.stderr.splitlines() if " INFO " in line]


def test_mlflow_info_lines_show_only_with_verbose(tmp_path):
    (tmp_path/"quiet").mkdir(); (tmp_path/"verbose").mkdir()
    assert mlflow_info_lines(False, tmp_path/"quiet") == []
    assert any("Creating initial MLflow database tables" in line for line in mlflow_info_lines(True, tmp_path/"verbose"))


def test_the_commit_is_dirty_only_when_tracked_source_changes(tmp_path):
    from healthml.core.layout import git_commit
    for f in ("dvc.yaml", "params.yaml", "Makefile"): shutil.copy(ROOT/f, tmp_path/f)
    for d in ("metrics", "plots"): shutil.copytree(ROOT/d, tmp_path/d)
    (tmp_path/"dvc.lock").write_text("schema: '2.0'\n")
    run(["git", "init", "-q"], tmp_path); run(["git", "add", "-A"], tmp_path); run(["git", "commit", "-qm", "x"], tmp_path)
    head = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    for output in ["dvc.lock", "metrics/evaluate.json", *(str(p.relative_to(tmp_path)) for p in (tmp_path/"plots").rglob("*.csv"))]:
        with open(tmp_path/output, "a") as f: f.write("\n")            # what `dvc repro` rewrites, git tracks
    assert git_commit(tmp_path) == head
    with open(tmp_path/"Makefile", "a") as f: f.write("\n")
    assert git_commit(tmp_path) == head + "+dirty"


def train_runs(root) -> list[dict]:
    with sqlite3.connect(root/"mlflow.db") as db:
        rows = db.execute("select r.run_uuid, r.name, t.key, t.value from runs r join tags t on t.run_uuid = r.run_uuid").fetchall()
        kind = db.execute("select value from experiment_tags where key = 'mlflow.experimentKind'").fetchall()
    runs = {}
    for uuid, name, key, value in rows: runs.setdefault(uuid, {"name": name})[key] = value
    assert kind and {k for (k,) in kind} == {"custom_model_development"}, kind   # not MLflow 3's GenAI view
    return [r for r in runs.values() if r.get("healthml.stage") == "train"]


def test_pipeline_runs_are_named_described_and_record_a_clean_commit(pipeline_project):
    root, record = pipeline_project
    runs = train_runs(root)
    assert sorted(re.sub(r"-[0-9a-f]{8}$", "", r["name"]) for r in runs) == ["compact", "lightgbm", "logistic"], [r["name"] for r in runs]
    head = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    for r in runs:
        assert r["name"] == f"{r['healthml.model']}-{r['healthml.params_hash']}"
        assert r["git_commit"] == head, r["git_commit"]     # the run's own outputs never make the commit dirty
        assert f"git commit `{head}`" in r["mlflow.note.content"] and "DVC experiment" not in r["mlflow.note.content"]
    assert " INFO " not in record.stderr, record.stderr
