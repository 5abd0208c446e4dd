"""What people read: the metrics table, the seed-style results row, the review queue."""

from typing import Any, Dict, List, Mapping, Optional

SEED_COLUMNS = [
    ("pct_valid_json", "% Valid JSON"),
    ("pct_exact_match", "% Exact Match"),
    ("pct_exact_match_among_valid_json", "% Exact Match (valid JSON)"),
    ("pct_correct_no_answer", "% Correct No Answer"),
    ("pct_correct_has_answer", "% Correct Has Answer"),
]


def results_row(name: str, seed: Mapping[str, float]) -> str:
    """Header and one row in the layout of the seed's results table (markdown)."""
    header = "| Model | " + " | ".join(title for _, title in SEED_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(SEED_COLUMNS)
    row = f"| {name} | " + " | ".join(f"{seed[key]:.2f}" for key, _ in SEED_COLUMNS) + " |"
    return "\n".join([header, rule, row]) + "\n"


def format_table(metrics: Mapping[str, Any]) -> str:
    lines = [f"SQuAD 2.0 evaluation: stage {metrics['stage']}, {metrics['official']['total']} questions, "
             f"{metrics['num_pause_tokens']} pause tokens, {metrics['prompt_style']}",
             "  the seed's metrics:"]
    lines += [f"    {title:<28} {metrics['seed'][key]:7.2f}" for key, title in SEED_COLUMNS]
    lines.append("  official SQuAD 2.0 metrics:")
    for key, value in metrics["official"].items():
        lines.append(f"    {key:<28} {value:7.2f}" if isinstance(value, float) else f"    {key:<28} {value:7d}")
    return "\n".join(lines)


def review_priority(row: Mapping[str, Any]) -> tuple:
    """Sort key, most in need of a person first: invalid JSON, then answers that
    disagree with the model's own abstention probability, then by closeness of that
    probability to 0.5."""
    abstained = row["model_answer"] == "?"
    disagrees = row["model_answer"] is not None and abstained != (row["na_prob"] >= 0.5)
    return (row["model_answer"] is not None, not disagrees, abs(row["na_prob"] - 0.5), row["id"])


def review_queue(rows: List[Mapping[str, Any]], records: Mapping[str, Any], limit: Optional[int] = None) -> List[Dict]:
    """The questions to show an expert, as flat training records.

    ``answers`` holds the model's proposal (``[]`` when it abstained or its reply did
    not parse); the expert corrects it in place, and the file goes back into
    training as ``dataset: {source: json, data_files: review_queue.jsonl}``.
    """
    queue = []
    for row in sorted(rows, key=review_priority)[:limit]:
        record = records[row["id"]]
        answer = row["model_answer"]
        reason = ("invalid JSON" if answer is None else
                  "answer disagrees with its abstention probability" if review_priority(row)[1] is False else
                  "uncertain")
        queue.append({
            "id": record.id, "title": record.title, "context": record.context, "question": record.question,
            "answers": [] if answer in (None, "?") else [answer],
            "model_answer": answer, "model_output": row["raw_output"], "na_prob": row["na_prob"],
            "review_reason": reason,
        })
    return queue


def official_data(records) -> Dict[str, Any]:
    """Records in the official SQuAD 2.0 layout (one paragraph per question)."""
    return {"version": "v2.0", "data": [{"title": "blah_eval", "paragraphs": [
        {"context": r.context, "qas": [{"id": r.id, "question": r.question, "is_impossible": not r.answers,
                                        "answers": [{"text": a} for a in r.answers]}]}
        for r in records]}]}


def always_abstain(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """The scores of a model that answers "?" to every question of the same evaluation: the
    baseline any abstention-heavy model must be read against."""
    official = metrics["official"]
    pct = 100.0 * official["NoAns_total"] / official["total"] if official["total"] else 0.0
    seed = {"pct_valid_json": 100.0, "pct_exact_match": pct, "pct_exact_match_among_valid_json": pct,
            "pct_correct_no_answer": 100.0, "pct_correct_has_answer": 0.0}
    return {"seed": seed, "official": {"exact": pct, "f1": pct, "total": official["total"]}}


def comparison_table(named_metrics: List[tuple]) -> str:
    """Markdown: one row per ``(name, metrics.json content)`` in the seed's layout, plus the
    official exact/F1, the number of questions, and the always-"?" baseline of the first."""
    header = ("| Model | " + " | ".join(title for _, title in SEED_COLUMNS)
              + " | Official EM | Official F1 | Questions |")
    rule = "|---|" + "---:|" * (len(SEED_COLUMNS) + 3)
    lines = [header, rule]
    rows = list(named_metrics)
    if rows:
        rows.append(('always "?" (baseline)', always_abstain(rows[0][1])))
    for name, m in rows:
        cells = [f"{m['seed'][key]:.2f}" for key, _ in SEED_COLUMNS]
        cells += [f"{m['official']['exact']:.2f}", f"{m['official']['f1']:.2f}", str(m["official"]["total"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
