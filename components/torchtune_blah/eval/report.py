"""What people read: the metrics table, the article-style results row, the review queue."""

from typing import Any, Dict, List, Mapping, Optional

from torchtune_blah.data.squad import NO_ANSWER
from torchtune_blah.eval.metrics import official_metrics, score_example, llama_squad_metrics

LLAMA_SQUAD_COLUMNS = [
    ("pct_valid_json", "% Valid JSON"),
    ("pct_exact_match", "% Exact Match"),
    ("pct_exact_match_among_valid_json", "% Exact Match (valid JSON)"),
    ("pct_correct_no_answer", "% Correct No Answer"),
    ("pct_correct_has_answer", "% Correct Has Answer"),
]


def _interval(summary: Mapping[str, Any], key: str) -> str:
    low, high = summary["ci95"].get(key, (float("nan"), float("nan")))
    return f"[{low:.1f}, {high:.1f}]"


def _auroc(summary: Mapping[str, Any]) -> str:
    value = summary.get("auroc_na_prob")
    if value is None:
        return "n/a"
    low, high = summary["ci95"]["auroc_na_prob"]
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


TRUST_COLUMNS = ("Official EM [95% CI]", "Official F1", "% Abstained", "AUROC of na_prob [95% CI]")


def trust_cells(summary: Mapping[str, Any], official: Mapping[str, Any]) -> List[str]:
    return [f"{official['exact']:.2f} {_interval(summary, 'official_exact')}", f"{official['f1']:.2f}",
            f"{summary['pct_abstained']:.1f}", _auroc(summary)]


def results_row(name: str, llama_squad: Mapping[str, float], summary: Optional[Mapping[str, Any]] = None,
                official: Optional[Mapping[str, Any]] = None) -> str:
    """Header and one row in the layout of llama-squad's results table (markdown), then, given the
    summary statistics, the official EM with its interval, the abstention rate and the AUROC."""
    header = "| Model | " + " | ".join(title for _, title in LLAMA_SQUAD_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(LLAMA_SQUAD_COLUMNS)
    row = f"| {name} | " + " | ".join(f"{llama_squad[key]:.2f}" for key, _ in LLAMA_SQUAD_COLUMNS) + " |"
    lines = [header, rule, row]
    if summary is not None and official is not None:
        lines += ["", "| Model | " + " | ".join(TRUST_COLUMNS) + " |", "|---|" + "---:|" * len(TRUST_COLUMNS),
                  f"| {name} | " + " | ".join(trust_cells(summary, official)) + " |"]
    return "\n".join(lines) + "\n"


def _llama_squad(metrics: Mapping[str, Any]) -> Mapping[str, float]:
    # metrics.json of earlier versions named this section "seed" (after llama-squad, "the seed").
    return metrics["llama_squad"] if "llama_squad" in metrics else metrics["seed"]


def format_table(metrics: Mapping[str, Any]) -> str:
    lines = [f"SQuAD 2.0 evaluation: stage {metrics['stage']}, {metrics['official']['total']} questions, "
             f"{metrics['num_pause_tokens']} pause tokens, {metrics['prompt_style']}"]
    rule = metrics.get("abstention")
    if rule:
        lines.append("  abstention: " + ("greedy (the article's rule)" if rule["threshold"] is None else
                                         f"abstain when {rule['rule']} > {rule['threshold']:.4f} ({rule['source']})"))
    lines.append("  llama-squad's metrics:")
    lines += [f"    {title:<28} {_llama_squad(metrics)[key]:7.2f}" for key, title in LLAMA_SQUAD_COLUMNS]
    lines.append("  official SQuAD 2.0 metrics:")
    lines.append("    (best_*: the official script's thresholds, chosen on these very questions: an oracle)")
    for key, value in metrics["official"].items():
        lines.append(f"    {key:<28} {value:7.2f}" if isinstance(value, float) else f"    {key:<28} {value:7d}")
    summary = metrics.get("summary")
    if summary:
        lines.append("  abstention and intervals:")
        lines.append(f"    {'% abstained':<28} {summary['pct_abstained']:7.2f}")
        lines.append(f"    {'AUROC of na_prob':<28} {_auroc(summary)}")
        if summary.get("auroc_wrong") is not None:
            low, high = summary["ci95"]["auroc_wrong"]
            lines.append(f"    {'AUROC of confidence, wrong':<28} {summary['auroc_wrong']:.3f} [{low:.2f}, {high:.2f}]")
        lines.append(f"    {'official EM 95% CI':<28} {_interval(summary, 'official_exact')}")
        lines.append(f"    {'official F1 95% CI':<28} {_interval(summary, 'official_f1')}")
    for score, value in (metrics.get("auroc_by_score") or {}).items():
        lines.append(f"    {'AUROC of ' + score:<28} {value:7.3f}" if value is not None else f"    AUROC of {score}: n/a")
    budget = metrics.get("review_budget")
    if budget:
        from torchtune_blah.eval.routing import COMPARE_SHARE, budget_cells

        lines.append(f"  model + expert, {COMPARE_SHARE}% reviewed (least confident / random, difference [95% CI]): "
                     f"{budget_cells(budget)}")
    greedy = metrics.get("greedy_same_pass")
    if greedy:
        lines.append(f"  greedy answers of the same pass: official EM {greedy['official']['exact']:.2f}, "
                     f"{greedy['summary']['pct_abstained']:.1f}% abstained")
    return "\n".join(lines)


def review_queue(rows: List[Mapping[str, Any]], limit: Optional[int] = None) -> List[Dict]:
    """The questions to show an expert: their ``Prediction`` rows in review order (invalid JSON, then
    the least confident: ``eval.routing``), each also a training record.

    ``answers`` holds the model's proposal (``[]`` when it abstained or its reply did not parse);
    the expert corrects it in place, and the file goes back into training as
    ``dataset: {source: json, data_files: review_queue.jsonl}``.
    """
    from torchtune_blah.eval.routing import review_order, row_confidence

    queue = []
    for i in review_order(rows)[:limit]:
        row = rows[i]
        answer = row["model_answer"]
        reason = "invalid JSON" if answer is None else f"confidence {row_confidence(row):.3f}"
        queue.append({**row, "answers": [] if answer in (None, NO_ANSWER) else [answer], "review_reason": reason})
    return queue


def official_data(records) -> Dict[str, Any]:
    """Records in the official SQuAD 2.0 layout (one paragraph per question)."""
    return {"version": "v2.0", "data": [{"title": "blah_eval", "paragraphs": [
        {"context": r.context, "qas": [{"id": r.id, "question": r.question, "is_impossible": not r.answers,
                                        "answers": [{"text": a} for a in r.answers]}]}
        for r in records]}]}


def always_abstain_rows(rows: List[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of a model that answers "?" to every question of the same evaluation: the
    baseline any abstention-heavy model must be read against (its na_prob is constant)."""
    return [{**r, "model_answer": NO_ANSWER, "raw_output": "", "prediction": "", "na_prob": 1.0, "confidence": 1.0,
             **score_example(r["gold_answers"], NO_ANSWER)} for r in rows]


BASELINE_NAME = 'always "?" (baseline)'


def comparison_table(named_rows: List[tuple]) -> str:
    """Markdown: one row per ``(name, predictions.jsonl rows)`` of the same questions, in the
    article's layout plus the official EM with its 95% interval, F1, the abstention rate, the
    AUROC of na_prob and the EM of model + expert with 30% reviewed; the always-"?" baseline; then the paired differences in official EM
    (same questions resampled together) against the baseline and against the first row."""
    from torchtune_blah.eval.routing import COMPARE_SHARE, budget_cells, review_budget
    from torchtune_blah.eval.stats import paired_difference, summary_statistics

    named = list(named_rows)
    if not named:
        return ""
    named.append((BASELINE_NAME, always_abstain_rows(named[0][1])))
    header = ("| Model | " + " | ".join(title for _, title in LLAMA_SQUAD_COLUMNS if "valid JSON)" not in title)
              + " | " + " | ".join(TRUST_COLUMNS)
              + f" | EM, {COMPARE_SHARE}% to an expert: least confident / random (difference [95% CI]) | Questions |")
    keys = [key for key, title in LLAMA_SQUAD_COLUMNS if "valid JSON)" not in title]
    lines = [header, "|---|" + "---:|" * (len(keys) + len(TRUST_COLUMNS) + 2)]
    for name, rows in named:
        ours, official, summary = llama_squad_metrics(rows), official_metrics(rows), summary_statistics(rows)
        cells = ([f"{ours[key]:.2f}" for key in keys] + trust_cells(summary, official)
                 + [budget_cells(review_budget(rows)), str(len(rows))])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    exact = {name: [100.0 * float(r["official_exact"]) for r in rows] for name, rows in named}
    first = named[0][0]
    lines += ["", f"Paired differences in official EM, points [95% CI], same {len(named[0][1])} questions:", "",
              f"| Model | vs always \"?\" | vs {first} |", "|---|---:|---:|"]
    for name, _ in named[:-1]:
        cells = []
        for other in (BASELINE_NAME, first):
            if other == name:
                cells.append("")
                continue
            d = paired_difference(exact[other], exact[name])
            cells.append(f"{d['difference']:+.2f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
