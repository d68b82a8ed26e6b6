"""`healthml bundle`: the edge bundle scores in a fresh virtual environment holding only numpy, onnxruntime and their own
requirements (linked from this venv, so the test runs offline), like the pipeline, without healthml, scikit-learn,
pandas or pydantic."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BIN, project_env, run
from healthml.governance.supply_chain import requirement_closure

EDGE = ["numpy", "onnxruntime"]
ABSENT = ["healthml", "sklearn", "lightgbm", "pandas", "pyarrow", "pydantic", "scipy", "lleaves", "llvmlite", "fastapi", "mlflow"]


def fresh_venv(dest: Path) -> Path:
    "A new venv (no pip) whose site-packages holds only the edge requirements' distributions, linked from this venv."
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True, capture_output=True)
    site = next((dest/"lib").glob("python3*/site-packages"))
    for dist in requirement_closure(EDGE).values():
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            if top.endswith(".pth") or top in ("..", "__pycache__") or (site/top).exists(): continue
            if (base/top).exists(): (site/top).symlink_to(base/top)
    return dest/"bin/python"


def edge_env() -> dict:
    return {k: v for k, v in project_env().items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {"PYTHONNOUSERSITE": "1"}


@pytest.mark.slow
def test_a_bundle_scores_like_the_pipeline_in_a_fresh_venv_with_only_numpy_and_onnxruntime(pipeline_project, tmp_path):
    root, _ = pipeline_project
    manifest = root/json.loads((root/"metrics/report.json").read_text())["report"]/"manifest.json"
    r = run([str(BIN/"healthml"), "bundle", "models/onnx/lightgbm.onnx", "--manifest", str(manifest), "-o", str(tmp_path/"edge")], root)
    assert "bundle of lightgbm.onnx" in r.stderr + r.stdout
    bundle = json.loads((tmp_path/"edge/bundle.json").read_text())
    python = fresh_venv(tmp_path/"venv")
    probe = subprocess.run([str(python), "-c", f"import importlib.util as u; print(sorted(m for m in {ABSENT!r} if u.find_spec(m)))"],
                           env=edge_env(), cwd=tmp_path, capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    from healthml.core.params import load_params
    from healthml.modelling.train import model_frame
    test = pd.read_parquet(root/"data/processed/test.parquet")
    frame = model_frame(test, load_params(root/"params.yaml").dataset)
    with open(tmp_path/"records.jsonl", "w") as f:
        for rec in frame.to_dict("records"):
            f.write(json.dumps({k: v for k, v in rec.items() if v != "(missing)" and not (isinstance(v, float) and np.isnan(v))}) + "\n")
    r = subprocess.run([str(python), str(tmp_path/"edge"), "predict", str(tmp_path/"records.jsonl"), "-o", str(tmp_path/"scores.jsonl")],
                       env=edge_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(test)} of {len(test)} records scored" in r.stderr and bundle["engine"] in r.stderr
    out = [json.loads(x) for x in (tmp_path/"scores.jsonl").read_text().splitlines()]
    scores = np.array([o["raw_risk"] if o["risk"] is None else o["risk"] for o in out])
    reference = pd.read_parquet(root/"data/processed/test_scores.parquet")["lightgbm"].to_numpy()
    assert np.abs(scores - reference).max() < 1e-5                                   # rounded to 6 digits in the payload
    info = subprocess.run([str(python), str(tmp_path/"edge"), "info"], env=edge_env(), cwd=tmp_path, capture_output=True, text=True)
    assert json.loads(info.stdout)["sha256"] == bundle["sha256"]
    export = json.loads((root/"metrics/export.json").read_text())["lightgbm"]
    assert bundle["engine"] == ("compiled trees" if export["compiled"].get("passed") else "onnx")
