"""Two pictures of abstention, written beside results.md (matplotlib: the ``plots`` extra).

- ``risk_coverage.png``: exact match of the answered questions against the share answered, as
  the threshold on ``na_prob`` moves (the least certain answered last); the evaluation's own
  operating point is marked.
- ``na_prob_histogram.png``: ``na_prob`` of answerable and unanswerable questions. A score that
  knows when the context has no answer puts the two apart.
- ``review_budget.png``: exact match of the model + an expert against the share of questions the
  expert answers, the least confident first or at random (``eval.routing``).
"""

import os
from typing import List, Mapping, Sequence

from torchtune_blah.data.squad import NO_ANSWER
from torchtune_blah.eval.metrics import score_example

PLOT_FILES = ("risk_coverage.png", "na_prob_histogram.png", "review_budget.png")


def risk_coverage(rows: Sequence[Mapping]) -> List[tuple]:
    """(share answered, exact match of the answered) when the k questions with the lowest
    ``na_prob`` are answered, k = 1..n. What a question answers with is its span
    (``span_answer``, threshold rules) or, failing that, its own answer when it did not abstain."""
    def answered_exact(r):
        answer = r.get("span_answer", r["model_answer"])
        return score_example(r["gold_answers"], answer)["official_exact"] if answer not in (None, NO_ANSWER) else 0

    ordered = sorted(rows, key=lambda r: r["na_prob"])
    points, correct = [], 0
    for k, row in enumerate(ordered, start=1):
        correct += answered_exact(row)
        points.append((k / len(ordered), correct / k))
    return points


def write_plots(rows: Sequence[Mapping], output_dir: str, title: str, expert_accuracy: float = 1.0) -> List[str]:
    """Write the PNGs (atomically); returns their paths. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    points = risk_coverage(rows)
    ax.plot([100 * c for c, _ in points], [100 * e for _, e in points], color="tab:blue", label="answer the most certain")
    if points:  # a score that ranks nothing stays at the exact match of answering everything
        ax.axhline(100 * points[-1][1], color="gray", linestyle="--", linewidth=1, label="a random order")
    answered = [r for r in rows if r["model_answer"] not in (None, NO_ANSWER)]
    if answered and rows:
        ax.scatter([100 * len(answered) / len(rows)],
                   [100 * sum(r["official_exact"] for r in answered) / len(answered)],
                   color="tab:red", zorder=3, label="this evaluation's rule")
    ax.set_xlabel("% of questions answered (coverage)")
    ax.set_ylabel("% exact match of the answered")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, os.path.join(output_dir, PLOT_FILES[0])))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    bins = [i / 20 for i in range(21)]
    ax.hist([r["na_prob"] for r in rows if r["has_answer"]], bins=bins, alpha=0.6, color="tab:green",
            label="has an answer")
    ax.hist([r["na_prob"] for r in rows if not r["has_answer"]], bins=bins, alpha=0.6, color="tab:orange",
            label="no answer in the context")
    ax.set_xlabel("na_prob (the abstention score)")
    ax.set_ylabel("questions")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    paths.append(_save(fig, os.path.join(output_dir, PLOT_FILES[1])))

    from torchtune_blah.eval.routing import REVIEW_SHARES, curves

    fig, ax = plt.subplots(figsize=(5.5, 4))
    c = curves(rows, expert_accuracy)
    ax.plot(c["share"], c["least_confident"], color="tab:blue", label="least confident reviewed first")
    ax.plot(c["share"], c["random"], color="gray", linestyle="--", label="reviewed at random")
    for share in REVIEW_SHARES:
        ax.axvline(share, color="lightgray", linewidth=0.8, zorder=0)
    ax.set_xlabel("% of questions an expert answers")
    ax.set_ylabel("% exact match, model + expert")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_title(f"{title}; expert right {100 * expert_accuracy:.0f}%", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, os.path.join(output_dir, PLOT_FILES[2])))
    plt.close("all")
    return paths


def _save(fig, path: str) -> str:
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path
