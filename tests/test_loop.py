"""One trustworthy loop: an experiment stays an experiment; there is no way around the gate or the audit trail; a
process killed between any two writes is finished by a rerun. Each attack of issue 14 is reproduced and refused."""
import hashlib
import json
import shutil
import signal
import subprocess

from conftest import BIN, project_env, run, set_params

from healthml.core.faults import FAULT_ENV

MODEL = "support2-mortality"


def cli(root, *args, check=True, env=None):
    r = subprocess.run([str(BIN/"healthml"), *args], cwd=root, env=project_env() | (env or {}), capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode != 0: raise AssertionError(f"healthml {' '.join(args)} -> {r.returncode}\n{r.stderr}")
    assert "Traceback" not in r.stderr
    return r


def registry(root):
    from healthml.core.params import load_params
    from healthml.governance.registry import Registry
    return Registry(load_params(root/"params.yaml"), root)


def governance_state(root) -> dict:
    "Everything an experiment must leave alone: registry versions and aliases, the audit log, reports/ (bytes)."
    reg = registry(root)
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((root/"reports").rglob("*")) if p.is_file()}
    return {"versions": [(v["version"], v["aliases"]) for v in reg.versions()], "anchor": reg.anchor(),
            "audit": (root/"audit/audit.jsonl").read_bytes(), "reports": files}


def verified(root) -> bool:
    "What `healthml audit verify` checks, in this process (the CLI itself is exercised in each test at least once)."
    from healthml.governance.registry import verify_audit
    return verify_audit(registry(root)) == []


# -- experiments ------------------------------------------------------------------------------------------------

def test_an_experiment_trains_and_reports_but_never_touches_the_registry(project_clone):
    root = project_clone
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline run"], root)                 # a team's main branch after `dvc repro`
    before = governance_state(root)
    exp = run(["healthml", "warm", "dvc", "exp", "run", "-n", "leaves31", "-S", "models.lightgbm.num_leaves=31",
               "-S", "evaluate.n_bootstrap=100"], root)                  # (fewer replicates: the loop is under test here)
    stages = [s for s in ("train", "evaluate", "privacy", "export", "footprint", "report", "phi_scan", "gate") if f"Running stage '{s}'" in exp.stdout]
    assert stages == ["train", "evaluate", "privacy", "export", "footprint", "report", "phi_scan", "gate"], exp.stdout[-2000:]
    assert governance_state(root) == before                              # no version, alias, audit entry or filed report
    from healthml.core.params import load_params
    p = load_params(root/"params.yaml")                                  # DVC re-dumped the file; "no" is still text
    assert p.dataset.features["ca"].categories == ["no", "yes", "metastatic"] and p.models["lightgbm"].num_leaves == 31
    shown = run(["dvc", "exp", "show", "--only-changed", "--md"], root).stdout
    assert "leaves31" in shown and "num_leaves" in shown and "n_estimators" not in shown
    assert len(shown.splitlines()[0].split("|")) < 60                    # readable: only what changed
    run(["git", "checkout", "--", "params.yaml"], root)
    run(["dvc", "exp", "apply", "leaves31"], root)
    assert load_params(root/"params.yaml").models["lightgbm"].num_leaves == 31
    reg = cli(root, "model", "register")                                 # the explicit step: now it is a version
    assert "version 2" in reg.stderr and verified(root)


# -- the gate and the audit trail under attack ------------------------------------------------------------------

def test_every_way_around_the_gate_is_refused(registry_clone):
    "three_versions: v1 PASS, v2 PASS (candidate), v3 FAIL under a stricter plan; the work tree holds v3's run."
    root = registry_clone
    gate_file = root/"metrics/gate.json"
    original = gate_file.read_bytes()
    forged = json.loads(original)
    forged.update(verdict="PASS", passed=True, failed_rules=[])
    for r in forged["rules"]: r.update(passed=r["passed"] if r["passed"] is None else True)
    gate_file.write_text(json.dumps(forged))
    r = cli(root, "model", "register", check=False)                      # 1. an edited verdict file
    assert r.returncode == 1 and "says PASS but its evidence gives FAIL" in r.stderr
    gate_file.write_bytes(original)
    lenient = root.parent/"lenient.yaml"                                 # 1b. the rules read from another params file
    lenient.write_bytes((root/"params.yaml").read_bytes())
    for args in (["gate"], ["model", "register"]):
        r = cli(root, *args, "--params", str(lenient), check=False)
        assert r.returncode == 1 and "the params the pipeline ran with" in r.stderr, r.stderr
    leak = root/"metrics/leakage.json"                                   # 2a. the leakage audit the leakage rule reads,
    audit = leak.read_bytes()                                            #     its threshold raised so nothing is suspected
    leak.write_text(leak.read_text().replace('"auroc_threshold": 0.8', '"auroc_threshold": 0.99', 1))
    assert leak.read_bytes() != audit
    r = cli(root, "model", "register", check=False)
    assert r.returncode == 1 and "pipeline outputs differ from dvc.lock (stage split" in r.stderr, r.stderr
    run(["dvc", "commit", "-f", "-q"], root)                            # 2b. the edit recorded by DVC itself: dvc.lock
    assert "up to date" in run(["dvc", "status"], root).stdout           #     now agrees, but no stage sealed it
    for args in (["gate"], ["model", "register"]):
        r = cli(root, *args, check=False)
        assert r.returncode == 1 and "metrics/leakage.json is not what `healthml split` wrote" in r.stderr, r.stderr
    assert [v["version"] for v in registry(root).versions()] == [3, 2, 1]   # nothing registered
    sealed = (root/"seals/split.json").read_bytes()
    seal = json.loads(sealed)                                            # 2c. its seal rewritten to match, without the key
    seal["outs"]["metrics/leakage.json"] = hashlib.sha256(leak.read_bytes()).hexdigest()
    (root/"seals/split.json").write_text(json.dumps(seal))
    run(["dvc", "commit", "-f", "-q", "split"], root)
    r = cli(root, "model", "register", check=False)
    assert r.returncode == 1 and "seals/split.json is not signed with the audit key" in r.stderr, r.stderr
    (root/"seals/split.json").write_bytes(sealed)
    leak.write_bytes(audit)
    params = (root/"params.yaml").read_bytes()                          # 2d. evidence and params that disagree (computed
    set_params(root, **{"evaluate.ci_level": 0.5})                       #     at one CI level, recorded under another)
    run(["dvc", "commit", "-f", "-q"], root)
    r = cli(root, "model", "register", check=False)
    assert r.returncode == 1 and "params.yaml:evaluate is not the value `healthml evaluate` ran with" in r.stderr, r.stderr
    (root/"params.yaml").write_bytes(params)
    run(["dvc", "commit", "-f", "-q"], root)
    assert "up to date" in run(["dvc", "status"], root).stdout
    ev = root/"metrics/evaluate.json"
    ev.write_text(ev.read_text().replace('"auroc_ci_low": 0.', '"auroc_ci_low": 0.9', 1))
    r = cli(root, "model", "register", check=False)                      # 2. edited evidence
    assert r.returncode == 1 and "pipeline outputs differ from dvc.lock" in r.stderr
    reg = registry(root)
    reg.client.set_model_version_tag(MODEL, "3", "healthml.gate", "PASS")
    r = cli(root, "model", "promote", "3", "--reason", "tag says PASS", check=False)   # 3. a tag set with MlflowClient
    assert r.returncode == 1 and "(its logged evidence) is FAIL" in r.stderr
    r = cli(root, "model", "promote", "2", check=False)                  # 4. no reason
    assert r.returncode == 1 and "needs a reason" in r.stderr
    assert cli(root, "model", "rollback", check=False).returncode == 1
    cli(root, "model", "promote", "2", "--reason", "passed its gate")
    reg.client.set_registered_model_alias(MODEL, "champion", "3")        # 5. the alias moved in MLflow's UI / a client
    r = cli(root, "audit", "verify", check=False)
    assert r.returncode == 1 and "alias `champion` points at version 3 but the audit log says version 2" in r.stderr
    from healthml.governance.registry import resolve_model
    assert resolve_model(registry(root), "champion").version == 2        # serving follows the log, not the moved alias
    fixed = cli(root, "model", "promote", "2", "--reason", "again")      # the next action restores it, and says so
    assert "set to version 2 as the audit log records" in fixed.stderr and verified(root)


def test_a_forged_or_rewritten_audit_trail_is_detected(registry_clone):
    from healthml.governance.audit import AuditLog, entry_hash
    root = registry_clone
    log = root/"audit/audit.jsonl"
    original = log.read_bytes()
    AuditLog(log, key=b"an attacker's key").append("promote", "mallory", "looks fine", model=MODEL, version=3)
    r = cli(root, "audit", "verify", check=False)                        # a correctly chained forged entry
    assert r.returncode == 1 and "not signed with the audit key" in r.stderr
    r = cli(root, "model", "promote", "3", "--reason", "x", check=False)
    assert r.returncode == 1 and "failed verification" in r.stderr
    log.write_bytes(original)
    # a report, its manifest, and the manifest hash in its audit entry all changed, the chain rehashed after it
    folder = next(e["details"]["report"] for e in AuditLog(log).entries() if e["action"] == "register")
    html = root/folder/"validation.html"
    html.write_text(html.read_text().replace("Gate verdict", "Gate verdict (edited)"))
    mf = root/folder/"manifest.json"
    m = json.loads(mf.read_text())
    m["outputs"]["validation.html"] = hashlib.sha256(html.read_bytes()).hexdigest()
    mf.write_text(json.dumps(m))
    entries, prev = AuditLog(log).entries(), None
    for e in entries:
        if e["action"] == "register" and e["details"]["report"] == folder:
            e["details"]["manifest_sha256"] = hashlib.sha256(mf.read_bytes()).hexdigest()
        if prev is not None: e["prev"] = prev
        e["hash"] = prev = entry_hash(e)
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    r = cli(root, "report", "verify", folder, check=False)
    assert r.returncode == 1 and "audit log cannot be trusted" in r.stderr
    assert "matches the audit log" not in r.stderr


def test_a_mistyped_champion_path_is_an_error_not_a_skipped_rule(project_clone):
    root = project_clone
    set_params(root, **{"evaluate.champion": "models/champion/typo.onnx"})
    r = cli(root, "evaluate", check=False)
    assert r.returncode == 1 and "evaluate.champion: models/champion/typo.onnx not found" in r.stderr


# -- kill -9 between any two writes -----------------------------------------------------------------------------

def test_a_registration_killed_at_each_step_is_finished_by_a_rerun(project_clone):
    "From a fresh registry: kill at each named step in turn; each rerun continues where the last one died."
    root = project_clone
    for f in ("mlflow.db", "mlartifacts", "audit", "reports"):
        p = root/f
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for step in ("registry.register.version-created", "registry.register.report-filed", "registry.register.audit-appended"):
        killed = cli(root, "model", "register", check=False, env={FAULT_ENV: step})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not verified(root), step                                  # the unfinished step is named, never "intact"
        assert not list((root/"reports").rglob(".*tmp*"))                 # nothing half-filed
        reg = registry(root)
        assert [v["version"] for v in reg.versions()] == [1]              # one version however often it was killed
    done = cli(root, "model", "register")
    assert "registered already as version 1" in done.stderr or "version 1" in done.stderr
    assert "registry matches the log" in cli(root, "audit", "verify").stderr
    reg = registry(root)
    assert reg.alias("candidate") == 1 and len([e for e in reg.audit.entries() if e["action"] == "register"]) == 1
    folder = reg.state().versions[1]["report"]
    assert cli(root, "report", "verify", folder).returncode == 0         # the filed report is audited


def test_promote_and_rollback_killed_after_their_audit_entry_are_finished_by_a_rerun(registry_clone):
    root = registry_clone
    cli(root, "model", "promote", "1", "--reason", "first release")
    killed = cli(root, "model", "promote", "2", "--reason", "better", check=False,
                 env={FAULT_ENV: "registry.promote.audit-appended"})
    assert killed.returncode == -signal.SIGKILL
    reg = registry(root)
    assert reg.alias("champion") == 1                                    # MLflow still on a complete, verified version
    from healthml.governance.registry import verify_artifact
    verify_artifact(reg, 1)
    r = cli(root, "audit", "verify", check=False)
    assert r.returncode == 1 and "alias `champion` points at version 1 but the audit log says version 2" in r.stderr
    cli(root, "model", "promote", "2", "--reason", "better")
    assert registry(root).alias("champion") == 2 and verified(root)
    killed = cli(root, "model", "rollback", "--reason", "drill", check=False, env={FAULT_ENV: "registry.rollback.audit-appended"})
    assert killed.returncode == -signal.SIGKILL and not verified(root)
    again = cli(root, "model", "rollback", "--reason", "drill")          # finishes the interrupted rollback, no second one
    assert "champion is now version 1" in again.stderr and "as the audit log records" in again.stderr
    assert registry(root).alias("champion") == 1 and verified(root)


def test_a_report_killed_while_rendering_leaves_no_temp_folder_in_the_dvc_output(project_clone):
    root = project_clone
    before = (root/"report/manifest.json").read_bytes()
    killed = cli(root, "report", check=False, env={FAULT_ENV: "report.render-written"})
    assert killed.returncode == -signal.SIGKILL
    assert (root/"report/manifest.json").read_bytes() == before           # the previous render, whole
    assert not [p for p in (root/"report").rglob("*") if "tmp" in p.name]
    assert [p.name.startswith(".report.tmp-") for p in root.iterdir() if "tmp" in p.name] == [True]   # beside it, never inside
    assert "report" not in run(["dvc", "status", "report"], root).stdout.replace("Data and pipelines are up to date.", "")
