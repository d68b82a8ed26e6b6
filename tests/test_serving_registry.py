"""Serving follows the registry, for real: `healthml serve --model champion` (uvicorn on loopback) switches to the new
champion within its poll interval after `healthml model rollback`, without a failed request; a tampered registry
artifact is refused by `healthml predict` and by the running service, which keeps its model; `healthml monitor`
records which version it used and warns when it is not a registered, gate-passing one."""
import http.client
import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import BIN, clone_project, run
from test_serve import USER_KEY, Server, records_of

POLL = 1  # seconds between the service's looks at its alias


def registry(root: Path):
    from healthml.core.params import load_params
    from healthml.governance.registry import Registry
    return Registry(load_params(root/"params.yaml"), root)


@pytest.fixture
def served_project(three_versions, tmp_path):
    "A private copy of the three-version project with version 1 promoted, then version 2: champion 2, rollback target 1."
    from healthml.governance.registry import promote
    root = clone_project(three_versions.root, tmp_path/"project")
    reg = registry(root)
    promote(reg, 1, actor="dr.ahmed", reason="first release")
    promote(reg, 2, actor="dr.ahmed", reason="better calibrated")
    return root


def tamper(root: Path, version: int) -> None:
    "Flip one byte of a version's ONNX file in the MLflow artifact store and in the local cache of fetched models."
    reg = registry(root)
    v = reg.version(version)
    store = Path(reg.client.get_run(v["run_id"]).info.artifact_uri.removeprefix("file://"))/"onnx/model.onnx"
    for f in (store, root/".healthml/models"/f"{v['onnx_sha256']}.onnx"):
        if f.exists():
            data = bytearray(f.read_bytes())
            data[len(data) // 3] ^= 0x01
            f.write_bytes(bytes(data))


def model_in_service(server) -> dict:
    status, info = server.get("/v1/model")
    assert status == 200, info
    return info["registry"]


class Load:
    "Clients posting one record at a time until stopped; every response's status and the registry version it names."
    def __init__(self, server, records, clients=2):
        self.results, self._stop = [], threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(server.port, records, k)) for k in range(clients)]
        for t in self.threads: t.start()

    def _client(self, port, records, k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not self._stop.is_set():
            conn.request("POST", "/v1/predict", json.dumps({"records": [records[k % len(records)]]}),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {USER_KEY}"})
            r = conn.getresponse()
            body = json.loads(r.read())
            self.results.append((r.status, body.get("model", {}).get("registry_version")))
            k += 1
        conn.close()

    def stop(self):
        self._stop.set()
        for t in self.threads: t.join()
        return self.results


def test_a_rollback_switches_the_running_service_within_the_poll_interval_without_a_failed_request(served_project, tmp_path):
    root = served_project
    reg = registry(root)
    sha = {v: reg.version(v)["onnx_sha256"] for v in (1, 2)}
    server = Server(root, "--model", "champion", "--poll-seconds", str(POLL), "--log", str(tmp_path/"p.jsonl"))
    records, _ = records_of(root, 20)
    load = None
    try:
        info = model_in_service(server)
        assert (info["name"], info["version"], info["alias"], info["sha256"], info["gate"]) == ("support2-mortality", 2, "champion", sha[2], "PASS")
        load = Load(server, records)
        time.sleep(0.5)
        run([str(BIN/"healthml"), "model", "rollback", "--reason", "alert rate doubled", "--actor", "dr.ahmed"], root)
        rolled_back, deadline = time.monotonic(), time.monotonic() + POLL + 4   # one poll, then fetch, verify, load
        while model_in_service(server)["version"] != 1 and time.monotonic() < deadline: time.sleep(0.05)
        switched = time.monotonic() - rolled_back
        info = model_in_service(server)
        assert (info["version"], info["sha256"]) == (1, sha[1]), f"still version {info['version']} {switched:.1f} s after the rollback"
        time.sleep(0.5)                                            # requests keep flowing on the new model
        results = load.stop()
    finally:
        if load: load.stop()
        _, err = server.stop()
    assert {s for s, _ in results} == {200} and len(results) > 50
    assert [v for _, v in results][0] == 2 and [v for _, v in results][-1] == 1 and {v for _, v in results} == {1, 2}
    assert "model switched: support2-mortality v2 (champion) -> support2-mortality v1 (champion)" in err
    log = [json.loads(x) for x in (tmp_path/"p.jsonl").read_text().splitlines()]
    assert {(e["registry_version"], e["model_sha256"], e["model_alias"]) for e in log} == {(2, sha[2], "champion"), (1, sha[1], "champion")}


def test_a_tampered_registry_artifact_is_refused_and_the_service_keeps_its_model(served_project, tmp_path):
    root = served_project
    test = pd.read_parquet(root/"data/processed/test.parquet").head(200)
    test.to_parquet(tmp_path/"in.parquet")
    sha2 = registry(root).version(2)["onnx_sha256"]
    r = run([str(BIN/"healthml"), "predict", str(tmp_path/"in.parquet"), "-o", str(tmp_path/"s.parquet"),
             "--model", "models:/support2-mortality@champion"], root)
    assert "200 of 200 rows scored with support2-mortality v2 (champion)" in r.stderr and "WARNING" not in r.stderr
    assert pd.read_parquet(tmp_path/"s.parquet").model_version.unique().tolist() == [sha2[:12]]

    server = Server(root, "--poll-seconds", str(POLL), "--log", str(tmp_path/"p.jsonl"))   # the champion by default
    records, _ = records_of(root, 5)
    try:
        assert model_in_service(server)["version"] == 2
        status, body = server.post("/v1/predict", {"records": records}, key=USER_KEY)   # the registry's explainer came too
        assert status == 200 and "reasons_note" not in body
        assert all(len(p["reasons"]) == 3 for p in body["predictions"] if not p["abstained"])
        tamper(root, 2)                                            # the model in service, in the store and the cache
        status, body = server.post("/v1/admin/reload")
        assert status == 409 and body["detail"].startswith("reload refused:") and body["registry_version"] == 2
        refused = run([str(BIN/"healthml"), "predict", str(tmp_path/"in.parquet"), "-o", str(tmp_path/"t.parquet")], root, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        failure = [line for line in refused.stderr.splitlines() if "✗" in line]
        assert len(failure) == 1 and "SHA-256" in failure[0] and "registered" in failure[0], refused.stderr
        assert not (tmp_path/"t.parquet").exists()

        tamper(root, 1)                                            # then the alias moved outside healthml to a tampered version
        reg = registry(root)
        reg.client.set_registered_model_alias(reg.name, "champion", "1")
        time.sleep(3 * POLL + 1)                                   # several polls see the moved alias
        assert model_in_service(server)["version"] == 2
        status, body = server.post("/v1/predict", {"records": records}, key=USER_KEY)
        assert status == 200 and body["model"]["registry_version"] == 2
    finally:
        _, err = server.stop()
    refusals = [line for line in err.splitlines() if "model not swapped, still serving support2-mortality v2 (champion)" in line]
    assert len(refusals) == 1, err                                 # one line, not one per poll
    assert "model switched" not in err


def test_monitor_records_the_version_it_used_and_warns_when_it_is_not_gate_passing(three_versions, tmp_path):
    root = clone_project(three_versions.root, tmp_path/"project")                 # no champion yet: the working tree's file
    window = tmp_path/"ward_2026_11.parquet"
    pd.read_parquet(root/"data/processed/test.parquet").sample(600, random_state=1).to_parquet(window)
    for args, out in (([], "file"), (["--model", "3"], "v3")):
        r = run([str(BIN/"healthml"), "monitor", "--current", str(window), "--out", str(tmp_path/out), *args], root, check=False)
        assert r.returncode in (0, 3, 4), r.stderr
        recorded = json.loads((tmp_path/out/"monitor.json").read_text())["model"]
        if out == "file":
            assert "WARNING: models/onnx/lightgbm.onnx is not a registered version; used because support2-mortality has no champion yet" in r.stderr
            assert recorded["registry"]["registered"] is False and recorded["registry"]["sha256"] == recorded["sha256"]
        else:
            assert "WARNING: support2-mortality v3 did not pass the gate (verdict FAIL at registration)" in r.stderr
            reg = recorded["registry"]
            assert (reg["version"], reg["registered"], reg["gate"], reg["sha256"]) == (3, True, "FAIL", recorded["sha256"])
            assert "did not pass the gate" in reg["warning"]
