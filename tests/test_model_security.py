"""No model file runs code: the skops loader trusts exactly the classes the configured pipelines contain (`MODEL_TYPES`,
derived from them here), and every native model is loaded only after its SHA-256 matches the one training recorded.
Crafted payloads built from builtins and numpy callables are refused and never run; a tampered or swapped file is refused
by its hash, from the library and from `healthml evaluate` (one line, exit 1, no traceback)."""
import importlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from conftest import ROOT, run
from healthml.core.io import sha256_file
from healthml.core.layout import Layout
from healthml.core.params import load_params
from healthml.modelling.train import (MODEL_TYPES, PIPELINES, ModelFileError, load_model, load_trained, model_frame,
                                      model_pipelines, save_model)

CONFIGURATIONS = [ROOT/"params.yaml", *sorted((ROOT/"examples").glob("*/params.yaml"))]
FORBIDDEN = {"builtins.exec", "builtins.eval", "builtins.compile", "builtins.getattr", "builtins.setattr",
             "builtins.__import__", "builtins.open", "builtins.iter", "builtins.next", "builtins.object",
             "posix.system", "os.system", "subprocess.Popen", "numpy.full_like", "numpy.ravel", "numpy.load"}


def tiny_frame(spec, n: int = 80, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    "Made-up rows within each feature's declared range (a tenth missing), and a 0/1 outcome: never patient data."
    rng, cols = np.random.default_rng(seed), {}
    for name, f in spec.features.items():
        if f.kind == "numeric":
            lo = f.min if f.min is not None else 0.0
            x = rng.uniform(lo, f.max if f.max is not None else lo + 10, n)
            x[rng.random(n) < 0.1] = np.nan
            cols[name] = x
        else: cols[name] = rng.choice([*(f.categories or ["a", "b", "c"]), None], n)
    return model_frame(pd.DataFrame(cols), spec), np.arange(n) % 2


def configured_models():
    for path in CONFIGURATIONS:
        params = load_params(path)
        for name in params.models: yield pytest.param(path, name, id=f"{path.parent.name}-{name}")


@pytest.mark.parametrize("config, model", configured_models())
def test_every_configured_pipeline_needs_only_allow_listed_types(config, model):
    params = load_params(config)
    X, y = tiny_frame(params.dataset)
    pipe = model_pipelines(params)[model].fit(X, y)
    needed = sio.get_untrusted_types(data=sio.dumps(pipe))
    missing = sorted(set(needed) - MODEL_TYPES)
    assert not missing, (f"model `{model}` ({params.models[model].kind}) of {config.relative_to(ROOT)} needs types not on "
                         f"healthml's allow-list: {', '.join(missing)}. Review each (it must be a class, never a function), "
                         "then add it to MODEL_TYPES in nbs/20_modelling/21_train.ipynb and run nbdev-export")


@pytest.mark.parametrize("kind", [c.model_fields["kind"].default for c in PIPELINES])
def test_every_model_kind_needs_only_allow_listed_types_with_its_defaults(kind):
    params = load_params(ROOT/"params.yaml")
    cfg = next(c for c in PIPELINES if c.model_fields["kind"].default == kind)()
    X, y = tiny_frame(params.dataset, seed=1)
    pipe = PIPELINES[type(cfg)](params.dataset, cfg).fit(X, y)
    assert set(sio.get_untrusted_types(data=sio.dumps(pipe))) <= MODEL_TYPES


def test_the_allow_list_names_only_classes_never_callables():
    assert not MODEL_TYPES & FORBIDDEN
    for name in MODEL_TYPES:
        assert not name.endswith(".") and "*" not in name, name                  # exact names, no wildcards
        module, _, attr = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), attr), type), f"{name} is not a class"


def payload(marker: Path, final) -> Pipeline:
    "The issue's crafted pipeline: numpy and builtins callables chained so that `transform` execs code creating `marker`."
    code = f"open({str(marker)!r}, 'w').close()"
    chain = [(np.full_like, {"fill_value": code, "dtype": object}), (np.ravel, None), (iter, None), (next, None), (final, None)]
    return Pipeline([(f"step{i}", FunctionTransformer(f, kw_args=kw)) for i, (f, kw) in enumerate(chain)])


def test_the_crafted_payload_is_live_under_a_prefix_rule(tmp_path):
    "The threat is real: trusting every type skops lists (all under builtins./numpy.) runs the payload."
    data = sio.dumps(payload(tmp_path/"ran", exec))
    listed = sio.get_untrusted_types(data=data)
    assert all(t.startswith(("numpy.", "builtins.")) for t in listed)
    sio.loads(data, trusted=listed).transform(pd.DataFrame({"x": [1.0]}))
    assert (tmp_path/"ran").exists()


@pytest.mark.parametrize("final", [exec, eval], ids=["exec", "eval"])
def test_a_crafted_payload_is_refused_and_never_runs(tmp_path, final):
    marker, f = tmp_path/"ran", tmp_path/"lightgbm.skops"
    f.write_bytes(sio.dumps(payload(marker, final)))
    with pytest.raises(ModelFileError, match=rf"names types healthml does not load: .*builtins\.{final.__name__}") as e:
        load_model(f, sha256_file(f))                                             # even with its own hash as the record
    assert "\n" not in str(e.value) and str(f) in str(e.value) and "dvc repro train" in e.value.hint
    assert not marker.exists()


@pytest.mark.parametrize("func", [getattr, __import__, compile, os.system, np.load], ids=lambda f: f.__name__)
def test_a_pipeline_holding_any_dangerous_callable_is_refused(tmp_path, func):
    f = tmp_path/"m.skops"
    f.write_bytes(sio.dumps(Pipeline([("step", FunctionTransformer(func))])))
    with pytest.raises(ModelFileError, match=f"names types healthml does not load: .*{func.__name__}"):
        load_model(f, sha256_file(f))


def test_save_model_refuses_a_pipeline_the_loader_would_refuse(tmp_path):
    with pytest.raises(ModelFileError, match="needs types not on healthml's allow-list: builtins.exec"):
        save_model(payload(tmp_path/"ran", exec), tmp_path/"m.skops")
    assert not (tmp_path/"m.skops").exists() and not (tmp_path/"ran").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A tiny trained project: both models of params.yaml fitted on made-up rows, saved, their hashes recorded."
    root = tmp_path_factory.mktemp("trained")
    params = load_params(ROOT/"params.yaml")
    X, y = tiny_frame(params.dataset, n=200, seed=2)
    layout, record = Layout(root), {}
    for name, pipe in model_pipelines(params).items():
        record[name] = {"sha256": sha256_file(save_model(pipe.fit(X, y), layout.model_file(name)))}
    layout.train_metrics.parent.mkdir(parents=True, exist_ok=True)
    layout.train_metrics.write_text(json.dumps(record))
    return root, X


def edited_schema(path: Path, change) -> None:
    "Rewrite the schema.json inside a skops zip with `change(schema)` applied (an attacker's edit)."
    with zipfile.ZipFile(path) as z: files = {n: z.read(n) for n in z.namelist()}
    schema = json.loads(files["schema.json"])
    change(schema)
    files["schema.json"] = json.dumps(schema).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in files.items(): z.writestr(n, b)


def test_a_schema_edited_to_name_a_function_is_refused(trained, tmp_path):
    root, _ = trained
    f = shutil.copy(Layout(root).model_file("logistic"), tmp_path/"logistic.skops")
    edited_schema(f, lambda s: s["content"]["content"]["steps"]["content"][1]["content"][1].update(
        {"__module__": "builtins", "__class__": "exec", "__loader__": "FunctionNode"}))
    with pytest.raises(ModelFileError, match="names types healthml does not load: builtins.exec"):
        load_model(f, sha256_file(f))


def test_trained_models_load_by_their_recorded_hash(trained):
    root, X = trained
    for name in load_params(ROOT/"params.yaml").models:
        assert np.isfinite(load_trained(Layout(root), name).predict_proba(X.head(5))).all()


@pytest.mark.parametrize("tamper", ["one byte", "swapped"])
def test_a_tampered_model_file_is_refused_by_hash(trained, tmp_path, tamper):
    src, _ = trained
    root = Path(shutil.copytree(src, tmp_path/"project"))
    layout = Layout(root)
    target = layout.model_file("lightgbm")
    if tamper == "one byte":
        data = bytearray(target.read_bytes()); data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    else: shutil.copy(layout.model_file("logistic"), target)                    # another valid model in its place
    with pytest.raises(ModelFileError, match="is not the file training wrote") as e:
        load_trained(layout, "lightgbm")
    assert "\n" not in str(e.value) and str(target) in str(e.value) and "dvc repro train" in e.value.hint


def test_a_model_without_a_recorded_hash_is_refused(trained, tmp_path):
    root = Path(shutil.copytree(trained[0], tmp_path/"project"))
    Layout(root).train_metrics.write_text(json.dumps({"lightgbm": {"validation_auroc": 0.8}}))
    with pytest.raises(ModelFileError, match="records no SHA-256 for model `lightgbm`"):
        load_trained(Layout(root), "lightgbm")


@pytest.mark.parametrize("record", ["genuine", "rewritten"])
def test_healthml_evaluate_refuses_a_crafted_model_in_one_line_and_never_runs_it(trained, tmp_path, record):
    "The issue's scenario: a crafted file in models/native; the record kept (refused by hash) or rewritten too (by type)."
    root = Path(shutil.copytree(trained[0], tmp_path/"project"))
    shutil.copy(ROOT/"params.yaml", root/"params.yaml")
    layout = Layout(root)
    layout.splits.mkdir(parents=True, exist_ok=True)
    for split in ("validation", "test"): trained[1].to_parquet(layout.split_file(split))
    marker = tmp_path/"ran"
    crafted = layout.model_file("lightgbm")
    crafted.write_bytes(sio.dumps(payload(marker, exec)))
    if record == "rewritten":
        rec = json.loads(layout.train_metrics.read_text())
        rec["lightgbm"]["sha256"] = sha256_file(crafted)
        layout.train_metrics.write_text(json.dumps(rec))
    r = run(["healthml", "evaluate"], root, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    failed = [line for line in r.stderr.splitlines() if "evaluate failed" in line]
    assert len(failed) == 1 and "lightgbm.skops" in failed[0], r.stderr
    assert ("is not the file training wrote" if record == "genuine" else "builtins.exec") in failed[0], failed[0]
    assert not marker.exists()
