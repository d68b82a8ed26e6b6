"""The privacy stage on SUPPORT2: its evidence, the report's section and the gate's privacy rule, from one pipeline run."""
import json

import pandas as pd

from healthml.core.layout import Layout
from healthml.core.params import load_params


def test_privacy_evidence_reaches_the_report_and_the_gate_judges_it(pipeline_project):
    root, _ = pipeline_project
    L, params = Layout(root), load_params(root/"params.yaml")
    privacy = json.loads(L.privacy.read_text())
    assert privacy["candidate"] == params.candidate
    for attack in ("loss", "reference"):                      # both attacks, with CIs, overall and per subgroup
        m = privacy["membership"]["overall"][attack]
        assert m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"] and m["tpr_at_fpr_1pct"] is not None
    assert {"sex", "age_band", "race"} <= {g["attribute"] for g in privacy["membership"]["subgroups"]}
    assert privacy["attribute"]["attribute"] == params.privacy.sensitive_attribute
    screen = pd.read_parquet(L.label_screen)                  # flagged rows by surrogate key only, no feature values
    assert list(screen.columns) == [params.dataset.patient_id, "given_label", "out_of_fold_risk", "probability_of_given_label"]
    assert len(screen) == privacy["screen"]["flagged"] > 0

    page = (L.report_render/"validation.html").read_text()
    assert "10. Privacy risk" in page and "offline LiRA" in page and "Mitigation levers" in page
    assert f"{privacy['screen']['flagged']:,} of {privacy['screen']['rows']:,} training rows" in page

    verdict = json.loads(L.gate.read_text())
    rule = next(r for r in verdict["rules"] if r["kind"] == "privacy")
    assert rule["status"] in ("pass", "FAIL")                 # judged, never "not applicable"
    assert rule["evidence"]["value"] == privacy["summary"][rule["evidence"]["metric"]]
    assert f"<td>{rule['name']}</td>" in page                  # and the report's gate table shows the rule
    if rule["status"] == "pass":                              # levers refitted only when the rule fails; the report says so
        assert privacy["mitigation"] == [] and "not computed: every privacy rule of the gate holds" in privacy["mitigation_status"]
        assert "Levers not computed: every privacy rule of the gate holds" in page
