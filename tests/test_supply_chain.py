"""Supply chain: the CycloneDX SBOMs filed with each report list the research environment's every installed distribution
and exactly the slim scoring set; the report manifest hashes them; the dependency audit runs in CI (never in `make
test`) with a waiver file that parses; the image's hashed lock is the slim set."""
import json
import re
import subprocess
import sys

import yaml
from conftest import ROOT

from healthml.core.io import sha256_file
from healthml.governance.supply_chain import (canonical_name, read_waivers, requirement_closure, requirement_names,
                                              sbom_problems, write_sboms)

SBOMS = ("sbom.research.cdx.json", "sbom.scoring.cdx.json")


def components(bom: dict) -> dict[str, tuple[str, str]]:
    return {canonical_name(c["name"]): (c["version"], c["purl"]) for c in bom["components"]}


def test_the_research_sbom_lists_every_installed_distribution_with_its_version_and_purl(tmp_path):
    write_sboms(tmp_path, ROOT)
    bom = json.loads((tmp_path/SBOMS[0]).read_text())
    assert sbom_problems(bom) == []
    listed = json.loads(subprocess.run([sys.executable, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                                       capture_output=True, text=True, check=True).stdout)       # pip's own view of the venv
    expected = {canonical_name(d["name"]): d["version"] for d in listed}
    got = components(bom)
    assert {k: v for k, (v, _) in got.items()} == expected
    assert all(purl == f"pkg:pypi/{k}@{v}" for k, (v, purl) in got.items() if "+" not in v)


def test_the_scoring_sbom_lists_exactly_the_slim_set_the_image_installs_with_hashes(tmp_path):
    write_sboms(tmp_path, ROOT)
    bom = json.loads((tmp_path/SBOMS[1]).read_text())
    assert sbom_problems(bom) == []
    lock = (ROOT/"requirements/serve.lock").read_text()
    locked = {canonical_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", lock, re.M)}
    assert len(locked) == lock.count("==") and lock.count("--hash=sha256:") >= len(locked)
    got = {k: v for k, (v, _) in components(bom).items()}
    assert got.pop("healthml")                                       # installed with --no-deps beside the lock
    assert got == locked                                             # exactly the slim set, at the locked versions
    assert set(got) == set(requirement_closure(requirement_names(ROOT/"requirements/serve.txt")))
    assert not {"scikit-learn", "lightgbm", "mlflow", "dvc", "scipy", "matplotlib"} & set(got)


def test_the_filed_report_carries_both_sboms_hashed_in_its_manifest(pipeline_project):
    root, _ = pipeline_project
    report = root/"report"
    manifest = json.loads((report/"manifest.json").read_text())
    for name in SBOMS:
        assert manifest["outputs"][name] == sha256_file(report/name)
        assert json.loads((report/name).read_text())["bomFormat"] == "CycloneDX"
    assert manifest["inputs"]["serve_requirements"]["path"] == "requirements/serve.txt"


def test_the_audit_runs_in_ci_not_in_make_test_and_the_waiver_file_is_valid():
    flow = yaml.safe_load((ROOT/".github/workflows/ci.yml").read_text())
    assert [s["run"] for s in flow["jobs"]["audit"]["steps"] if "run" in s] == ["bash .ci/audit"]
    script = (ROOT/".ci/audit").read_text()
    assert "--require-hashes" in script and "-r requirements/audit.txt" in script and "healthml ci audit" in script
    assert "audit" not in re.search(r"^test:.*$", (ROOT/"Makefile").read_text(), re.M).group(0)   # offline suite
    audit_pins = (ROOT/"requirements/audit.txt").read_text()
    assert re.search(r"^pip-audit==\S+ \\$", audit_pins, re.M) and "--hash=sha256:" in audit_pins
    read_waivers(ROOT/"requirements/audit-waivers.toml")             # parses, and no waiver has expired
