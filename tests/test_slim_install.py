"""`healthml predict` and the service run in the slim scoring install: the packages `requirements/serve.txt` names (numpy,
onnxruntime, pandas, pyarrow, pydantic, PyYAML, ruamel.yaml, typer, rich and the `serve` extra), with nothing from the
training stack. The environment is built from the installed distributions (each with its own requirements, as pip would
resolve them: `healthml.governance.supply_chain.requirement_closure`, which also lists them in the scoring SBOM), offline.
`deploy/Dockerfile` installs the same set from `requirements/serve.lock` (the closure at the constraints' versions, with
hashes), and the service is started here with the image's own ENTRYPOINT and CMD: the image is tested without Docker."""
import http.client
import json
import re
import shutil
import time
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, project_env
from healthml.governance.supply_chain import requirement_closure, requirement_names
from healthml.deploy.serve import free_port

SERVE_REQUIREMENTS = ROOT/"requirements/serve.txt"
DOCKERFILE = ROOT/"deploy/Dockerfile"
SLIM = requirement_names(SERVE_REQUIREMENTS)                  # one source of truth: the image installs the same set
TRAINING = ["sklearn", "lightgbm", "mlflow", "scipy", "matplotlib", "skl2onnx", "onnxmltools", "skops", "pandera",
            "papermill", "evidently", "dvc", "statsmodels", "fairlearn"]


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


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    "(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."
    text = re.sub(r"\\\n\s*", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def locked_pins(path: Path) -> dict[str, str]:
    "name -> version of a hashed requirements file, after checking that every pin carries at least one SHA-256."
    entries = re.split(r"\n(?=[A-Za-z0-9])", re.sub(r"(?m)^\s*#.*\n?", "", path.read_text()).strip())
    pins = {}
    for entry in entries:
        pin = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", entry)
        assert pin and re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"{path.name}: {entry.split()[0]} has no pin or no hash"
        pins[re.sub(r"[-_.]+", "-", pin.group(1)).lower()] = pin.group(2)
    return pins


def image_command() -> list[str]:
    "The command the image runs: ENTRYPOINT then CMD (exec form)."
    instr = dict(dockerfile_instructions())
    return json.loads(instr["ENTRYPOINT"]) + json.loads(instr["CMD"])


def test_the_image_installs_exactly_the_slim_requirements_at_the_versions_tested_here():
    instr = dockerfile_instructions()
    assert instr[0] == ("FROM", "python:3.11-slim")
    pips = [args for kind, args in instr if kind == "RUN" and "pip install" in args]
    assert len(pips) == 2, pips                                              # the slim set, then healthml alone
    assert re.fullmatch(r"pip install --require-hashes -r \S+/serve\.lock", pips[0]), pips[0]
    assert re.match(r"pip install --no-deps \S+ &&", pips[1]), pips[1]
    copied = " ".join(args for kind, args in instr if kind == "COPY")
    assert "requirements/serve.lock" in copied
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT/"requirements/constraints.txt").read_text(), re.M))
    pins = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
    closure = requirement_closure(SLIM)
    unpinned = {k: d.version for k, d in closure.items() if pins.get(k) != d.version}
    assert unpinned == {}, "the image would install other versions than the slim tests run: pin them in constraints.txt"
    locked = locked_pins(ROOT/"requirements/serve.lock")
    assert locked == {k: d.version for k, d in closure.items()}, "regenerate requirements/serve.lock (requirements/README.md)"
    assert {"fastapi", "uvicorn", "prometheus-client", "onnxruntime"} <= set(closure)
    assert not {"scikit-learn", "lightgbm", "mlflow", "dvc", "scipy"} & set(closure)


def test_the_image_runs_as_a_user_with_the_model_read_only_keys_required_and_a_healthcheck():
    instr = dockerfile_instructions()
    user = [args for kind, args in instr if kind == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert "/models" in json.loads(dict(instr)["VOLUME"])
    assert ":/models:ro" in DOCKERFILE.read_text()                          # the documented run mounts it read-only
    assert "/healthz" in dict(instr)["HEALTHCHECK"]
    command = image_command()
    assert command[:2] == ["healthml", "serve"] and "--insecure-local" not in command
    from healthml.core.params import load_params
    candidate = load_params(ROOT/"params.yaml").gate.candidate               # the file name the manifest matches
    assert command[command.index("--model") + 1] == f"/models/{candidate}.onnx"




def _http(port: int, method: str, path: str, body=None, key: str | None = None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, None if body is None else json.dumps(body),
              {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, json.loads(data) if data else None


@pytest.mark.slow
def test_the_image_command_serves_in_the_slim_install(pipeline_project, tmp_path):
    root, _ = pipeline_project
    from healthml.core.params import load_params
    candidate = load_params(root/"params.yaml").gate.candidate
    models, state = tmp_path/"models", tmp_path/"state"                       # the read-only volume and the state volume
    models.mkdir(), state.mkdir()
    for f in (f"{candidate}.onnx", f"{candidate}.explain.json"): shutil.copy(root/"models/onnx"/f, models/f)
    shutil.copy(root/json.loads((root/"metrics/report.json").read_text())["report"]/"manifest.json", models/"manifest.json")
    models.chmod(0o555)
    port = free_port()
    argv = [a.replace("/models/", f"{models}/").replace("/var/lib/healthml/", f"{state}/") for a in image_command()]
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", str(port)   # loopback in a shared test machine
    site = slim_site(tmp_path/"site")
    code = f"import sys\nfrom healthml.cli.app import main\nsys.argv = {argv!r}\nmain()"
    env = project_env() | {"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "HEALTHML_API_KEYS": "slim-user-key-0123456789",
                           "HEALTHML_ADMIN_KEYS": "slim-admin-key-0123456789"}
    proc = subprocess.Popen([sys.executable, "-S", "-c", code], cwd=state, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if proc.poll() is not None: break
            try:
                if _http(port, "GET", "/healthz")[0] == 200: break
            except OSError: time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        assert _http(port, "GET", "/v1/model")[0] == 401                    # keys are required
        status, info = _http(port, "GET", "/v1/model", key="slim-user-key-0123456789")
        assert status == 200 and info["version"] == json.loads((models/"manifest.json").read_text())["version"]
        test = pd.read_parquet(root/"data/processed/test.parquet")
        record = {k: v for k, v in test.iloc[0].items() if k in info["input_schema"]["properties"] and pd.notna(v)}
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        status, body = _http(port, "POST", "/v1/predict", {"records": [record]}, key="slim-user-key-0123456789")
        assert status == 200, body
        p = body["predictions"][0]
        score = p["raw_risk"] if p["risk"] is None else p["risk"]
        reference = pd.read_parquet(root/"data/processed/test_scores.parquet")[candidate].iloc[0]
        assert abs(score - reference) < 1e-5
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        models.chmod(0o755)
    assert "Traceback" not in err
    assert (state/"logs/predictions.jsonl").stat().st_mode & 0o777 == 0o600
