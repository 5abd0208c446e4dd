"""Where an expert's time goes: each answer's confidence, the review order, and what reviewing a
share of the questions buys.

**Confidence** (``confidence`` in every ``Prediction`` row) is the model's probability of the answer
it actually gives, under the rule in force:

- an abstention (``"?"``): its abstention score (greedy: ``na_prob``, P(abstention token) where the
  value starts; a threshold rule: the rule's score, e.g. ``p_abstain``);
- a span: the probability of the value it wrote, token by token from where the value starts, under
  the model's own distribution (the first token's probability already excludes abstaining: it is
  "this span, and not abstaining");
- invalid JSON: the probability of the whole reply (these go to a person first anyway).

An answer is *wrong* when its official exact match is 0; ``auroc_wrong`` is the AUROC of
``1 - confidence`` for "wrong" (0.5: the confidence says nothing; 1: every wrong answer is less
confident than every right one).

**The review order** (``review_queue.jsonl``, the review tool's queue, the budget below): invalid
JSON first, then the least confident.

**Model + experts** (``review_budget``): the least confident X% of the questions go to an expert,
the model answers the rest; against a random X% (its expected value: X% of the questions scored at
the expert's accuracy, the rest at the model's). The expert is right with probability
``expert_accuracy`` (1.0 by default; the review tool's measured agreement is the honest value).
The interval of the difference is a paired bootstrap over questions that re-ranks each resample,
so it includes the uncertainty of which questions fall under the cut.
"""

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from torchtune_blah.data.squad import NO_ANSWER
from torchtune_blah.eval.stats import BOOTSTRAP_SAMPLES, auroc, bootstrap_auroc_ci

REVIEW_SHARES = (10, 20, 30, 50)  # % of the questions sent to an expert
COMPARE_SHARE = 30  # the share `compare` shows
TARGET_EM = 80.0  # the inverse question's default: what share of review reaches this EM


def answer_confidence(answer: Optional[str], abstain_score: float, value_logprob: float) -> float:
    """The confidence of one answer (module docstring): ``abstain_score`` for ``"?"``, else
    ``exp(value_logprob)``, the log-probability of what the model wrote from the value's start (or
    of the whole reply, for invalid JSON)."""
    if answer == NO_ANSWER:
        return float(abstain_score)
    return math.exp(min(float(value_logprob), 0.0))


def row_confidence(row: Mapping[str, Any]) -> float:
    """A row's ``confidence``; rows of earlier versions have none, and get the closest thing they
    carry: ``na_prob`` for an abstention, ``1 - na_prob`` (P(not abstaining), an upper bound of the
    span's probability) for a span."""
    if row.get("confidence") is not None:
        return float(row["confidence"])
    na_prob = float(row["na_prob"])
    return na_prob if row["model_answer"] == NO_ANSWER else 1.0 - na_prob


def review_key(row: Mapping[str, Any]) -> tuple:
    """Sort key of the review order: invalid JSON first, then the least confident (ties by id)."""
    return (row["model_answer"] is not None, row_confidence(row), str(row["id"]))


def review_order(rows: Sequence[Mapping[str, Any]]) -> List[int]:
    """Indices of ``rows`` in review order."""
    return sorted(range(len(rows)), key=lambda i: review_key(rows[i]))


def wrong(row: Mapping[str, Any]) -> bool:
    return not row["official_exact"]


def auroc_wrong(rows: Sequence[Mapping[str, Any]], confidence=row_confidence) -> Optional[float]:
    """AUROC of ``1 - confidence`` for "this answer is wrong" (None when every answer is right, or
    every one wrong)."""
    return auroc([1.0 - confidence(r) for r in rows], [wrong(r) for r in rows])


def confidence_report(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """``auroc_wrong`` with its 95% bootstrap interval, and the same for the other candidate orders
    a review queue could use: ``na_prob`` (abstention score) alone, and the closeness of ``na_prob``
    to 0.5 (the order of earlier versions)."""
    candidates = {
        "confidence": row_confidence,
        "na_prob": lambda r: float(r["na_prob"]),
        "na_prob_far_from_half": lambda r: abs(float(r["na_prob"]) - 0.5),
    }
    is_wrong = [wrong(r) for r in rows]
    doubt = [1.0 - row_confidence(r) for r in rows]
    out: Dict[str, Any] = {"auroc_wrong": auroc(doubt, is_wrong), "wrong": sum(is_wrong)}
    out["ci95"] = list(bootstrap_auroc_ci(doubt, is_wrong)) if out["auroc_wrong"] is not None else None
    out["candidates"] = {name: auroc_wrong(rows, f) for name, f in candidates.items()}
    return out


def check_expert_accuracy(value: Any, key: str = "expert_accuracy") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{key}={value!r}: give the probability that the expert's answer is right, a number in "
                         "[0, 1] (1.0: the expert is always right; the review tool's agreement is an honest value)")
    return float(value)


def check_target_em(value: Any, key: str = "review_target_em") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 100.0:
        raise ValueError(f"{key}={value!r}: give an exact match in points, a number in (0, 100]")
    return float(value)


def _combined(exact: np.ndarray, key_order: np.ndarray, share: float, expert_accuracy: float) -> np.ndarray:
    """Per-question scores (0..1) when the first ``share`` of ``key_order`` goes to the expert."""
    n = len(exact)
    k = int(round(share * n))
    values = exact.astype(float).copy()
    values[key_order[:k]] = expert_accuracy
    return values


def review_budget(rows: Sequence[Mapping[str, Any]], expert_accuracy: float = 1.0,
                  shares: Sequence[int] = REVIEW_SHARES, target_em: float = TARGET_EM,
                  samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Dict[str, Any]:
    """What the model + an expert score when X% of the questions are reviewed (module docstring).

    Per share: ``least_confident`` and ``random`` (official EM, points), their ``difference`` and its
    95% paired bootstrap interval ``ci95``. ``share_for_target``: the smallest share (%) of review
    that reaches ``target_em`` with each routing (None: not even 100% does)."""
    expert_accuracy = check_expert_accuracy(expert_accuracy)
    n = len(rows)
    exact = np.array([float(r["official_exact"]) for r in rows])
    order = np.array(review_order(rows), dtype=int)
    # rank of each question in the review order: a resample is ordered by it (ties keep the order)
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    model_em = 100.0 * exact.mean() if n else float("nan")
    ks = [int(round(share / 100.0 * n)) for share in shares]
    diffs = [[] for _ in shares]
    rng = np.random.default_rng(seed)
    for start in range(0, samples if n else 0, 250):  # in chunks: [chunk, n] index arrays stay small
        resamples = rng.integers(0, n, size=(min(250, samples - start), n))
        # each resample in review order (its questions sorted by their rank in the whole set)
        ordered = exact[np.take_along_axis(resamples, np.argsort(rank[resamples], axis=1, kind="stable"), axis=1)]
        mean = ordered.mean(axis=1)
        for i, (share, k) in enumerate(zip(shares, ks)):
            s = share / 100.0
            least = (ordered[:, k:].sum(axis=1) + k * expert_accuracy) / n
            diffs[i].append(100.0 * (least - (s * expert_accuracy + (1.0 - s) * mean)))
    out = []
    for i, (share, k) in enumerate(zip(shares, ks)):
        s = share / 100.0
        least = 100.0 * _combined(exact, order, s, expert_accuracy).mean() if n else float("nan")
        random = 100.0 * (s * expert_accuracy + (1.0 - s) * exact.mean()) if n else float("nan")
        d = np.concatenate(diffs[i]) if diffs[i] else np.array([])
        low, high = (float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))) if len(d) else (math.nan, math.nan)
        out.append({"share": share, "reviewed": k, "least_confident": least, "random": random,
                    "difference": least - random, "ci95": [low, high]})
    return {"expert_accuracy": expert_accuracy, "questions": n, "model_alone": model_em, "shares": out,
            "share_for_target": share_for_target(exact, order, expert_accuracy, target_em)}


def share_for_target(exact: np.ndarray, order: np.ndarray, expert_accuracy: float, target_em: float) -> Dict[str, Any]:
    """The smallest share of review (%) whose combined EM reaches ``target_em`` points."""
    n = len(exact)
    target = target_em / 100.0
    least = None
    if n:
        gains = np.zeros(n + 1)  # combined total when the first k go to the expert
        gains[1:] = np.cumsum(expert_accuracy - exact[order])
        totals = exact.sum() + gains
        hit = np.nonzero(totals >= target * n - 1e-9)[0]
        least = 100.0 * int(hit[0]) / n if len(hit) else None
    mean = exact.mean() if n else 0.0
    if n and mean >= target:
        random = 0.0
    elif n and expert_accuracy > mean and expert_accuracy >= target:
        random = 100.0 * (target - mean) / (expert_accuracy - mean)
    else:
        random = None
    return {"target_em": target_em, "least_confident": least, "random": random}


def curves(rows: Sequence[Mapping[str, Any]], expert_accuracy: float = 1.0) -> Dict[str, List[float]]:
    """Combined EM (points) against the share reviewed (%), 0..100, for both routings (the plot)."""
    n = len(rows)
    exact = np.array([float(r["official_exact"]) for r in rows])
    order = np.array(review_order(rows), dtype=int)
    totals = exact.sum() + np.concatenate([[0.0], np.cumsum(expert_accuracy - exact[order])])
    share = np.arange(n + 1) / max(n, 1)
    return {"share": list(100.0 * share), "least_confident": list(100.0 * totals / max(n, 1)),
            "random": list(100.0 * (share * expert_accuracy + (1.0 - share) * (exact.mean() if n else 0.0)))}


def budget_cells(budget: Mapping[str, Any], share: int = COMPARE_SHARE) -> str:
    """``least / random (difference [CI])`` at one share, for tables."""
    cell = next((s for s in budget["shares"] if s["share"] == share), None)
    if cell is None:
        return "n/a"
    low, high = cell["ci95"]
    return (f"{cell['least_confident']:.1f} / {cell['random']:.1f} "
            f"({cell['difference']:+.1f} [{low:+.1f}, {high:+.1f}])")


def budget_lines(budget: Mapping[str, Any]) -> List[str]:
    """Markdown: one row per share, and the inverse question."""
    accuracy = budget["expert_accuracy"]
    lines = [f"Model + expert (expert right {100 * accuracy:.0f}% of the time), official EM of the "
             f"{budget['questions']} questions; model alone {budget['model_alone']:.1f}:", "",
             "| reviewed | least confident | random | difference [95% CI] |", "|---:|---:|---:|---:|"]
    for s in budget["shares"]:
        low, high = s["ci95"]
        lines.append(f"| {s['share']}% ({s['reviewed']}) | {s['least_confident']:.1f} | {s['random']:.1f} | "
                     f"{s['difference']:+.1f} [{low:+.1f}, {high:+.1f}] |")
    t = budget["share_for_target"]

    def pct(v):
        return "out of reach" if v is None else f"{v:.0f}%"

    lines += ["", f"To reach {t['target_em']:.0f}% EM: review {pct(t['least_confident'])} (least confident first) "
                  f"or {pct(t['random'])} (at random)."]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m torchtune_blah.eval.routing FOLDER [--expert-accuracy A] [--target-em T]``: what an
    expert buys on a finished ``blah_eval`` output (``FOLDER@greedy``: the greedy answers of a
    thresholded evaluation)."""
    import argparse

    from torchtune_blah.eval.folder import load_rows

    parser = argparse.ArgumentParser(prog="python -m torchtune_blah.eval.routing", description=main.__doc__)
    parser.add_argument("folder", help="a blah_eval output_dir (or FOLDER@greedy)")
    parser.add_argument("--expert-accuracy", type=float, default=1.0)
    parser.add_argument("--target-em", type=float, default=TARGET_EM)
    args = parser.parse_args(argv)
    try:
        accuracy, target = check_expert_accuracy(args.expert_accuracy), check_target_em(args.target_em)
    except ValueError as e:
        raise SystemExit(str(e))
    [(_, rows)] = load_rows([args.folder])
    report = confidence_report(rows)
    auroc_text = "n/a" if report["auroc_wrong"] is None else \
        f"{report['auroc_wrong']:.3f} [{report['ci95'][0]:.2f}, {report['ci95'][1]:.2f}]"
    print(f"AUROC of confidence for a wrong answer: {auroc_text}")
    print("\n".join(budget_lines(review_budget(rows, accuracy, target_em=target))))


if __name__ == "__main__":
    main()
