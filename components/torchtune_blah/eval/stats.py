"""Numbers a reader can trust: AUROC of the abstention score, bootstrap intervals, paired differences.

Intervals are 95% percentile bootstraps over questions (resampled with replacement, a seeded
generator, so a rerun prints the same interval). Paired differences resample the same questions
for both models, which is what makes a small difference between two rows on one question set
readable at all.
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from torchtune_blah.data.squad import NO_ANSWER

BOOTSTRAP_SAMPLES = 2000


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> Optional[float]:
    """Area under the ROC curve of ``scores`` for the ``positive`` class (ties count one half):
    the probability that a random positive scores above a random negative. None when one class
    is missing. For ``na_prob``, positive = the question has no answer."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U from average ranks (ties get the mean of their ranks).
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def bootstrap_ci(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                 level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (in the units of ``values``)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def bootstrap_auroc_ci(scores: Sequence[float], positive: Sequence[bool], samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of the AUROC (resamples missing a class are skipped)."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        idx = rng.integers(0, len(scores), size=len(scores))
        value = auroc(scores[idx], positive[idx])
        if value is not None:
            values.append(value)
    if not values:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def paired_difference(a: Sequence[float], b: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> Dict[str, float]:
    """Mean of ``b - a`` over the same questions, with its 95% paired bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired_difference needs scores of the same questions, in the same order")
    diff = b - a
    low, high = bootstrap_ci(diff, samples=samples, seed=seed)
    return {"difference": float(diff.mean()), "ci_low": low, "ci_high": high}


def summary_statistics(rows: Sequence[dict]) -> Dict[str, object]:
    """What every evaluation reports beside EM/F1: the abstention rate, the AUROC of ``na_prob``
    for "no answer", and 95% bootstrap intervals of official EM, F1, the article's EM and the AUROC."""
    no_answer = [not r["has_answer"] for r in rows]
    na_probs = [float(r["na_prob"]) for r in rows]
    result: Dict[str, object] = {
        "questions": len(rows),
        "pct_abstained": 100.0 * sum(r["model_answer"] == NO_ANSWER for r in rows) / len(rows) if rows else 0.0,
        "auroc_na_prob": auroc(na_probs, no_answer),
    }
    intervals = {}
    for name, key in (("official_exact", "official_exact"), ("official_f1", "official_f1"),
                      ("pct_exact_match", "llama_squad_exact")):
        low, high = bootstrap_ci([100.0 * float(r[key]) for r in rows])
        intervals[name] = [low, high]
    if result["auroc_na_prob"] is not None:
        intervals["auroc_na_prob"] = list(bootstrap_auroc_ci(na_probs, no_answer))
    result["ci95"] = intervals
    return result
