"""Where an expert's time goes (eval.routing): each answer's confidence, the review order, and what
reviewing a share of the questions buys, against hand computations."""

import math

import pytest
import torch

from torchtune_blah.data.chat import answer_prompt
from torchtune_blah.data.squad import load_squad_records
from torchtune_blah.eval.abstention import apply_rule
from torchtune_blah.eval.report import always_abstain_rows, comparison_table, review_queue
from torchtune_blah.eval.routing import (answer_confidence, auroc_wrong, check_expert_accuracy, curves,
                                         review_budget, row_confidence)
from torchtune_blah.eval.run import Reply, abstention_probe, answer_records
from torchtune_blah.generation import greedy_generate, stop_token_ids
from torchtune_blah.pause import NO_PAUSE
from torchtune_blah.prediction import prediction_rows
from torchtune_blah.tiny import tiny_llama3


def _row(qid, answer, confidence, exact, na_prob=0.5):
    return {"id": qid, "model_answer": answer, "na_prob": na_prob, "confidence": confidence,
            "official_exact": exact, "gold_answers": ["x"] if answer != "?" else [], "has_answer": answer != "?"}


def test_confidence_of_an_answer_under_each_rule():
    assert answer_confidence("?", 0.8, -5.0) == 0.8  # an abstention: its abstention score
    assert answer_confidence("Normandy", 0.8, math.log(0.25)) == pytest.approx(0.25)  # a span: its probability
    assert answer_confidence(None, 0.8, math.log(0.1)) == pytest.approx(0.1)  # invalid JSON: the reply's
    # rows of earlier versions: na_prob for "?", P(not abstaining) for a span
    assert row_confidence({"model_answer": "?", "na_prob": 0.3}) == 0.3
    assert row_confidence({"model_answer": "x", "na_prob": 0.3}) == pytest.approx(0.7)


def test_threshold_rows_carry_the_confidence_of_the_decided_answer():
    record = load_squad_records("bundled_sample")[0]
    scores = {"p_abstain": 0.7, "abstain_vs_span": 0.9}
    # the rule abstained (0.7 > 0.5): its confidence is the score; the greedy answer (a span) gets the span's
    reply = Reply(text="", na_prob=0.7, answer="?", confidence=0.7, span_answer="Normandy", span_prob=0.2,
                  scores=scores, greedy_answer="Normandy", greedy_known=True)
    [row] = prediction_rows([record], [reply], run_dir="r", stage="lora", scored=True)
    assert row["confidence"] == 0.7 and row["span_prob"] == 0.2
    [greedy] = apply_rule([row], "p_abstain", None)
    assert greedy["model_answer"] == "Normandy" and greedy["confidence"] == 0.2
    [strict] = apply_rule([row], "abstain_vs_span", 0.95)  # 0.9 <= 0.95: the span
    assert strict["model_answer"] == "Normandy" and strict["confidence"] == 0.2
    [lax] = apply_rule([row], "abstain_vs_span", 0.1)
    assert lax["model_answer"] == "?" and lax["confidence"] == 0.9


def test_generation_sums_the_log_probabilities_of_what_it_wrote(tokenizer):
    """reply_logprob / span_logprob equal the teacher-forced log-probabilities of the written tokens."""
    torch.manual_seed(0)
    model = tiny_llama3().eval()
    records = load_squad_records("bundled_sample")[::60][:3]
    prompts = [answer_prompt(tokenizer, r, []) for r in records]
    for mask in (False, True):
        gens = greedy_generate(model, prompts, pad_id=tokenizer.pad_id, stop_ids=set(), max_new_tokens=6,
                               pause=NO_PAUSE, probe=(2, 7), probe_mask=mask)
        for prompt, gen in zip(prompts, gens):
            seq = list(prompt) + gen.tokens
            with torch.no_grad():
                logits = model(torch.tensor([seq])).float()
            logits = logits[0] if not isinstance(logits, list) else torch.cat(logits, dim=1)[0]
            lps = [torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t].item() for i, t in enumerate(gen.tokens)]
            assert gen.reply_logprob == pytest.approx(sum(lps), abs=1e-3)
            assert gen.span_logprob == pytest.approx(sum(lps[2:]), abs=1e-3)
            if mask:
                assert gen.tokens[2] != 7  # the probed id was forbidden there


def test_every_answer_row_has_a_confidence(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama3().eval()
    records = load_squad_records("bundled_sample")[::80][:4]
    kwargs = dict(prompt_style="single_turn", stop_ids=stop_token_ids(tokenizer), probe=abstention_probe(tokenizer),
                  max_new_tokens=10)
    for abstention in (None, ("p_abstain", 0.5)):
        rows = answer_records(model, tokenizer, records, NO_PAUSE, abstention=abstention, **kwargs)
        assert all(0.0 <= r["confidence"] <= 1.0 for r in rows)
        for r in rows:
            if r["model_answer"] == "?":
                assert r["confidence"] == r["na_prob"]


def test_review_queue_order_invalid_json_then_least_confident():
    rows = [_row("a", "x", 0.9, 1), _row("b", None, 0.95, 0), _row("c", "?", 0.2, 0), _row("d", "y", 0.5, 0)]
    assert [r["id"] for r in review_queue(rows)] == ["b", "c", "d", "a"]
    assert [r["review_reason"] for r in review_queue(rows, limit=2)] == ["invalid JSON", "confidence 0.200"]


def test_auroc_wrong():
    rows = [_row("a", "x", 0.9, 1), _row("b", "x", 0.8, 1), _row("c", "x", 0.3, 0), _row("d", "x", 0.1, 0)]
    assert auroc_wrong(rows) == 1.0  # every wrong answer less confident than every right one
    rows[0]["confidence"] = 0.05
    assert auroc_wrong(rows) == pytest.approx(0.5)  # a: right, least confident of all


def test_model_plus_expert_against_a_hand_computation():
    # ten questions, confidence 0.1..1.0; the model is right on exactly the five most confident
    rows = [_row(str(i), "x", (i + 1) / 10, int(i >= 5)) for i in range(10)]
    budget = review_budget(rows, expert_accuracy=1.0, shares=(10, 20, 30, 50), target_em=80.0, samples=200)
    assert budget["model_alone"] == 50.0
    cells = {s["share"]: s for s in budget["shares"]}
    # least confident: the k reviewed are all wrong ones: 50 + 10k points
    assert [cells[s]["least_confident"] for s in (10, 20, 30, 50)] == pytest.approx([60, 70, 80, 100])
    # random: X% at the expert's accuracy, the rest at the model's: 50 + X/2
    assert [cells[s]["random"] for s in (10, 20, 30, 50)] == pytest.approx([55, 60, 65, 75])
    assert cells[30]["difference"] == pytest.approx(15)
    low, high = cells[30]["ci95"]
    assert low <= 15 + 1e-9 and high >= 0 and low > 0  # the ranking is perfect: every resample gains
    # the inverse question: 80% needs 3 of 10 least-confident, 60% at random
    assert budget["share_for_target"] == {"target_em": 80.0, "least_confident": 30.0, "random": pytest.approx(60.0)}
    # an expert right 80% of the time: 50% reviewed least-confident = 5 x 0.8 + 5 right = 90%
    half = review_budget(rows, expert_accuracy=0.8, shares=(50,), samples=50)["shares"][0]
    assert half["least_confident"] == pytest.approx(90.0) and half["random"] == pytest.approx(65.0)
    c = curves(rows)
    assert c["least_confident"][0] == 50.0 and c["least_confident"][5] == 100.0 and c["random"][-1] == 100.0


def test_budget_bad_expert_accuracy_is_refused():
    for bad in (1.5, -0.1, "high", True):
        with pytest.raises(ValueError, match="expert_accuracy"):
            check_expert_accuracy(bad)


def test_comparison_table_shows_the_30_percent_column():
    rows = [_row(str(i), "x", (i + 1) / 10, int(i >= 5)) for i in range(10)]
    for r in rows:
        r.update(llama_squad_exact=bool(r["official_exact"]), valid_json=True, official_f1=float(r["official_exact"]),
                 prediction="x")
    table = comparison_table([("model", rows)])
    assert "30% to an expert" in table and "| 80.0 / 65.0 (+15.0" in table
    assert all(r["confidence"] == 1.0 for r in always_abstain_rows(rows))
