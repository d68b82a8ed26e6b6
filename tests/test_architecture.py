"""The architecture holds by construction: layers never import upward, every DVC stage depends on exactly the code
its command imports (so a code change can never leave a stale output that `dvc repro` calls up to date)."""
import json
import shutil

import pytest
from conftest import ROOT, run

from healthml.core.imports import import_graph, layer_of, mermaid, notebook_order, upward_imports, later_imports

PKG = ROOT/"healthml"


def test_no_module_imports_a_higher_layer_or_a_later_notebook():
    graph = import_graph(PKG)
    assert {layer_of(m) for m in graph} >= {"core", "data", "modelling", "evaluation", "governance", "deploy", "cli"}
    assert upward_imports(graph) == []
    assert later_imports(graph, notebook_order(ROOT/"nbs")) == []


def test_the_drawing_of_the_import_graph_is_current():
    text = (ROOT/"docs/architecture.md").read_text()
    assert mermaid(import_graph(PKG)) in text, "regenerate it: make architecture"


def test_dvc_yaml_code_deps_are_the_import_graph(tmp_path):
    r = run(["healthml", "dvc", "deps"], ROOT)
    assert "match the import graph" in r.stderr


def test_a_missing_or_stale_code_dep_is_named_and_fails(tmp_path):
    text = (ROOT/"dvc.yaml").read_text()
    broken = text.replace("      - healthml/evaluation/calibration.py\n", "", 1)
    broken = broken.replace("      - healthml/data/cohort.py\n", "      - healthml/data/cohort.py\n      - healthml/deploy/serve.py\n", 1)
    (tmp_path/"dvc.yaml").write_text(broken)
    r = run(["healthml", "dvc", "deps", "--dvc-yaml", str(tmp_path/"dvc.yaml")], ROOT, check=False)
    assert r.returncode == 1
    assert "missing healthml/evaluation/calibration.py" in r.stderr
    assert "ingest: not imported by its command: healthml/deploy/serve.py" in r.stderr
    run(["healthml", "dvc", "deps", "--write", "--dvc-yaml", str(tmp_path/"dvc.yaml")], ROOT)
    assert (tmp_path/"dvc.yaml").read_text() == text


def _stale_code(root) -> dict[str, set[str]]:
    "Stage -> the code files `dvc status` reports as changed deps."
    status = json.loads(run(["dvc", "status", "--json"], root).stdout or "{}")
    out = {}
    for stage, changes in status.items():
        for c in changes:
            for path in (c.get("changed deps") or {}) if isinstance(c, dict) else ():
                if path.startswith("healthml/"): out.setdefault(stage, set()).add(path)
    return out


@pytest.mark.slow
def test_editing_a_module_makes_every_stage_that_imports_it_out_of_date(pipeline_project, tmp_path):
    root, _ = pipeline_project
    copy = shutil.copytree(root, tmp_path/"project", symlinks=True)
    assert _stale_code(copy) == {}
    declared = {}
    import yaml
    for stage, spec in yaml.safe_load((copy/"dvc.yaml").read_text())["stages"].items():
        for d in spec.get("deps", []):
            declared.setdefault(d, set()).add(stage)
    for module, some_users, non_users in [("healthml/evaluation/calibration.py", {"evaluate", "report"}, {"ingest", "train", "gate"}),
                                          ("healthml/core/spec.py", {"ingest", "train", "evaluate", "gate"}, set()),
                                          ("healthml/governance/gate.py", {"gate", "report"}, {"train", "evaluate", "export"})]:
        f = copy/module
        original = f.read_text()
        f.write_text(original + "\n# an edit\n")
        stale = {s for s, files in _stale_code(copy).items() if module in files}
        assert stale == declared[module], module
        assert some_users <= stale and not (non_users & stale), (module, stale)
        f.write_text(original)
    assert _stale_code(copy) == {}
