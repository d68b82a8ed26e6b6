"""`healthml predict` and the service run in the slim scoring install: numpy, onnxruntime, pandas, pyarrow, pydantic,
PyYAML, ruamel.yaml, typer, rich and the `serve` extra, with nothing from the training stack. The environment is built from the
installed distributions (each with its own requirements, as pip would resolve them), offline."""
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, project_env
from packaging.requirements import Requirement

SLIM = ["numpy", "onnxruntime", "pandas", "pyarrow", "pydantic", "PyYAML", "ruamel.yaml", "typer", "rich",
        "fastapi", "starlette", "uvicorn", "prometheus-client"]                        # the serve extra
TRAINING = ["sklearn", "lightgbm", "mlflow", "scipy", "matplotlib", "skl2onnx", "onnxmltools", "skops", "pandera",
            "papermill", "evidently", "dvc", "statsmodels", "fairlearn"]


def requirement_closure(names: list[str]) -> dict[str, metadata.Distribution]:
    "The distributions `names` need, with their own requirements (no extras), as pip would install them."
    seen, todo = {}, list(names)
    while todo:
        dist = metadata.distribution(todo.pop())
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen: continue
        seen[key] = dist
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}): todo.append(req.name)
    return seen


def slim_site(dest: Path) -> Path:
    "A site folder holding only the slim install's distributions (links into this venv) and healthml."
    dest.mkdir()
    for dist in requirement_closure(SLIM).values():
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            if top.endswith((".pth",)) or top in ("..", "__pycache__") or (dest/top).exists(): continue
            if (base/top).exists(): (dest/top).symlink_to(base/top)
    (dest/"healthml").symlink_to(ROOT/"healthml")
    return dest


def slim_python(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    "Run `code` with only `site` importable (no site-packages, no user site)."
    env = project_env() | {"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_slim_install_holds_none_of_the_training_stack(tmp_path):
    site = slim_site(tmp_path/"site")
    r = slim_python(site, "import importlib.util as u\n"
                          f"print(sorted(m for m in {TRAINING!r} if u.find_spec(m)))", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_predict_runs_in_the_slim_install_and_scores_like_the_pipeline(pipeline_project, tmp_path):
    root, _ = pipeline_project
    site = slim_site(tmp_path/"site")
    test = pd.read_parquet(root/"data/processed/test.parquet")
    test.to_parquet(tmp_path/"in.parquet")
    code = ("import sys\nfrom healthml.cli.app import main\n"
            f"sys.argv = ['healthml', 'predict', {str(tmp_path/'in.parquet')!r}, '-o', {str(tmp_path/'scores.parquet')!r}, "
            f"'--root', {str(root)!r}, '--params', {str(root/'params.yaml')!r}]\n"
            "try: main()\nexcept SystemExit as e: code = e.code\nelse: code = 0\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({TRAINING!r})), code)")
    r = slim_python(site, code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] 0", r.stdout + r.stderr
    assert f"{len(test)} of {len(test)} rows scored" in r.stderr
    scores = pd.read_parquet(tmp_path/"scores.parquet").raw_risk.to_numpy()   # the model's score, also where it abstains
    reference = pd.read_parquet(root/"data/processed/test_scores.parquet")["lightgbm"].to_numpy()
    assert np.abs(scores - reference).max() < 1e-5
