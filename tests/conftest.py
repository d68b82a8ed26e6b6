"""Shared fixtures: a throwaway copy of the project in which the real pipeline runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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
    for f in ["reports", "models", "metrics", "plots", "datacard", "dvc.lock"]:  # a fresh project: no earlier outputs
        p = dest/f
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "copy"], dest)
    return dest


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory):
    "A copy of the project on which `dvc repro` has run once, with its output."
    root = copy_project(tmp_path_factory.mktemp("project"))
    result = run(["dvc", "repro"], root)
    return root, result


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
