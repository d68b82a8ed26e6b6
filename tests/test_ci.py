"""CI for models: the reviewer's summary (`healthml ci summary`, which `.ci/pr-check` writes after `dvc repro`), the
workflow that calls the `.ci/` scripts, the pre-commit hooks, and the check that no notebook is committed executed."""
import json
import re
import shutil
import subprocess
import sys

import yaml
from conftest import ROOT, project_env, run


def test_the_reviewer_summary_shows_the_metrics_diff_every_gate_rule_the_hash_the_report_and_the_plots(pipeline_project, tmp_path):
    root, _ = pipeline_project
    # the fixture's commit holds no outputs (a fresh project), so every metric is new against HEAD
    run(["healthml", "ci", "summary", "--base", "HEAD", "-o", str(tmp_path/"summary.md"), "--images", str(tmp_path/"plots"),
         "--root", str(root), "--params", str(root/"params.yaml")], root)
    text = (tmp_path/"summary.md").read_text()
    gate = json.loads((root/"metrics/gate.json").read_text())
    assert text.startswith(f"## healthml model check: gate {'PASS' if gate['passed'] else 'FAIL'}")
    summary = json.loads((root/"metrics/summary.json").read_text())
    row = next(l for l in text.splitlines() if l.startswith("| metrics/summary.json") and "| lightgbm.auroc " in l)
    assert f"{summary['lightgbm']['auroc']:.5f}" in row, row                         # dvc metrics diff --md, the workspace value
    assert re.search(r"\| Path +\| Metric +\| HEAD +\| workspace +\| Change", text)
    for rule in gate["rules"]:                                                    # every rule, with its status and evidence
        status = {"pass": "pass", "FAIL": "**FAIL**", "not applicable": "not applicable"}[rule["status"]]
        assert f"| {rule['name']} | {rule['kind']} | {status} | {rule['reason'].replace('|', chr(92) + '|')} |" in text, rule["name"]
    sha = json.loads((root/"metrics/export.json").read_text())[gate["candidate"]]["sha256"]
    assert f"ONNX SHA-256 `{sha}` (version `{sha[:12]}`)" in text
    record = json.loads((root/"metrics/report.json").read_text())
    assert "**Report:** `report/validation.html`" in text and record["manifest_sha256"] in text
    images = re.findall(r"!\[[^]]+\]\(([^)]+)\)", text)
    assert images == ["plots/roc.png", "plots/calibration.png", "plots/decision_curve.png", "plots/subgroups.png"]
    assert all((tmp_path/i).read_bytes()[:4] == b"\x89PNG" for i in images)


def test_an_unknown_base_revision_is_one_line_in_the_summary_not_a_failure(pipeline_project, tmp_path):
    root, _ = pipeline_project
    r = run(["healthml", "ci", "summary", "--base", "no-such-branch", "--root", str(root), "--params", str(root/"params.yaml")], root)
    assert "_Not compared with `no-such-branch`: " in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert "| discrimination | threshold |" in r.stdout


def test_the_workflow_runs_the_ci_scripts_on_pull_requests_and_registers_on_main():
    flow = yaml.safe_load((ROOT/".github/workflows/ci.yml").read_text())
    on = flow[True] if True in flow else flow["on"]                               # YAML 1.1 reads the key `on` as true
    assert "pull_request" in on and on["push"]["branches"] == ["main"]
    steps = {job: [s["run"] for s in spec["steps"] if "run" in s] for job, spec in flow["jobs"].items()}
    for job, runs in steps.items():                                               # every step is a script a developer runs
        for command in runs:
            script = re.fullmatch(r"bash (\.ci/[\w-]+)( .*)?", command.strip())
            assert script and (ROOT/script.group(1)).is_file(), (job, command)
    assert steps["test"] == ["bash .ci/run"]
    assert steps["model"][0].startswith("bash .ci/pr-check ") and "pull_request" in flow["jobs"]["model"]["if"]
    assert steps["register"] == ["bash .ci/register"] and "refs/heads/main" in flow["jobs"]["register"]["if"]
    register = (ROOT/".ci/register").read_text()
    assert "healthml model register" in register and "dvc repro --force" in register   # edited + re-locked evidence is re-made
    assert "dvc repro" in (ROOT/".ci/pr-check").read_text()


def test_pr_check_runs_end_to_end_and_fails_when_dvc_repro_fails(project_clone, tmp_path):
    root = project_clone
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "the run"], root)                            # the base: this run's outputs
    r = run(["bash", ".ci/pr-check", "HEAD", str(tmp_path/"summary.md")], root, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path/"summary.md").read_text()
    assert "gate PASS" in text.splitlines()[0] and "| metrics/summary.json | lightgbm.auroc " in text
    assert (root/"ci-summary/plots/roc.png").exists() and (root/"ci-summary/plots-diff/index.html").exists()
    # a gate that fails: dvc repro exits 1 (stood in for by a `dvc` whose repro fails; every other command is DVC's own,
    # so the outputs stay those of the passing run), the check exits 1 and the summary is still written, saying so
    stub = tmp_path/"bin"
    stub.mkdir()
    (stub/"dvc").write_text(f'#!/bin/sh\nif [ "$1" = repro ]; then echo "gate FAILED: discrimination" >&2; exit 1; fi\n'
                            f'exec {shutil.which("dvc", path=project_env()["PATH"])} "$@"\n')
    (stub/"dvc").chmod(0o755)
    env = project_env()
    r = subprocess.run(["bash", ".ci/pr-check", "HEAD", str(tmp_path/"failed.md")], cwd=root, capture_output=True, text=True,
                       env=env | {"PATH": f"{stub}:{env['PATH']}"}, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "**dvc repro exited 1**" in (tmp_path/"failed.md").read_text()
    assert "gate FAILED: discrimination" in (root/"ci-summary/dvc-repro.log").read_text()


def test_an_executed_notebook_fails_the_export_check(tmp_path):
    nbs = shutil.copytree(ROOT/"nbs", tmp_path/"nbs")
    check = [sys.executable, str(ROOT/".ci/notebooks-clean"), str(nbs)]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    planted = nbs/"00_core/01_errors.ipynb"
    nb = json.loads(planted.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    code[1]["execution_count"] = 7
    code[1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["patient 4711, 82 years\n"]}]
    planted.write_text(json.dumps(nb, indent=1))
    r = subprocess.run(check, capture_output=True, text=True)
    assert r.returncode == 1
    cell = nb["cells"].index(code[1]) + 1
    assert f"01_errors.ipynb: outputs in cell {cell}; execution count in cell {cell}: clear the outputs" in r.stderr
    assert "4711" not in r.stderr + r.stdout                                   # names the cell, never its content
    recipe = subprocess.run(["make", "-n", "export-check"], cwd=ROOT, capture_output=True, text=True,
                            env=project_env()).stdout
    assert "python .ci/notebooks-clean" in recipe and "ruff check --select F healthml" in recipe


def test_pre_commit_hooks_are_local_and_their_commands_exist():
    config = yaml.safe_load((ROOT/".pre-commit-config.yaml").read_text())
    hooks = [h for repo in config["repos"] for h in repo["hooks"]]
    assert all(repo["repo"] == "local" for repo in config["repos"])            # nothing fetched when a hook runs
    assert {h["id"] for h in hooks} >= {"notebooks-clean", "nbdev-clean", "ruff", "export-check"}
    for h in hooks:
        assert h["language"] == "system", h["id"]
        words = h["entry"].split()
        tool = words[1] if words[0] == "python" else words[0]
        assert (ROOT/tool).is_file() or shutil.which(tool, path=project_env()["PATH"]), h["id"]
    ruff = next(h for h in hooks if h["id"] == "ruff")["entry"].split()
    assert subprocess.run(ruff, cwd=ROOT, env=project_env(), capture_output=True).returncode == 0
