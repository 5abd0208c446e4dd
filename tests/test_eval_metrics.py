"""Metric cases computed by hand."""

import pytest

from torchtune_blah.eval.metrics import (
    INVALID_PREDICTION,
    normalize_answer,
    official_best_thresholds,
    official_metrics,
    official_prediction,
    score_example,
    llama_squad_metrics,
)
from torchtune_blah.eval.parse import extract_answer


@pytest.mark.parametrize("text, expected", [
    ('\n```json\n{\n  "answer": "France"\n}', "France"),
    ('\n```json\n{\n  "answer": "?"\n}', "?"),
    ("\n```json\n{'answer': 'single quotes',}", "single quotes"),  # JSON5 leniency
    ('\n```json\n{answer: "unquoted key"}', "unquoted key"),
    ('\n```json\n{\n  "answer": "Beyoncé"\n}\n```', "Beyoncé"),
    ('\n```json\n{\n  "answer": "France"', None),  # no closing brace: cut off
    ('\n```json\n{\n  "answer": 1066\n}', None),  # not a string
    ('\n```json\n{\n  "reply": "France"\n}', None),
    ("no json at all", None),
    ('\n```json\n{\n  "answer": "a\n}', None),  # broken string
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, normalized", [
    ("The Normans", "normans"),
    ("  a  Duchy of   Normandy. ", "duchy of normandy"),
    ("Rollo's", "rollos"),
    ("An apple, the pear", "apple pear"),
    ("theatre", "theatre"),  # articles only as whole words
])
def test_official_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_scores_by_hand():
    golds = ["10th and 11th centuries", "in the 10th and 11th centuries"]
    s = score_example(golds, "the 10th and 11th centuries")
    assert s["llama_squad_exact"] is False  # strict string match
    assert s["official_exact"] == 1  # "the" is dropped: equals the second gold after normalising
    s = score_example(golds, "10th century")
    # vs gold 1: pred [10th, century], gold [10th, and, 11th, centuries]: 1 common; P=1/2, R=1/4, F1=1/3
    # vs gold 2: gold [in, 10th, and, 11th, centuries]: 1 common; P=1/2, R=1/5, F1=2/7
    assert s["official_exact"] == 0 and s["official_f1"] == pytest.approx(1 / 3)
    # no-answer question: only an abstention is right, under both
    assert score_example([], "?") == {"valid_json": True, "llama_squad_exact": True, "official_exact": 1,
                                      "official_f1": 1.0}
    assert score_example([], "France")["official_f1"] == 0.0
    # invalid JSON: never an abstention, never right
    s = score_example([], None)
    assert not s["valid_json"] and not s["llama_squad_exact"] and s["official_exact"] == 0
    assert official_prediction(None) == INVALID_PREDICTION and normalize_answer(INVALID_PREDICTION)
    assert official_prediction("?") == ""
    # answering "?" where there is an answer is wrong
    assert score_example(["France"], "?")["official_exact"] == 0


def _rows():
    cases = [  # (gold answers, model answer)
        (["France"], "France"),            # right
        (["Rollo"], "rollo"),              # seed wrong, official right
        (["Denmark, Iceland and Norway"], "Denmark"),  # partial: F1 2/4... see below
        ([], "?"),                         # right abstention
        ([], "Normandy"),                  # wrong: answered an unanswerable question
        ([], None),                        # invalid JSON
    ]
    rows = []
    for i, (golds, answer) in enumerate(cases):
        rows.append({"id": str(i), "has_answer": bool(golds), "prediction": official_prediction(answer),
                     "gold_answers": golds, "model_answer": answer, **score_example(golds, answer)})
    return rows


def test_llama_squad_metrics_by_hand():
    m = llama_squad_metrics(_rows())
    assert m["pct_valid_json"] == pytest.approx(100 * 5 / 6)
    assert m["pct_exact_match"] == pytest.approx(100 * 2 / 6)  # France, "?"
    assert m["pct_exact_match_among_valid_json"] == pytest.approx(100 * 2 / 5)
    assert m["pct_correct_no_answer"] == pytest.approx(100 * 1 / 3)
    assert m["pct_correct_has_answer"] == pytest.approx(100 * 1 / 3)


def test_official_metrics_by_hand():
    m = official_metrics(_rows())
    # "Denmark" vs "denmark iceland and norway": P=1, R=1/4, F1=0.4
    assert m["total"] == 6 and m["HasAns_total"] == 3 and m["NoAns_total"] == 3
    assert m["exact"] == pytest.approx(100 * 3 / 6)
    assert m["f1"] == pytest.approx(100 * (1 + 1 + 0.4 + 1) / 6)
    assert m["HasAns_exact"] == pytest.approx(100 * 2 / 3) and m["HasAns_f1"] == pytest.approx(100 * 2.4 / 3)
    assert m["NoAns_exact"] == pytest.approx(100 / 3) and m["NoAns_f1"] == pytest.approx(100 / 3)


def test_best_threshold_by_hand():
    rows = _rows()
    for row, p in zip(rows, [0.1, 0.2, 0.3, 0.9, 0.8, 0.7]):
        row["na_prob"] = p
    # Sorted by na_prob: 0.1 (+1), 0.2 (+1), 0.3 (+0 exact / +0.4 f1), 0.7 (invalid answered: -1),
    # 0.8 (answered, no-answer: -1), 0.9 (abstained: 0). Start at 3 (all abstain).
    # exact: 4, 5, 5, 4, 3, 3 -> best 5 at 0.2; f1: 4, 5, 5.4, 4.4, 3.4, 3.4 -> best 5.4 at 0.3
    best = official_best_thresholds(rows)
    assert best["best_exact"] == pytest.approx(100 * 5 / 6) and best["best_exact_thresh"] == 0.2
    assert best["best_f1"] == pytest.approx(100 * 5.4 / 6) and best["best_f1_thresh"] == 0.3


def test_always_abstain_baseline_and_comparison_table():
    from torchtune_blah.eval.report import always_abstain_rows, comparison_table

    rows = _rows()
    for row, p in zip(rows, [0.1, 0.2, 0.3, 0.9, 0.8, 0.7]):
        row["na_prob"] = p
    baseline = always_abstain_rows(rows)
    no_answer = sum(not r["has_answer"] for r in rows)
    assert sum(r["official_exact"] for r in baseline) == no_answer
    assert all(r["model_answer"] == "?" and r["prediction"] == "" for r in baseline)
    table = comparison_table([("trained", rows)]).splitlines()
    assert table[0].startswith("| Model | % Valid JSON | % Exact Match | % Correct No Answer |")
    pct = 100 * no_answer / len(rows)
    assert table[3].startswith(f'| always "?" (baseline) | 100.00 | {pct:.2f} | 100.00 | 0.00 | {pct:.2f} [')
    # the baseline's constant na_prob ranks nothing
    assert "| 100.0 | 0.500 [" in table[3]
    # paired differences: the trained row against the baseline, with an interval
    trained_exact = 100 * sum(r["official_exact"] for r in rows) / len(rows)
    diff_line = next(line for line in table if line.startswith("| trained |") and "[" in line and "vs" not in line
                     and line.count("|") == 4)
    assert diff_line.split("|")[2].strip().startswith(f"{trained_exact - pct:+.2f} [")
