"""The scoring service locked down (issue 15 item 4), for real over loopback: keys on every endpoint but the probes,
a separate admin key, answers that do not say what was wrong, no start without keys unless --insecure-local (loopback
only), a loud warning on a network bind, no Swagger UI from a CDN, nothing echoed of unknown keys, refused reloads as 409
with a reason, start-up failures in one line, and a prediction log hashed under a per-deployment key, readable by its
owner only."""
import hashlib
import hmac
import json
import subprocess

import pytest
from conftest import BIN
from test_serve import ADMIN_KEY, LOG_KEY, USER_KEY, Server, free_port, records_of, service_env

NO_KEY, WRONG_KEY = None, "test-wrong-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(pipeline_project, tmp_path_factory):
    "One service for the module, on the pipeline's model file, logging into a private folder."
    root, _ = pipeline_project
    log = tmp_path_factory.mktemp("security")/"predictions.jsonl"
    s = Server(root, "--log", str(log))
    s.root, s.log = root, log
    yield s
    s.stop()


def serve_once(root, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
    "`healthml serve` expected to stop by itself (a refused start)."
    return subprocess.run([str(BIN/"healthml"), "serve", "--port", str(free_port()), *args], cwd=root, env=env or service_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_no_key_or_a_wrong_key_gets_401_everywhere_but_the_probes(server):
    for method, path in [("POST", "/v1/predict"), ("GET", "/v1/model"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("POST", "/v1/admin/reload"), ("GET", "/no/such/endpoint")]:
        for key in (NO_KEY, WRONG_KEY, USER_KEY[:-1], USER_KEY + "x"):
            status, body = server.request(method, path, {"records": [{}]} if method == "POST" else None, key=key)
            assert (status, body) == (401, {"detail": "authentication required"}), (method, path)
    assert server.get("/healthz", key=None)[0] == 200 and server.get("/readyz", key=None)[0] == 200


def test_a_user_key_scores_but_gets_403_on_admin_endpoints(server):
    records, _ = records_of(server.root, 2)
    assert server.post("/v1/predict", {"records": records}, key=USER_KEY)[0] == 200
    assert server.get("/v1/model", key=USER_KEY)[0] == 200
    assert server.post("/v1/admin/reload", key=USER_KEY) == (403, {"detail": "not permitted"})
    assert server.post("/v1/admin/reload", key=ADMIN_KEY)[0] == 200                  # the admin key reaches it


def test_unknown_keys_are_counted_never_echoed(server):
    name, long_key = "Ava Jones", "k" * 5000
    status, body = server.post("/v1/predict", {"records": [{"age": 70, name: 1, long_key: 2}], "Smith": 3}, key=USER_KEY)
    text = json.dumps(body)
    assert status == 422 and "Jones" not in text and "Smith" not in text and "kkkk" not in text and len(text) < 1000
    assert {e["field"] for e in body["errors"]} == {"records.0", "(body)"}
    assert next(e for e in body["errors"] if e["field"] == "records.0")["rule"] == "2 unknown field(s)"


def test_the_logged_input_hash_cannot_be_recomputed_without_the_deployment_key(server):
    records, _ = records_of(server.root, 3)
    status, _ = server.post("/v1/predict", {"records": records}, key=USER_KEY)
    assert status == 200
    logged = [json.loads(x) for x in server.log.read_text().splitlines()][-3:]
    assert server.log.stat().st_mode & 0o777 == 0o600                                # readable by the service's user only
    for record, entry in zip(records, logged):
        canonical = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        assert entry["input_hmac_sha256"] != hashlib.sha256(canonical).hexdigest()   # the guessable unsalted hash is gone
        assert entry["input_hmac_sha256"] != hmac.new(b"another-deployment-key-0123", canonical, hashlib.sha256).hexdigest()
        assert entry["input_hmac_sha256"] == hmac.new(LOG_KEY.encode(), canonical, hashlib.sha256).hexdigest()
        assert "input_sha256" not in entry


def test_an_abstention_is_logged_without_a_risk_and_the_monitor_reads_the_log(server):
    from healthml.deploy.monitor import read_prediction_log
    records, _ = records_of(server.root, 2)
    status, body = server.post("/v1/predict", {"records": [{}, *records]}, key=USER_KEY)
    assert status == 200 and body["predictions"][0]["band"] == "insufficient data" and body["predictions"][0]["risk"] is None
    entry = json.loads(server.log.read_text().splitlines()[-3])
    assert (entry["risk"], entry["band"]) == (None, "insufficient data")
    log = read_prediction_log(server.log)              # abstentions are kept, flagged and without a risk (the abstention rate)
    lines = server.log.read_text().splitlines()
    assert len(log) == len(lines) and log["abstained"].sum() == sum('"risk":null' in x for x in lines) >= 1
    assert log["risk"].isna().tolist() == log["abstained"].tolist()


def test_docs_is_off_and_loads_nothing_from_the_network(server, browser):
    assert server.get("/docs", key=USER_KEY)[0] == 404 and server.get("/redoc", key=USER_KEY)[0] == 404
    assert "cdn" not in json.dumps(server.get("/openapi.json", key=USER_KEY)[1]).lower()
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_extra_http_headers({"Authorization": f"Bearer {USER_KEY}"})
    response = page.goto(f"http://127.0.0.1:{server.port}/docs")
    page.wait_for_load_state("load")
    page.close()
    assert response.status == 404
    assert requests and all(u.startswith(f"http://127.0.0.1:{server.port}/") for u in requests), requests


def test_start_without_keys_is_refused_unless_insecure_local_which_binds_loopback_only(pipeline_project, tmp_path):
    root, _ = pipeline_project
    bare = {k: v for k, v in service_env().items() if k not in ("HEALTHML_API_KEYS", "HEALTHML_ADMIN_KEYS")}
    r = serve_once(root, "--log", str(tmp_path/"p.jsonl"), env=bare)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no API keys" in r.stderr and "--insecure-local" in r.stderr
    r = serve_once(root, "--insecure-local", "--host", "0.0.0.0", "--log", str(tmp_path/"p.jsonl"), env=bare)
    assert r.returncode == 1 and "--insecure-local serves on 127.0.0.1 only" in r.stderr and "Traceback" not in r.stderr
    s = Server(root, "--insecure-local", "--log", str(tmp_path/"p.jsonl"), env=bare)
    try:
        assert s.get("/v1/model", key=None)[0] == 200                                # open, on this machine only
    finally:
        _, err = s.stop()
    assert "WARNING: --insecure-local: no authentication" in err and "on http://127.0.0.1:" in err


def test_a_network_bind_is_warned_about_loudly_with_the_tls_proxy_advice(pipeline_project, tmp_path):
    root, _ = pipeline_project
    s = Server(root, "--host", "0.0.0.0", "--log", str(tmp_path/"p.jsonl"))
    try:
        assert s.get("/readyz", key=None)[0] == 200 and s.get("/v1/model", key=None)[0] == 401
    finally:
        _, err = s.stop()
    assert "WARNING: binding 0.0.0.0" in err and "TLS-terminating reverse proxy" in err


def test_the_log_key_file_is_made_0600_and_the_log_0600(pipeline_project, tmp_path):
    root, _ = pipeline_project
    env = {k: v for k, v in service_env().items() if k != "HEALTHML_LOG_KEY"}
    s = Server(root, "--log", str(tmp_path/"p.jsonl"), "--log-key", str(tmp_path/"secret/log.key"), env=env)
    try:
        records, _ = records_of(root, 1)
        assert s.post("/v1/predict", {"records": records}, key=USER_KEY)[0] == 200
    finally:
        s.stop()
    key = (tmp_path/"secret/log.key")
    assert key.stat().st_mode & 0o777 == 0o600 and (tmp_path/"p.jsonl").stat().st_mode & 0o777 == 0o600
    entry = json.loads((tmp_path/"p.jsonl").read_text().splitlines()[0])
    canonical = json.dumps(records[0], sort_keys=True, separators=(",", ":")).encode()
    assert entry["input_hmac_sha256"] == hmac.new(key.read_text().strip().encode(), canonical, hashlib.sha256).hexdigest()


def test_start_up_failures_are_one_line_and_a_hint(pipeline_project, tmp_path):
    root, _ = pipeline_project
    model = root/"models/onnx/lightgbm.onnx"
    (tmp_path/"broken.json").write_text("{not json")
    (tmp_path/"junk.onnx").write_bytes(b"not an onnx model")
    (tmp_path/"junk.json").write_text(json.dumps({"sha256": hashlib.sha256(b"not an onnx model").hexdigest()}))
    cases = [(["--model", str(model), "--manifest", str(tmp_path/"broken.json")], "the manifest is not valid JSON"),
             (["--model", str(model), "--manifest", str(tmp_path/"absent.json")], "absent.json not found"),
             (["--model", str(tmp_path/"junk.onnx"), "--manifest", str(tmp_path/"junk.json")], "not a loadable ONNX model")]
    for args, why in cases:
        r = serve_once(root, *args, "--log", str(tmp_path/"p.jsonl"))
        failure = [line for line in r.stderr.splitlines() if "✗" in line]
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(failure) == 1 and why in failure[0] and "hint:" in r.stderr, r.stderr


def test_every_refused_reload_is_a_409_with_its_reason_and_is_logged(pipeline_project, tmp_path):
    root, _ = pipeline_project
    deploy = tmp_path/"deploy"
    deploy.mkdir()
    data = (root/"models/onnx/lightgbm.onnx").read_bytes()
    (deploy/"model.onnx").write_bytes(data)
    (deploy/"deploy.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
    s = Server(root, "--model", str(deploy/"model.onnx"), "--manifest", str(deploy/"deploy.json"), "--log", str(tmp_path/"p.jsonl"))
    try:
        (deploy/"model.onnx").write_bytes(b"junk")
        (deploy/"deploy.json").write_text(json.dumps({"sha256": hashlib.sha256(b"junk").hexdigest()}))
        status, body = s.post("/v1/admin/reload")
        assert status == 409 and "not a loadable ONNX model" in body["detail"]
        (deploy/"deploy.json").write_text("{not json")
        status, body = s.post("/v1/admin/reload")
        assert status == 409 and "not valid JSON" in body["detail"]
        assert s.post("/v1/predict", {"records": [{"age": 70.0}]}, key=USER_KEY)[0] == 200   # the old model keeps serving
    finally:
        _, err = s.stop()
    assert err.count("reload refused, still serving") == 2 and "Traceback" not in err
