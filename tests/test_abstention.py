"""Calibrated abstention: the threshold rule, calibration, AUROC, bootstrap intervals, the pool split."""

import json
import os
import random

import numpy as np
import pytest
from omegaconf import OmegaConf

from torchtune_blah.data.squad import POOL_VALIDATION_ARTICLES, load_squad_records
from torchtune_blah.eval.abstention import (abstention_from_config, abstention_scores, apply_rule, best_threshold,
                                            calibrate, run_fingerprint)
from torchtune_blah.eval.run import abstention_probe, answer_records
from torchtune_blah.eval.stats import auroc, bootstrap_auroc_ci, bootstrap_ci, paired_difference
from torchtune_blah.generation import stop_token_ids


# ----------------------------------------------------------------------------- the pool


def test_pool_split_has_no_article_on_both_sides():
    train = load_squad_records("bundled_pool", split="train")
    validation = load_squad_records("bundled_pool", split="validation")
    everything = load_squad_records("bundled_pool", split="all")
    train_titles, validation_titles = {r.title for r in train}, {r.title for r in validation}
    assert not train_titles & validation_titles
    assert validation_titles == set(POOL_VALIDATION_ARTICLES)
    assert len(train_titles) == 16 and len(train) + len(validation) == len(everything) == 3379
    assert {r.id for r in train}.isdisjoint(r.id for r in validation)
    # both sides hold both kinds of question, every article too
    for records in (train, validation):
        for title in {r.title for r in records}:
            kinds = {r.has_answer for r in records if r.title == title}
            assert kinds == {True, False}, title
    # none of it is in the held-out measurement set, and every context is short
    sample = load_squad_records("bundled_sample")
    assert {r.title for r in everything}.isdisjoint(r.title for r in sample)
    assert {r.id for r in everything}.isdisjoint(r.id for r in sample)
    assert max(len(r.context.split()) for r in everything) <= 120


def test_pool_split_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="dataset.split='dev'.*train.*validation.*all"):
        load_squad_records("bundled_pool", split="dev")


# ----------------------------------------------------------------------------- statistics


def _reference_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_the_pairwise_definition_and_scipy():
    from scipy.stats import mannwhitneyu

    rng = random.Random(3)
    positive = [rng.random() < 0.4 for _ in range(300)]
    scores = [round(rng.random() * 0.6 + 0.3 * p, 2) for p in positive]  # rounded: many ties
    ours = auroc(scores, positive)
    assert ours == pytest.approx(_reference_auroc(scores, positive), abs=1e-12)
    u = mannwhitneyu([s for s, p in zip(scores, positive) if p], [s for s, p in zip(scores, positive) if not p]).statistic
    assert ours == pytest.approx(u / (sum(positive) * (len(positive) - sum(positive))), abs=1e-12)
    assert auroc([0.1, 0.9], [False, True]) == 1.0 and auroc([0.9, 0.1], [False, True]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.2, 0.3], [True, True]) is None


def test_bootstrap_interval_matches_scipy_and_covers_the_mean():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(1)
    values = (rng.random(400) < 0.55).astype(float) * 100
    low, high = bootstrap_ci(values)
    ref = bootstrap((values,), np.mean, n_resamples=4000, method="percentile", random_state=7).confidence_interval
    assert low < values.mean() < high
    assert low == pytest.approx(ref.low, abs=1.0) and high == pytest.approx(ref.high, abs=1.0)
    # about +-4.9 points for a proportion near one half on 400 questions (normal approximation)
    half = 1.96 * np.sqrt(0.55 * 0.45 / 400) * 100
    assert (high - low) / 2 == pytest.approx(half, abs=0.6)
    assert bootstrap_ci(values) == (low, high)  # seeded: the same interval every time


def test_paired_difference_sees_what_unpaired_intervals_cannot():
    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.5).astype(float)
    b = a.copy()
    flip = rng.choice(np.flatnonzero(a == 0), size=12, replace=False)  # b is right on 12 more questions
    b[flip] = 1.0
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(12 / 300)
    assert 0 < d["ci_low"] < d["difference"] < d["ci_high"]
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(a, b[:-1])


def test_bootstrap_auroc_interval_contains_the_estimate():
    rng = random.Random(5)
    positive = [rng.random() < 0.5 for _ in range(200)]
    scores = [rng.random() + 0.4 * p for p in positive]
    low, high = bootstrap_auroc_ci(scores, positive, samples=300)
    assert low < auroc(scores, positive) < high


# ----------------------------------------------------------------------------- the rule and calibration


def test_abstention_scores_compare_abstaining_with_the_span():
    s = abstention_scores(0.2, np.log(0.2))
    assert s["p_abstain"] == 0.2 and s["abstain_vs_span"] == pytest.approx(0.5)
    s = abstention_scores(0.3, np.log(0.1))
    assert s["abstain_vs_span"] == pytest.approx(0.3 / 0.4)
    assert "p_no" not in s and abstention_scores(0.3, -1.0, p_no=0.9)["p_no"] == 0.9
    # P(abstain) = 0 against a certain span: a finite score of about 0, no log(0) and no overflow
    assert abstention_scores(0.0, 0.0)["abstain_vs_span"] == pytest.approx(0.0, abs=1e-12)
    assert abstention_scores(1.0, -2000.0)["abstain_vs_span"] == pytest.approx(1.0)


def _row(has_answer, span_right, score, greedy="?"):
    gold = ["Paris"] if has_answer else []
    return {"id": str(random.random()), "gold_answers": gold, "has_answer": has_answer,
            "span_answer": "Paris" if span_right else "Lyon", "greedy_answer": greedy,
            "abstain_scores": {"p_abstain": score, "abstain_vs_span": 1 - score}}


def test_calibration_picks_the_best_threshold_on_a_hand_made_set():
    # p_abstain separates perfectly above 0.5 except one answerable question at 0.7 whose span is
    # right: the best cut keeps it answered only if no unanswerable question scores below it.
    rows = [_row(True, True, 0.1), _row(True, True, 0.2), _row(True, False, 0.3), _row(False, False, 0.4),
            _row(False, False, 0.6), _row(True, True, 0.7), _row(False, False, 0.8), _row(False, False, 0.9)]
    result = calibrate(rows, "exact")
    # p_abstain ranks answerability better than its mirror image abstain_vs_span
    assert result["rule"] == "p_abstain"
    assert result["rules"]["p_abstain"]["auroc"] > result["rules"]["abstain_vs_span"]["auroc"]
    # brute force over every cut: answering the 3 lowest (2 right) + abstaining on 5 (4 unanswerable) = 6
    assert result["threshold"] == pytest.approx(0.35)
    assert result["rules"]["p_abstain"]["exact"] == pytest.approx(100 * 6 / 8)
    for t in np.linspace(0, 1, 101):
        decided = apply_rule(rows, "p_abstain", float(t))
        assert sum(r["official_exact"] for r in decided) <= 6
    decided = apply_rule(rows, "p_abstain", result["threshold"])
    assert [r["model_answer"] for r in decided] == ["Paris", "Paris", "Lyon", "?", "?", "?", "?", "?"]
    # the greedy answers of the same pass (threshold None)
    assert {r["model_answer"] for r in apply_rule(rows, "p_abstain", None)} == {"?"}


def test_best_threshold_lies_between_scores_and_respects_ties():
    t, total = best_threshold([0.2, 0.2, 0.8], [1, 0, 0], [0, 1, 1])
    # equal scores cannot be split: answering both 0.2 rows gives 1 + 1 (the 0.8 row abstains) = 2,
    # abstaining on all gives 2 as well; the middle of the equally good cuts is taken.
    assert total == 2 and t in (pytest.approx(0.1), pytest.approx(0.5))
    t, total = best_threshold([0.1, 0.9], [1, 0], [0, 1])
    assert total == 2 and 0.1 < t < 0.9


def test_calibration_refuses_a_split_without_unanswerable_questions():
    rows = [_row(True, True, 0.1), _row(True, False, 0.5)]
    with pytest.raises(ValueError, match="no unanswerable question"):
        calibrate(rows)
    with pytest.raises(ValueError, match="calibrate_metric='em'"):
        calibrate(rows + [_row(False, False, 0.9)], metric="em")


@pytest.mark.parametrize("value", [1.5, -0.1, "often", True])
def test_a_threshold_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match="abstain_threshold.*number in \\[0, 1\\]"):
        abstention_from_config({"abstain_threshold": value}, {}, None, "base", "single_turn")


def test_p_no_needs_the_two_turn_style():
    with pytest.raises(ValueError, match="p_no needs prompt_style multi_turn"):
        abstention_from_config({"abstain_threshold": 0.5, "abstain_score": "p_no"}, {}, None, "base", "single_turn")
    assert abstention_from_config({"abstain_threshold": 0.5, "abstain_score": "p_no"}, {}, None, "base",
                                  "multi_turn")["rule"] == "p_no"


# ----------------------------------------------------------------------------- on a trained tiny model


def _answer(loaded, records, **kwargs):
    model, pause, tokenizer = loaded
    return answer_records(model, tokenizer, records, pause, prompt_style="single_turn",
                          stop_ids=stop_token_ids(tokenizer), probe=abstention_probe(tokenizer),
                          max_new_tokens=40, **kwargs)


@pytest.mark.slow
def test_threshold_rule_abstains_above_t_and_gives_the_best_span_below(loaded):
    records = load_squad_records("bundled_sample")[::25][:16]
    greedy = _answer(loaded, records)
    ruled = _answer(loaded, records, abstention=("p_abstain", 0.5))
    probe = abstention_probe(loaded[2])
    abstained_greedily = 0
    for g, r in zip(greedy, ruled):
        # P(the value starts like "?") sums every such token: at least greedy's P(the "?" token)
        assert r["na_prob"] >= g["na_prob"] - 1e-6
        assert r["model_answer"] == ("?" if r["na_prob"] > 0.5 else r["span_answer"])
        # the span is never the abstention: "?" was masked where the value starts
        assert r["span_answer"] != "?"
        if g["model_answer"] != "?":  # masking changes nothing when "?" was not the greedy choice
            assert r["span_answer"] == g["model_answer"] and r["raw_output"] == g["raw_output"]
        else:
            abstained_greedily += 1
        assert r["greedy_answer"] == g["model_answer"]
        assert set(r["abstain_scores"]) == {"p_abstain", "abstain_vs_span"}
    assert abstained_greedily >= 2  # the tiny model abstains often: the masked branch was exercised
    assert probe.token in probe.abstain_ids and not set(probe.abstain_ids) & set(probe.scaffold)
    # threshold 1: never abstain; threshold 0: abstain on every question with P > 0
    never = _answer(loaded, records, abstention=("p_abstain", 1.0))
    assert all(r["model_answer"] == r["span_answer"] for r in never)
    always = _answer(loaded, records, abstention=("p_abstain", 0.0))
    assert all(r["model_answer"] == "?" for r in always)


@pytest.mark.slow
def test_null_threshold_answers_as_plain_greedy_decoding(loaded):
    """abstain_threshold: null is the article's greedy path: the raw replies are plain greedy
    decoding (no probe, no mask) and na_prob is P("?") with the JSON scaffold written for it."""
    from torchtune_blah.chat_format import chat_format
    from torchtune_blah.data.chat import answer_prompt
    from torchtune_blah.eval.run import _abstention_prob_forced
    from torchtune_blah.generation import greedy_generate

    model, pause, tokenizer = loaded
    records = load_squad_records("bundled_sample")[::30][:8]
    rows = _answer(loaded, records)
    prompts = [answer_prompt(tokenizer, r, pause.sequence) for r in records]
    plain = greedy_generate(model, prompts, pad_id=tokenizer.pad_id, stop_ids=stop_token_ids(tokenizer),
                            max_new_tokens=40, pause=pause)
    fmt, probe = chat_format(tokenizer), abstention_probe(tokenizer)
    for row, gen, prompt in zip(rows, plain, prompts):
        assert row["raw_output"] == "\n```json" + fmt.decode([t for t in gen.tokens if t not in fmt.end_ids])
        assert row["na_prob"] == pytest.approx(_abstention_prob_forced(model, prompt, probe, pause), abs=1e-5)
        assert "span_answer" not in row and "abstain_scores" not in row


@pytest.mark.slow
def test_calibrate_then_use_the_calibration(trained_run, tmp_path):
    """calibrate=true writes calibration.json with the run; abstain_threshold=calibrated and
    blah_export then use that rule and threshold."""
    import shutil

    from torchtune_blah.export import plan_export, prompt_spec
    from torchtune_blah.recipes.blah_eval import BlahEvalRecipe

    trained_run = shutil.copytree(trained_run, tmp_path / "run")  # the session's run stays uncalibrated

    def cfg(out, **extra):
        base = OmegaConf.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                           "demo_cpu_blah_eval.yaml"))
        dots = {"run_dir": trained_run, "output_dir": str(out), "batch_size": 4, **extra}
        return OmegaConf.merge(base, OmegaConf.from_dotlist([f"{k}={v}" for k, v in dots.items()]))

    recipe = BlahEvalRecipe(cfg(tmp_path / "cal", calibrate=True, **{"dataset.max_examples": 16}))
    recipe.setup()
    metrics = recipe.evaluate()
    calibration = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert json.loads(open(os.path.join(trained_run, "lora", "calibration.json")).read()) == calibration
    assert calibration["rule"] in ("p_abstain", "abstain_vs_span") and 0 <= calibration["threshold"] <= 1
    assert metrics["abstention"]["threshold"] == calibration["threshold"]
    # the rows were decided by the chosen rule, and the exact match is the best any threshold gives
    rows = [json.loads(line) for line in (tmp_path / "cal" / "predictions.jsonl").read_text().splitlines()]
    best = max(sum(r["official_exact"] for r in apply_rule(rows, calibration["rule"], t)) for t in np.linspace(0, 1, 201))
    assert sum(r["official_exact"] for r in rows) == best
    for name in ("risk_coverage.png", "na_prob_histogram.png", "review_budget.png"):
        _assert_not_blank(tmp_path / "cal" / name)
    # every row says how sure it is; the metrics say what an expert buys, as eval.routing computes it
    from torchtune_blah.eval.routing import auroc_wrong, review_budget

    assert all(0 <= r["confidence"] <= 1 for r in rows)
    assert metrics["summary"]["auroc_wrong"] == auroc_wrong(rows)
    assert metrics["review_budget"] == json.loads(json.dumps(review_budget(rows)))
    assert "| reviewed | least confident | random |" in (tmp_path / "cal" / "results.md").read_text()
    with pytest.raises(ValueError, match="expert_accuracy=1.5"):  # before any model loads
        BlahEvalRecipe(cfg(tmp_path / "bad", expert_accuracy=1.5))

    used = BlahEvalRecipe(cfg(tmp_path / "use", abstain_threshold="calibrated",
                              **{"dataset.max_examples": 8, "dataset.shuffle_seed": 5}))
    assert used._abstention == {"rule": calibration["rule"], "threshold": calibration["threshold"],
                                "source": os.path.join(trained_run, "lora", "calibration.json")}
    spec = prompt_spec(plan_export(str(trained_run), str(tmp_path / "export")))
    assert spec["abstention"]["rule"] == calibration["rule"]
    assert spec["abstention"]["threshold"] == calibration["threshold"]


@pytest.mark.slow
def test_a_calibration_of_other_weights_or_tokenizer_is_refused_before_the_model_loads(trained_run, tmp_path):
    run_cfg = OmegaConf.load(os.path.join(trained_run, "blah_config.yaml"))
    fingerprint = run_fingerprint(run_cfg, trained_run, "lora")
    path = tmp_path / "calibration.json"
    for key, what in (("weights_sha256", "other weights"), ("tokenizer_sha256", "other tokenizer"),
                      ("stage", "other stage")):
        path.write_text(json.dumps({"rule": "p_abstain", "threshold": 0.5, "prompt_style": "single_turn",
                                    "fingerprint": {**fingerprint, key: "0" * 8}}))
        with pytest.raises(ValueError, match=what):
            abstention_from_config({"abstain_threshold": "calibrated", "calibration_file": str(path)}, run_cfg,
                                   trained_run, "lora", "single_turn")
    path.write_text(json.dumps({"rule": "p_abstain", "threshold": 0.5, "prompt_style": "multi_turn",
                                "fingerprint": fingerprint}))
    with pytest.raises(ValueError, match="prompt_style=multi_turn"):
        abstention_from_config({"abstain_threshold": "calibrated", "calibration_file": str(path)}, run_cfg,
                               trained_run, "lora", "single_turn")
    with pytest.raises(ValueError, match="not found.*calibrate=true"):
        abstention_from_config({"abstain_threshold": "calibrated"}, run_cfg, trained_run, "embed", "single_turn")


@pytest.mark.slow
def test_calibrating_on_questions_without_an_unanswerable_one_fails_before_the_model_loads(trained_run, tmp_path):
    from torchtune_blah.recipes.blah_eval import BlahEvalRecipe

    answerable = [{"id": f"q{i}", "context": "Paris is in France.", "question": f"Where is Paris {i}?",
                   "answers": ["France"]} for i in range(4)]
    data = tmp_path / "answerable.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in answerable))
    base = OmegaConf.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo_cpu_blah_eval.yaml"))
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([
        f"run_dir={trained_run}", f"output_dir={tmp_path / 'out'}", "calibrate=true", "dataset.source=json",
        f"dataset.data_files={data}", "dataset.max_context_words=null"]))
    with pytest.raises(ValueError, match="no unanswerable question"):
        BlahEvalRecipe(cfg)
    assert not (tmp_path / "out").exists()


def _assert_not_blank(path):
    from PIL import Image

    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 10  # lines, bars and text, not one flat colour
    assert (image < 128).mean() > 0.005


@pytest.mark.slow
def test_two_turn_threshold_rule_reads_p_no_and_asks_for_the_span_after_a_yes(loaded):
    model, pause, tokenizer = loaded
    records = load_squad_records("bundled_sample")[::40][:8]
    yes_no = abstention_probe(tokenizer, "no", "yes")
    rows = answer_records(model, tokenizer, records, pause, prompt_style="multi_turn",
                          stop_ids=stop_token_ids(tokenizer), probe=abstention_probe(tokenizer), max_new_tokens=40,
                          abstention=("p_no", 0.5), yes_no_probe=yes_no)
    for r in rows:
        assert set(r["abstain_scores"]) == {"p_abstain", "abstain_vs_span", "p_no"}
        assert r["na_prob"] == r["abstain_scores"]["p_no"]
        assert r["model_answer"] == ("?" if r["na_prob"] > 0.5 else r["span_answer"])
        assert "greedy_answer" not in r  # the greedy path feeds its own first reply back: not this pass
        assert r["span_answer"] != "?"
