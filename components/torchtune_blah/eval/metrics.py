"""The article's five numbers and the official SQuAD 2.0 metrics.

Seed (teticio/llama-squad): exact match is a strict string comparison of the
parsed answer with any gold answer, ``"?"`` standing for "no answer"; invalid
JSON is wrong. Official (SQuAD 2.0 evaluation script): answers are normalised
(lower case, punctuation and the articles a/an/the removed, whitespace
collapsed), exact match and token F1 take the best gold answer, and the empty
string is the no-answer prediction and gold. Key names are the official
script's own.
"""

import collections
import re
import string
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from torchtune_blah.data.squad import NO_ANSWER

# What predictions.json holds for an unparseable reply: a non-empty string that
# normalises to non-empty text, so the official script never reads it as "no answer".
INVALID_PREDICTION = "<invalid json>"

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> List[str]:
    return normalize_answer(text).split() if text else []


def official_exact(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def official_f1(gold: str, prediction: str) -> float:
    gold_tokens, pred_tokens = _tokens(gold), _tokens(prediction)
    if not gold_tokens or not pred_tokens:  # no-answer on either side: F1 is exact match
        return float(gold_tokens == pred_tokens)
    common = collections.Counter(gold_tokens) & collections.Counter(pred_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def official_prediction(answer: Optional[str]) -> str:
    """predictions.json value: ``""`` for an abstention, the sentinel for invalid JSON."""
    if answer is None:
        return INVALID_PREDICTION
    return "" if answer == NO_ANSWER else answer


def score_example(answers: Sequence[str], model_answer: Optional[str]) -> Dict[str, float]:
    """Per-question scores: llama-squad's strict EM and the official EM / F1."""
    llama_squad_golds = list(answers) or [NO_ANSWER]
    prediction = official_prediction(model_answer)
    official_golds = [a for a in answers if normalize_answer(a)] or [""]
    return {
        "valid_json": model_answer is not None,
        "llama_squad_exact": model_answer is not None and model_answer in llama_squad_golds,
        "official_exact": max(official_exact(g, prediction) for g in official_golds),
        "official_f1": max(official_f1(g, prediction) for g in official_golds),
    }


def _percent(numerator: float, denominator: int) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def llama_squad_metrics(rows: Iterable[Mapping]) -> Dict[str, float]:
    """The article's table: rows carry ``has_answer``, ``valid_json``, ``llama_squad_exact``."""
    rows = list(rows)
    valid = [r for r in rows if r["valid_json"]]
    no_answer = [r for r in rows if not r["has_answer"]]
    has_answer = [r for r in rows if r["has_answer"]]
    return {
        "pct_valid_json": _percent(len(valid), len(rows)),
        "pct_exact_match": _percent(sum(r["llama_squad_exact"] for r in rows), len(rows)),
        "pct_exact_match_among_valid_json": _percent(sum(r["llama_squad_exact"] for r in valid), len(valid)),
        "pct_correct_no_answer": _percent(sum(r["llama_squad_exact"] for r in no_answer), len(no_answer)),
        "pct_correct_has_answer": _percent(sum(r["llama_squad_exact"] for r in has_answer), len(has_answer)),
    }


def official_metrics(rows: Iterable[Mapping]) -> Dict[str, float]:
    """The official script's summary (without its best-threshold part) over rows
    carrying ``has_answer``, ``official_exact``, ``official_f1``."""
    rows = list(rows)
    result = collections.OrderedDict(
        exact=_percent(sum(r["official_exact"] for r in rows), len(rows)),
        f1=_percent(sum(r["official_f1"] for r in rows), len(rows)),
        total=len(rows),
    )
    for prefix, subset in (("HasAns", [r for r in rows if r["has_answer"]]),
                           ("NoAns", [r for r in rows if not r["has_answer"]])):
        if subset:
            result[f"{prefix}_exact"] = _percent(sum(r["official_exact"] for r in subset), len(subset))
            result[f"{prefix}_f1"] = _percent(sum(r["official_f1"] for r in subset), len(subset))
            result[f"{prefix}_total"] = len(subset)
    return dict(result)


def official_best_thresholds(rows: Sequence[Mapping]) -> Dict[str, float]:
    """The official script's ``best_exact`` / ``best_f1`` (+ ``_thresh``) from ``na_probs``.

    Rows carry ``has_answer``, ``prediction`` (predictions.json value), ``na_prob``
    and the raw ``official_exact`` / ``official_f1``. Abstaining wherever na_prob
    exceeds the threshold, the best threshold over the observed probabilities.
    """
    result = {}
    for name, key in (("exact", "official_exact"), ("f1", "official_f1")):
        score = best = float(sum(1 for r in rows if not r["has_answer"]))
        best_thresh = 0.0
        for row in sorted(rows, key=lambda r: r["na_prob"]):
            if row["has_answer"]:
                score += row[key]
            elif row["prediction"]:
                score -= 1
            if score > best:
                best, best_thresh = score, row["na_prob"]
        result[f"best_{name}"] = _percent(best, len(rows))
        result[f"best_{name}_thresh"] = best_thresh
    return result
