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
