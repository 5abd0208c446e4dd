"""Calibrated abstention: when to answer "?" by a threshold on the model's own scores.

The article's rule is greedy decoding: the model abstains when ``"?"`` is its most likely first
value token. Extractive SQuAD 2.0 systems instead compare a *score* of abstaining with a threshold
chosen on validation data (BERT's ``null_score_diff_threshold``). Here, with
``abstain_threshold: t``, the answer's first value token is decoded with the abstention token
masked, so every question gets its best span; the question is then answered ``"?"`` when its
abstention score exceeds ``t``, otherwise with that span. The scores (each in [0, 1]):

- ``p_abstain``: P(abstention token) where the answer value starts (the article's ``na_prob``);
- ``abstain_vs_span``: P(abstain) / (P(abstain) + P(best span)), the span's probability being the
  product of its tokens' probabilities: the null-score difference of BERT-style systems, as a
  probability (``sigmoid(log P(abstain) - log P(span))``);
- ``p_no`` (two-turn style only): P("no") where the first reply's yes/no value starts.

``calibrate`` picks, on validation questions, the score that ranks answerability best (AUROC)
and the threshold that maximises exact match (or F1) with it; ``calibration.json`` keeps both,
with fingerprints of the run's weights and tokenizer so that it is never applied to another model.
"""

import hashlib
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torchtune_blah.data.squad import NO_ANSWER
from torchtune_blah.eval.metrics import score_example
from torchtune_blah.eval.stats import auroc
from torchtune_blah.resumable import read_json
from torchtune_blah.run_dir import RunDir

SCORE_RULES = ("p_abstain", "abstain_vs_span", "p_no")
METRIC_KEYS = {"exact": "official_exact", "f1": "official_f1"}


def abstention_scores(p_abstain: float, span_logprob: float, p_no: Optional[float] = None) -> Dict[str, float]:
    """Every score rule for one question (``p_no`` only in the two-turn style)."""
    log_abstain = math.log(max(p_abstain, 1e-30))
    diff = max(min(log_abstain - span_logprob, 700.0), -700.0)
    scores = {"p_abstain": float(p_abstain), "abstain_vs_span": 1.0 / (1.0 + math.exp(-diff))}
    if p_no is not None:
        scores["p_no"] = float(p_no)
    return scores


def check_threshold(value: Any, key: str = "abstain_threshold") -> Optional[float]:
    """A threshold must be a number in [0, 1] (or null for the article's greedy rule)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{key}={value!r}: give a number in [0, 1] (abstain when the score exceeds it), "
                         "'calibrated' (the run's calibration.json) or null (greedy, the article's rule)")
    return float(value)


def check_rule(rule: Any, prompt_style: str, key: str = "abstain_score") -> str:
    if rule not in SCORE_RULES:
        raise ValueError(f"{key}={rule!r}: must be one of {SCORE_RULES}")
    if rule == "p_no" and prompt_style != "multi_turn":
        raise ValueError(f"{key}=p_no needs prompt_style multi_turn (its first reply is the yes/no answer)")
    return str(rule)


def decide(span_answer: Optional[str], score: float, threshold: float) -> Optional[str]:
    """The answer under the threshold rule: abstain when the score exceeds the threshold."""
    return NO_ANSWER if score > threshold else span_answer


def _row_values(row: Mapping[str, Any], key: str):
    """(score if it answers with its span, score if it abstains) for one row."""
    answers = row["gold_answers"]
    return score_example(answers, row["span_answer"])[key], score_example(answers, NO_ANSWER)[key]


def best_threshold(scores: Sequence[float], if_answered: Sequence[float], if_abstained: Sequence[float]):
    """The threshold t maximising the total when rows with score > t abstain.

    Returns ``(t, total)``; t lies halfway between two observed scores (0/1 past the ends), the
    middle one of equally good cuts, so that it does not sit on a validation question's score.
    """
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    s = [scores[i] for i in order]
    total = sum(if_abstained)  # k = 0: every row abstains
    best, best_ks = total, [0]
    for k in range(1, len(s) + 1):  # the k lowest-scoring rows answer
        i = order[k - 1]
        total += if_answered[i] - if_abstained[i]
        if k < len(s) and s[k] == s[k - 1]:
            continue  # no threshold separates equal scores
        if total > best + 1e-12:
            best, best_ks = total, [k]
        elif abs(total - best) <= 1e-12:
            best_ks.append(k)
    k = best_ks[len(best_ks) // 2]
    low = s[k - 1] if k > 0 else 0.0
    high = s[k] if k < len(s) else 1.0
    return (low + high) / 2.0, best


def calibrate(rows: Sequence[Mapping[str, Any]], metric: str = "exact") -> Dict[str, Any]:
    """Pick the score rule (best AUROC for "no answer") and its threshold (best ``metric``) on
    rows answered with ``abstain_threshold`` set (they carry ``span_answer`` and ``abstain_scores``)."""
    if metric not in METRIC_KEYS:
        raise ValueError(f"calibrate_metric={metric!r}: must be one of {tuple(METRIC_KEYS)}")
    check_calibration_rows(rows)
    key = METRIC_KEYS[metric]
    values = [_row_values(r, key) for r in rows]
    if_answered, if_abstained = [v[0] for v in values], [v[1] for v in values]
    no_answer = [not r["has_answer"] for r in rows]
    rules = {}
    for rule in SCORE_RULES:
        if not all(rule in r["abstain_scores"] for r in rows):
            continue
        scores = [r["abstain_scores"][rule] for r in rows]
        threshold, total = best_threshold(scores, if_answered, if_abstained)
        rules[rule] = {"auroc": auroc(scores, no_answer), "threshold": threshold,
                       metric: 100.0 * total / len(rows),
                       "abstention_rate": 100.0 * sum(s > threshold for s in scores) / len(rows)}
    chosen = max(rules, key=lambda r: (rules[r]["auroc"], r == "p_abstain"))
    return {"rule": chosen, "threshold": rules[chosen]["threshold"], "metric": metric,
            "questions": len(rows), "unanswerable": sum(no_answer), "rules": rules}


def check_calibration_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Calibration needs both kinds of question: without them any threshold is as good as another."""
    if not any(not r["has_answer"] for r in rows):
        raise ValueError("calibration: the validation questions hold no unanswerable question, so no threshold "
                         "can be chosen; calibrate on a split with both kinds (bundled_pool's validation has 296)")
    if not any(r["has_answer"] for r in rows):
        raise ValueError("calibration: the validation questions hold no answerable question; calibrate on a split "
                         "with both kinds")


# ----------------------------------------------------------------------------- the file


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(run_cfg: Mapping[str, Any], run_dir: str, stage: str) -> Dict[str, str]:
    """What a calibration belongs to: the stage's trained files (pause rows, adapter) or, for the
    base model, the checkpoint files' names and sizes; and the tokenizer file."""
    trained = RunDir(run_dir).trained_files(stage) if stage != "base" else []
    if trained:
        weights = hashlib.sha256("".join(_sha256(p) for p in trained).encode()).hexdigest()
    else:
        ckpt = run_cfg["checkpointer"]
        files = [str(f) for f in ckpt.get("checkpoint_files", [])]
        sizes = [os.path.getsize(os.path.join(str(ckpt["checkpoint_dir"]), f))
                 if os.path.isfile(os.path.join(str(ckpt["checkpoint_dir"]), f)) else -1 for f in files]
        weights = hashlib.sha256(json.dumps([files, sizes]).encode()).hexdigest()
    tok = run_cfg["tokenizer"]
    tok_files = [str(tok[k]) for k in ("path", "merges_file") if tok.get(k)]
    tokenizer = hashlib.sha256("".join(_sha256(p) if os.path.isfile(p) else p for p in tok_files).encode()).hexdigest()
    return {"stage": stage, "weights_sha256": weights, "tokenizer_sha256": tokenizer}


def load_calibration(path: str, fingerprint: Mapping[str, str], prompt_style: str) -> Dict[str, Any]:
    """Read a calibration file and refuse one made for other weights, tokenizer or prompt style."""
    if not os.path.isfile(path):
        raise ValueError(f"abstain_threshold=calibrated: {path} not found; make it with blah_eval calibrate=true "
                         "on validation questions (dataset.source=bundled_pool dataset.split=validation)")
    calibration = read_json(path, "the abstention calibration")
    for key in ("rule", "threshold", "fingerprint", "prompt_style"):
        if not isinstance(calibration, dict) or key not in calibration:
            raise ValueError(f"{path} is not a calibration file (no {key!r})")
    theirs = calibration["fingerprint"]
    for key, what in (("stage", "stage"), ("weights_sha256", "weights"), ("tokenizer_sha256", "tokenizer")):
        if theirs.get(key) != fingerprint[key]:
            raise ValueError(f"{path} was calibrated for other {what} ({key}: {theirs.get(key)!r} != "
                             f"{fingerprint[key]!r}); calibrate this run again (blah_eval calibrate=true)")
    if calibration["prompt_style"] != prompt_style:
        raise ValueError(f"{path} was calibrated with prompt_style={calibration['prompt_style']}, not {prompt_style}")
    check_threshold(calibration["threshold"], f"{path}: threshold")
    check_rule(calibration["rule"], prompt_style, f"{path}: rule")
    return calibration


def apply_rule(rows: Sequence[Mapping[str, Any]], rule: str, threshold: Optional[float]) -> List[Dict[str, Any]]:
    """Rows re-decided under another rule (``threshold`` None: the greedy answers of the same pass,
    single-turn rows only), with their per-question scores and ``confidence`` recomputed (an
    abstention's is the rule's score, a span's the span's probability). For reports and plots."""
    from torchtune_blah.eval.metrics import official_prediction

    out = []
    for row in rows:
        if threshold is None:
            answer = row["greedy_answer"]
            score = row["abstain_scores"]["p_abstain"]
        else:
            score = row["abstain_scores"][rule]
            answer = decide(row["span_answer"], score, threshold)
        new = {**row, "model_answer": answer, "prediction": official_prediction(answer), "na_prob": score}
        if "span_prob" in row:  # (rows of earlier versions have no probabilities to read it from)
            new["confidence"] = score if answer == NO_ANSWER else float(row["span_prob"])
        new.update(score_example(row["gold_answers"], answer))
        out.append(new)
    return out


def abstention_from_config(cfg: Mapping[str, Any], run_cfg: Mapping[str, Any], run_dir: Optional[str], stage: str,
                           prompt_style: str) -> Optional[Dict[str, Any]]:
    """The decision rule a blah_eval / blah_generate config asks for, checked before any model
    loads: None (greedy, the article's rule) or ``{rule, threshold, source}``.

    ``abstain_threshold``: null, a number in [0, 1] (with ``abstain_score``, default
    ``p_abstain``), or ``calibrated`` (``<run_dir>/<stage>/calibration.json``, or the file named by
    ``calibration_file``), refused when it was made for other weights, tokenizer or prompt style.
    """
    value = cfg.get("abstain_threshold")
    if isinstance(value, str) and value == "calibrated":
        if cfg.get("abstain_score") is not None:
            raise ValueError("abstain_score: with abstain_threshold=calibrated the rule comes from the calibration "
                             "file; drop abstain_score")
        path = cfg.get("calibration_file") or (RunDir(run_dir).calibration_file(stage) if run_dir else None)
        if path is None:
            raise ValueError("abstain_threshold=calibrated needs run_dir (its <stage>/calibration.json) or "
                             "calibration_file")
        calibration = load_calibration(str(path), run_fingerprint(run_cfg, run_dir or "", stage), prompt_style)
        return {"rule": calibration["rule"], "threshold": float(calibration["threshold"]), "source": str(path)}
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            check_threshold(value)
    threshold = check_threshold(value)
    if threshold is None:
        if cfg.get("abstain_score") is not None:
            raise ValueError("abstain_score needs abstain_threshold (a number in [0, 1] or 'calibrated')")
        return None
    rule = check_rule(cfg.get("abstain_score") or "p_abstain", prompt_style)
    return {"rule": rule, "threshold": threshold, "source": "abstain_threshold"}
