"""The model registry for real: embedded SQLite store, and a real `mlflow server` on a private PostgreSQL over loopback (team mode)."""
import glob
import json
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import BIN, SNAPSHOT, project_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthml.governance.audit import AuditLog, verify_log
from healthml.deploy.serve import free_port


def cli(root, *args, check=True, env=None):
    e = project_env() | (env or {})
    r = subprocess.run([str(BIN/"healthml"), *args], cwd=root, env=e, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0: raise AssertionError(f"healthml {' '.join(args)} -> {r.returncode}\n{r.stderr}")
    return r


def registry_state(root):
    from healthml.core.params import load_params
    from healthml.governance.registry import Registry
    reg = Registry(load_params(root/"params.yaml"), root)
    return reg


def test_registration_records_each_version_with_its_evidence_in_the_audit_log(three_versions):
    reg = registry_state(three_versions.root)
    vs = {v["version"]: v for v in reg.versions()}
    assert sorted(vs) == [1, 2, 3]
    assert [vs[i]["gate"] for i in (1, 2, 3)] == ["PASS", "PASS", "FAIL"]
    assert reg.alias("candidate") == 2 and reg.alias("champion") is None   # nothing is promoted automatically
    logged = reg.state().versions
    for n, v in vs.items():
        assert len(v["onnx_sha256"]) == 64 and v["git_commit"] and v["report"].startswith("reports/support2-mortality/")
        assert logged[n]["onnx_sha256"] == v["onnx_sha256"] and len(logged[n]["evidence_sha256"]) == 64
        assert (three_versions.root/logged[n]["report"]/"manifest.json").exists()
    assert not (three_versions.root/"metrics/registry.json").exists()    # no working-tree file claims a version


def test_promote_rollback_and_the_audit_trail(registry_clone):
    root = registry_clone
    cli(root, "model", "promote", "1", "--reason", "first release", "--actor", "dr.ahmed")
    out = cli(root, "model", "promote", "2", "--reason", "better calibrated", "--actor", "dr.ahmed")
    assert "champion is now version 2" in out.stderr
    refused = cli(root, "model", "promote", "3", "--reason", "looks fine", check=False)
    assert refused.returncode == 1 and "gate verdict (its logged evidence) is FAIL" in refused.stderr
    no_reason = cli(root, "model", "promote", "3", "--override", check=False)
    assert no_reason.returncode == 1 and "needs a reason" in no_reason.stderr
    assert registry_state(root).alias("champion") == 2
    back = cli(root, "model", "rollback", "--reason", "alert rate doubled", "--actor", "dr.ahmed")
    assert "champion is now version 1" in back.stderr
    again = cli(root, "model", "rollback", "--reason", "again", check=False)
    assert again.returncode == 1 and "nothing to roll back to" in again.stderr
    assert registry_state(root).alias("champion") == 1
    cli(root, "model", "promote", "3", "--override", "--reason", "committee accepted lower AUROC for this pilot", "--actor", "dr.lee")
    assert registry_state(root).alias("champion") == 3
    entries = AuditLog(root/"audit/audit.jsonl").entries()
    actions = [(e["action"], e["details"].get("version")) for e in entries]
    assert actions[-4:] == [("promote", 1), ("promote", 2), ("rollback", 1), ("override", 3)]
    assert entries[-1]["actor"] == "dr.lee" and "pilot" in entries[-1]["reason"]
    ok = cli(root, "audit", "verify")
    assert "chain, signatures and anchor intact; registry matches the log" in ok.stderr
    listing = cli(root, "model", "list").stdout
    assert "version 3 [champion]" in listing and "version 2 [candidate]" in listing


def test_lineage_walks_from_a_model_hash_to_data_params_and_code(three_versions):
    reg = registry_state(three_versions.root)
    v1 = reg.version(1)
    out = json.loads(cli(three_versions.root, "lineage", v1["onnx_sha256"][:12]).stdout)
    assert out["version"] == 1 and out["mlflow_run"] == v1["run_id"]
    assert out["cohort_sha256"] == "4f7dfcfb0d702401adfd0fa47702ed18fdd4dfe37acd0bcf1055acb7df007a1b"
    assert len(out["git_commit"]) >= 40 and len(out["params_sha256"]) == 64 and out["report"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_level_tampering_of_the_audit_log_is_detected(three_versions, tmp_path, data):
    log = AuditLog(three_versions.root/"audit/audit.jsonl")
    raw, anchor = log.path.read_bytes(), log.head()
    assert verify_log(log, anchor) == []
    kind = data.draw(st.sampled_from(["edit", "delete_byte", "insert", "drop_line", "swap_lines", "truncate"]))
    lines = raw.split(b"\n")[:-1]
    if kind == "edit":
        i = data.draw(st.integers(0, len(raw) - 1))
        b = data.draw(st.integers(0, 255).filter(lambda x: x != raw[i]))
        bad = raw[:i] + bytes([b]) + raw[i + 1:]
    elif kind == "delete_byte":
        i = data.draw(st.integers(0, len(raw) - 2))                  # (the final newline alone is formatting)
        bad = raw[:i] + raw[i + 1:]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(raw) - 1))
        bad = raw[:i] + data.draw(st.binary(min_size=1, max_size=4).filter(lambda s: s.strip(b"\n") != b"")) + raw[i:]
    elif kind == "drop_line":
        i = data.draw(st.integers(0, len(lines) - 1))
        bad = b"\n".join(lines[:i] + lines[i + 1:]) + b"\n"
    elif kind == "swap_lines":
        i = data.draw(st.integers(0, len(lines) - 2))
        bad = b"\n".join(lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2:]) + b"\n"
    else:
        bad = raw[:data.draw(st.integers(0, len(raw) - 2))]
    p = tmp_path/f"tampered-{kind}.jsonl"
    p.write_bytes(bad)
    assert verify_log(AuditLog(p), anchor), kind




def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    import urllib.request
    end = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"{url} never answered:\n" + log.read_text()[-3000:]) from None
            time.sleep(0.25)


@contextmanager
def mlflow_server(backend_store_uri: str, folder: Path, env: dict | None = None):
    "`mlflow server` on a free loopback port over `backend_store_uri`, artifacts in `folder`; its URL; stopped afterwards."
    port, log = free_port(), folder/"mlflow-server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(BIN/"mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--backend-store-uri", backend_store_uri, "--artifacts-destination",
                                   str(folder/"server-artifacts"), "--workers", "1"],
                                  env=project_env() | (env or {}), stdout=subprocess.DEVNULL, stderr=out)
        try:
            uri = f"http://127.0.0.1:{port}"
            _wait_until_up(f"{uri}/health", server, log)
            yield uri
        finally:
            server.terminate()
            server.wait(timeout=30)


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: from PATH, else from Debian's /usr/lib/postgresql/<version>/bin (the newest), which
    is not on PATH; `make postgres` installs the package."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
                                                   reverse=True)), None)
    if not found: pytest.fail(f"PostgreSQL's {name} is not installed: run `make postgres` (Debian's postgresql package)")
    return found


@contextmanager
def private_postgres():
    """A PostgreSQL instance of its own: `initdb` into a new temporary folder, `pg_ctl start` on a free 127.0.0.1 port
    with its unix socket in that folder, password (SCRAM) authentication, a database `mlflow` owned by a role `mlflow`;
    stopped and deleted afterwards. The password reaches clients through a pgpass file, never a command line. PostgreSQL
    refuses to run as root: as root the server runs as Debian's `postgres` system user."""
    import pwd
    import secrets
    import tempfile
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    createdb = str(Path(pg_ctl).resolve().parent/"createdb")
    user = "postgres" if os.geteuid() == 0 else None
    d = Path(tempfile.mkdtemp(prefix="healthml-pg-"))                  # short: a unix socket path has ~100 characters
    data, port, password = d/"data", free_port(), secrets.token_hex(16)
    (d/"password").write_text(password + "\n")
    (d/"pgpass").write_text("".join(f"{host}:{port}:*:mlflow:{password}\n" for host in ("127.0.0.1", d)))  # TCP, unix socket
    (d/"pgpass").chmod(0o600)
    if user:
        owner = pwd.getpwnam(user)
        for p in (d, d/"password"): os.chown(p, owner.pw_uid, owner.pw_gid)
    def as_server(*cmd):
        r = subprocess.run([*cmd], user=user, capture_output=True, text=True, timeout=60, cwd=d)
        if r.returncode != 0: raise AssertionError(f"{' '.join(cmd[:2])} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    started = False
    try:
        as_server(initdb, "-D", str(data), "-U", "mlflow", "--pwfile", str(d/"password"), "--auth=scram-sha-256",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        as_server(pg_ctl, "-D", str(data), "-l", str(d/"server.log"), "-w", "-t", "30", "-o",
                  f"-h 127.0.0.1 -p {port} -k {d} -c fsync=off", "start")
        started = True
        env = {"PGPASSFILE": str(d/"pgpass")}
        r = subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                           env=os.environ | env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        yield SimpleNamespace(uri=f"postgresql://mlflow@127.0.0.1:{port}/mlflow", env=env, socket_dir=d, port=port)
    finally:
        if started: as_server(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")   # thrown away: no checkpoint
        shutil.rmtree(d, ignore_errors=True)


def test_team_mode_against_a_real_mlflow_server_on_postgresql(three_versions, tmp_path):
    """What a team does against a shared tracking server, here `mlflow server` over loopback on a private PostgreSQL
    (Debian's package): register the fixture's FAIL model (v1 here), promote it by override, register again (a no-op),
    register the passing run (v2), promote it, roll back, verify the audit log against the registry. The registry is in
    the database (two versions, the champion alias), the artifacts in the server's store; both servers are stopped."""
    psycopg = pytest.importorskip("psycopg", reason="the `team` extra (psycopg) is not installed")
    root = shutil.copytree(three_versions.root, tmp_path/"p", symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "audit"))
    with private_postgres() as pg:
        with mlflow_server(pg.uri, tmp_path, env=pg.env) as uri:
            env = {"MLFLOW_TRACKING_URI": uri}
            cli(root, "model", "register", env=env)
            cli(root, "model", "promote", "1", "--override", "--reason", "pilot", env=env)
            assert "version 1" in cli(root, "model", "register", env=env).stderr    # registering the same model again: a no-op
            for f in SNAPSHOT:                                          # the passing v2 run's outputs, as `dvc repro` left them
                target = root/f
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
                src = three_versions.v2_outputs/f
                if src.is_dir(): shutil.copytree(src, target, symlinks=True)
                elif src.exists(): shutil.copy(src, target)
            cli(root, "model", "register", env=env)
            cli(root, "model", "promote", "2", "--reason", "passed", env=env)
            assert "champion is now version 1" in cli(root, "model", "rollback", "--reason", "drill", env=env).stderr
            assert "registry matches the log" in cli(root, "audit", "verify", env=env).stderr
        with psycopg.connect(host=str(pg.socket_dir), port=pg.port, user="mlflow", dbname="mlflow",
                             passfile=pg.env["PGPASSFILE"]) as db:   # over the unix socket in the temporary folder
            versions = db.execute("SELECT name, version FROM model_versions ORDER BY version").fetchall()
            aliases = dict(db.execute("SELECT alias, version FROM registered_model_aliases").fetchall())
    assert [v for _, v in versions] == [1, 2] and {n for n, _ in versions} == {"support2-mortality"}
    assert aliases["champion"] == 1
    logged = [e["details"]["gate"] for e in AuditLog(root/"audit/audit.jsonl").entries() if e["action"] == "register"]
    assert logged == ["FAIL", "PASS"]
    assert any((tmp_path/"server-artifacts").rglob("model.onnx"))
    assert not pg.socket_dir.exists()                                  # stopped and removed
    with socket.socket() as s:                                         # and nothing listens on its port any more
        assert s.connect_ex(("127.0.0.1", pg.port)) != 0


def test_rollback_to_a_missing_artifact_is_refused_and_champion_stays(registry_clone):
    root = registry_clone
    cli(root, "model", "promote", "2", "--reason", "x")
    cli(root, "model", "promote", "1", "--reason", "y")             # champion 1; the previous champion is 2
    reg = registry_state(root)
    uri = reg.client.get_run(reg.version(2)["run_id"]).info.artifact_uri
    shutil.rmtree(uri.removeprefix("file://") + "/onnx")             # version 2's model is gone from the store
    r = cli(root, "model", "rollback", "--reason", "drill", check=False)
    assert r.returncode == 1 and "cannot be read" in r.stderr and "champion unchanged" in r.stderr
    assert "Traceback" not in r.stderr
    assert registry_state(root).alias("champion") == 1
    refused = cli(root, "model", "promote", "2", "--reason", "z", check=False)
    assert refused.returncode == 1 and registry_state(root).alias("champion") == 1
