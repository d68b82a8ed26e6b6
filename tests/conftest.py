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
