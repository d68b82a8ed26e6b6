"""The one spec compiler (healthml.core.rules): a record sent to the service and the same values in a file get
the same messages from the same rule objects; the compiler works from the ONNX metadata's plain schema as from
the spec; and importing it pulls in neither pandas, pandera nor the training stack (the slim scoring install)."""
import json
import math
import subprocess
import sys

import pandas as pd
from conftest import ROOT, project_env
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from healthml.core.params import load_params
from healthml.core.rules import compile_rules, frame_problems, record_model, record_problems

SPEC = load_params(ROOT/"params.yaml").dataset
ONNX_SCHEMA = json.loads(json.dumps({n: f.model_dump(exclude_none=True) for n, f in SPEC.features.items()}, sort_keys=True))
RULES = compile_rules(ONNX_SCHEMA)
RECORD = record_model(ONNX_SCHEMA)


def value(f: dict):
    "Values a record or a file may hold for a feature: in and out of range, infinite, undeclared categories."
    if f["kind"] == "numeric":
        edges = [f[k] + d for k in ("min", "max") if k in f for d in (-1, 0, 1)]
        return st.one_of(st.none(), st.sampled_from(edges), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=True))
    return st.one_of(st.none(), st.sampled_from(f.get("categories") or ["a"]), st.text(max_size=8))


records = st.fixed_dictionaries({}, optional={n: value(f) for n, f in ONNX_SCHEMA.items()})


def messages(record: dict) -> list[str]:
    return sorted(f"{e['field']}: {e['rule']}" for e in record_problems(RULES, record))


@settings(max_examples=300, deadline=None)
@given(record=records)
def test_a_record_and_the_same_row_of_a_file_get_the_same_messages(record):
    row = frame_problems(RULES, pd.DataFrame([record], columns=list(ONNX_SCHEMA)).astype(object)).iloc[0]
    assert sorted(filter(None, row.split("; "))) == messages(record)


@settings(max_examples=300, deadline=None)
@given(record=records)
def test_the_service_record_model_rejects_what_the_record_check_rejects(record):
    "pydantic (the HTTP boundary) and the record check are compiled from the same rules: they agree on every record."
    try:
        RECORD(**record)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (messages(record) == [])


def test_the_spec_and_the_onnx_metadata_compile_to_the_same_rules():
    assert compile_rules(SPEC.features) == RULES
    assert [r.problem for r in RULES["hrt"]] == ["must be a number", "must be finite (no NaN or infinity)", ">= 0", "<= 300"]
    assert [r.requirement for r in RULES["hrt"]][2:] == [">= 0 beats/min", "<= 300 beats/min"]


def test_nan_and_text_numbers_differ_only_by_transport():
    "JSON carries types (NaN is a value, '70' is text); a file carries text (NaN is an empty cell, '70' a number)."
    assert messages({"age": math.nan, "hrt": "70"}) == ["age: must be finite (no NaN or infinity)", "hrt: must be a number"]
    assert frame_problems(RULES, pd.DataFrame({"age": [math.nan], "hrt": ["70"]})).tolist() == [""]


def test_the_compiler_imports_no_pandas_pandera_or_training_stack():
    code = ("import sys\nfrom healthml.core.rules import compile_rules, record_model, record_problems\n"
            f"r = compile_rules({ONNX_SCHEMA!r}); record_model({ONNX_SCHEMA!r}); record_problems(r, {{'age': 70}})\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'pandera', 'sklearn', 'lightgbm', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=project_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
