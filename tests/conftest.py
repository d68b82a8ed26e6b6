"""Shared fixtures: a throwaway copy of the project in which the real pipeline runs."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The audit key signs every audit entry; a user's lives in ~/.config/healthml or a CI secret. The suite uses its own,
# for the test processes and every `healthml` they start.
os.environ.setdefault("HEALTHML_AUDIT_KEY", "healthml-test-suite-audit-key")


HEAVY_FIXTURES = {"pipeline_project", "project_clone", "three_versions", "registry_clone", "synthetic_project", "browser"}


def pytest_addoption(parser):
    parser.addoption("--prebuild", action="store_true", help="build the shared pipeline projects in the background from "
                     "the start (make test-integration), so no worker idles while the first test that needs one waits")


@pytest.hookimpl(trylast=True)      # after the tmp_path plugin has made the run's base folder
def pytest_configure(config):
    "With --prebuild, the controller builds the shared projects in a background thread while the workers run tests."
    if not config.getoption("prebuild") or hasattr(config, "workerinput"): return
    import threading
    shared = config._tmp_path_factory.getbasetemp()             # the folder xdist workers share (`shared_dir`)
    def build(*steps):
        try:
            for step in steps: step(shared)
        except BaseException as e:                               # the fixture that needs it builds it again and fails there
            (shared/f"prebuild-failed-{threading.get_ident()}.txt").write_text(repr(e))
    from test_cohort import build_synthetic_project
    for steps in ((build_pipeline_project, build_three_versions), (build_synthetic_project,)):
        threading.Thread(target=build, args=steps, daemon=True, name="prebuild").start()


def pytest_collection_modifyitems(items):
    "A test that needs a pipeline run or a browser is `slow` (`make test-fast` leaves it out)."
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())): item.add_marker(pytest.mark.slow)


def project_env() -> dict:
    "The environment a user has after `make setup`: venv first on PATH, telemetry off."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               ORT_DISABLE_TELEMETRY="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    "Run a command as a user would, capturing its output."
    r = subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nSTDOUT:\n{r.stdout}\nSTDERR:\n{r.stderr}")
    return r


def copy_project(dest: Path) -> Path:
    "Copy the project's source files (tracked or new, not ignored) into `dest` as a fresh git repo."
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = ROOT/f
        if src.is_file():
            (dest/f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest/f)
    for f in ["reports", "report", "models", "metrics", "plots", "datacard", "seals", "dvc.lock"]:  # a fresh project: no earlier outputs
        p = dest/f
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "copy"], dest)
    return dest


def shared_dir(tmp_path_factory) -> Path:
    "A folder shared by every xdist worker of this run (the base temp folder of the run itself without xdist)."
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_pipeline_project(shared: Path) -> Path:
    """A copy of the project on which `healthml repro` (`dvc repro`, stages served warm) has run once and whose run was then registered (`healthml model
    register`, the explicit step CI on main takes), with their output, in `shared`. Built once per test run (xdist
    workers and the prebuild share it through a file lock)."""
    root, record = shared/"pipeline-project", shared/"pipeline-project.json"
    with FileLock(str(shared/"pipeline-project.lock")):
        if not record.exists():
            root.mkdir()
            r = run(["healthml", "repro"], copy_project(root))
            reg = run(["healthml", "model", "register"], root)
            record.write_text(json.dumps({"stdout": r.stdout, "stderr": r.stderr, "returncode": r.returncode,
                                          "register_stderr": reg.stderr}))
    return record


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory):
    """The shared pipeline project (`build_pipeline_project`) and its run's output. Never changed by a test: a test
    that changes files works on `clone_project(root, ...)`."""
    shared = shared_dir(tmp_path_factory)
    record = build_pipeline_project(shared)
    return shared/"pipeline-project", SimpleNamespace(**json.loads(record.read_text()))


def clone_project(src: Path, dest: Path) -> Path:
    """A full copy of a project after a run (outputs, DVC cache, MLflow store, audit log), independent of `src`: the
    embedded MLflow store records absolute artifact paths, which are rewritten to point into the copy."""
    shutil.copytree(src, dest, symlinks=True)
    db = dest/"mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            for (table,) in con.execute("select name from sqlite_master where type = 'table'").fetchall():
                for col in con.execute(f"pragma table_info('{table}')").fetchall():
                    if col[2].upper().startswith(("VARCHAR", "TEXT")):
                        con.execute(f'update "{table}" set "{col[1]}" = replace("{col[1]}", ?, ?) where "{col[1]}" like ?',
                                    (str(src), str(dest), f"%{src}%"))
    return dest


@pytest.fixture
def project_clone(pipeline_project, tmp_path):
    "A private copy of the shared pipeline project, for a test that changes it."
    return clone_project(pipeline_project[0], tmp_path/"project")


def set_params(root: Path, **changes) -> None:
    "Change dotted keys of a project's params.yaml (`models.lightgbm.n_estimators=120`)."
    import yaml
    params = yaml.safe_load((root/"params.yaml").read_text())
    for dotted, value in changes.items():
        node = params
        *path, last = dotted.split(".")
        for k in path: node = node[k]
        node[last] = value
    (root/"params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


SNAPSHOT = ("models", "metrics", "plots", "report", "reports", "datacard", "seals", "data/processed", "dvc.lock", "params.yaml")


def build_three_versions(shared: Path) -> Path:
    """A project whose registry holds v1 (gate PASS), v2 (PASS, a smaller model) and v3 (FAIL under a stricter plan),
    with the output of the v2 run (a hyperparameter change) and a copy of the v2 outputs, in `shared`."""
    import yaml
    build_pipeline_project(shared)
    root, record = shared/"three-versions", shared/"three-versions.json"
    with FileLock(str(shared/"three-versions.lock")):
        if not record.exists():
            clone_project(shared/"pipeline-project", root)             # v1 was registered after the first run
            # 100 bootstrap replicates (not 500): these versions exist for the registry; their statistics are tested elsewhere
            set_params(root, **{"models.lightgbm.n_estimators": 120, "evaluate.n_bootstrap": 100})
            v2 = run(["healthml", "repro"], root)
            run(["healthml", "model", "register"], root)                # v2
            snapshot = shared/"v2-outputs"
            snapshot.mkdir()
            for f in SNAPSHOT:
                if (root/f).is_dir(): shutil.copytree(root/f, snapshot/f, symlinks=True)
                elif (root/f).exists(): shutil.copy(root/f, snapshot/f)
            set_params(root, **{"models.lightgbm.n_estimators": 60})
            gate = yaml.safe_load((root/"params.yaml").read_text())["gate"]
            gate["rules"][0]["min"] = 0.95                              # a plan no model here can meet
            set_params(root, gate=gate)
            v3 = run(["healthml", "repro"], root, check=False)
            assert v3.returncode != 0 and "gate FAILED" in v3.stderr    # the pipeline stops at the gate...
            run(["healthml", "model", "register"], root)                # ...and a person registers it anyway: v3, gate FAIL
            record.write_text(json.dumps({"v2_stdout": v2.stdout}))
    return record


@pytest.fixture(scope="session")
def three_versions(pipeline_project, tmp_path_factory):
    """The three-version project (`build_three_versions`). Built once per run and never changed by a test (a test that
    promotes or deletes works on `clone_project` of it)."""
    shared = shared_dir(tmp_path_factory)
    record = build_three_versions(shared)
    return SimpleNamespace(root=shared/"three-versions", v2_outputs=shared/"v2-outputs", **json.loads(record.read_text()))


@pytest.fixture
def registry_clone(three_versions, tmp_path):
    "A private copy of the three-version project, for a test that promotes, rolls back or deletes."
    return clone_project(three_versions.root, tmp_path/"registry")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package, for the report tests


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    assert Path(CHROMIUM).exists(), "Debian's chromium is not installed: run `make browser`"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                              "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors, requests
