"""Statistical checks of the evaluation that need many repetitions: CI coverage in simulation."""
import numpy as np
from scipy import stats

from healthml.evaluation.discrimination import SortedScores, bootstrap_weights, delong_ci, percentile_ci, weighted_auroc

REPS, N, PREVALENCE, SHIFT = 300, 300, 0.3, 1.0
TRUE_AUROC = stats.norm.cdf(SHIFT / np.sqrt(2))  # binormal, unit variances: AUROC = Phi(shift / sqrt 2)


def _sample(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(N) < PREVALENCE).astype(int)
    return y, rng.normal(y * SHIFT, 1.0)


def test_delong_and_bootstrap_95pct_intervals_cover_the_true_auroc_90_to_99pct_of_the_time():
    delong_hits = boot_hits = 0
    for rep in range(REPS):
        y, s = _sample(rep)
        _, lo, hi = delong_ci(y, s)
        delong_hits += lo <= TRUE_AUROC <= hi
        st = SortedScores(y, s)
        reps = np.concatenate([weighted_auroc(st, W) for W in bootstrap_weights(np.arange(N), 300, seed=rep)])
        blo, bhi = percentile_ci(reps)
        boot_hits += blo <= TRUE_AUROC <= bhi
    delong_cov, boot_cov = delong_hits / REPS, boot_hits / REPS
    print(f"coverage of the true AUROC {TRUE_AUROC:.4f}: DeLong {delong_cov:.3f}, bootstrap {boot_cov:.3f}")
    assert 0.90 <= delong_cov <= 0.99
    assert 0.90 <= boot_cov <= 0.99


def test_bootstrap_resamples_patients_not_rows():
    # 100 patients with 5 rows each: a row bootstrap would treat 500 rows as independent and give
    # an interval about sqrt(5) times too narrow; the patient bootstrap must not.
    rng = np.random.default_rng(0)
    y_pat = (rng.random(100) < 0.4).astype(int)
    s_pat = rng.normal(y_pat, 1)
    y, s, pid = np.repeat(y_pat, 5), np.repeat(s_pat, 5), np.repeat(np.arange(100), 5)
    st = SortedScores(y, s)
    by_patient = np.concatenate([weighted_auroc(st, W) for W in bootstrap_weights(pid, 400, seed=1)])
    by_row = np.concatenate([weighted_auroc(st, W) for W in bootstrap_weights(np.arange(500), 400, seed=1)])
    assert by_patient.std() > 1.8 * by_row.std()


def _close(a, b, tol=1e-12):
    "Every number in nested dicts/frames within `tol` (NaN equal to NaN), every other value equal."
    import pandas as pd
    if isinstance(a, pd.DataFrame): return a.columns.equals(b.columns) and all(_close(x, y, tol) for x, y in zip(a.to_dict("records"), b.to_dict("records")))
    if isinstance(a, dict): return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        return (np.isnan(a) and np.isnan(b)) or abs(a - b) <= tol
    return a == b


def test_support2_bootstrap_intervals_equal_those_of_the_former_implementation(pipeline_project, monkeypatch):
    """Issue 18: the bootstrap got faster (Newton steps and AUROC/AP in place, chunks and subgroups in threads on large
    test splits, the paired comparison from the models' own replicates) without changing the procedure: on SUPPORT2's
    test split, with the same seed, every point estimate and interval of the candidate, the paired comparison and the
    subgroup table equals the former implementation's (commit c6f8e02, tests/former_evaluation.py) to within 1e-12, so
    the report's numbers do not move."""
    import json

    import pandas as pd

    import former_evaluation as former
    import healthml.evaluation.calibration as C
    import healthml.evaluation.discrimination as D
    import healthml.evaluation.evaluate as E
    import healthml.evaluation.subgroups as S
    from healthml.core.params import load_params
    from healthml.data.cohort import subgroup_frame
    root = pipeline_project[0]
    params = load_params(root/"params.yaml")
    spec, cfg = params.dataset, params.evaluate
    test, scores = pd.read_parquet(root/"data/processed/test.parquet"), pd.read_parquet(root/"data/processed/test_scores.parquet")
    thr = {m: v["threshold"] for m, v in json.loads((root/"metrics/evaluate.json").read_text()).items() if m != "settings"}
    cand, other = params.model_names[:2]
    y, a, b, patients = scores["outcome"].to_numpy(), scores[cand].to_numpy(), scores[other].to_numpy(), test[spec.patient_id].to_numpy()
    groups = subgroup_frame(test, spec, cfg.intersections, cfg.slices)

    def evaluation(reuse: bool):
        with E.quiet_numerics():
            evaluated = (E.model_replicates(y, a, patients, thr[cand], cfg), E.model_replicates(y, b, patients, thr[other], cfg))
            return (evaluated[0][0], E.compare(y, a, b, patients, thr[cand], thr[other], cfg, evaluated if reuse else None),
                    S.subgroup_table(y, a, groups, patients, thr[cand], cfg.min_subgroup_n, cfg.min_subgroup_events, cfg.n_bootstrap,
                                     cfg.ci_level, cfg.seed, cfg.min_subgroup_non_events))
    current = evaluation(reuse=True)        # as the stage computes it: the comparison from the models' own replicates
    ranking = lambda st, W, precision=True: former.ranking_metrics(st, W)   # AUROC-only calls get both, as before
    for module, name, fn in ((C, "weighted_logistic", former.weighted_logistic), (D, "ranking_metrics", ranking),
                             (E, "ranking_metrics", ranking), (E, "bootstrap", former.bootstrap),
                             (S, "bootstrap", former.bootstrap)):
        monkeypatch.setattr(module, name, fn)
    before = evaluation(reuse=False)    # the former way: a bootstrap of its own
    assert current[0]["auroc_ci_low"] < current[0]["auroc"] < current[0]["auroc_ci_high"]
    assert (current[2].status == "ok").sum() >= 5
    for now, then in zip(current, before): assert _close(now, then), (now, then)
