"""blah_eval end to end on a tiny model trained by the demo recipe."""

import json
import os
import shutil
import subprocess

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from torchtune_blah.data import load_squad_records, squad_chat_dataset
from torchtune_blah.eval.metrics import official_metrics, score_example
from torchtune_blah.eval.run import abstention_probe, answer_records
from torchtune_blah.generation import greedy_generate, stop_token_ids
from torchtune_blah.recipes.blah_eval import BlahEvalRecipe

pytestmark = pytest.mark.slow  # evaluations of a trained tiny run: the full suite only (python -m pytest -q)

TUNE = shutil.which("tune")
EVAL_CONFIG = os.path.join(REPO, "configs", "demo_cpu_blah_eval.yaml")


def _eval_cfg(run_dir, output_dir, **extra):
    overrides = {"run_dir": run_dir, "output_dir": str(output_dir), "dataset.max_examples": 20, "batch_size": 4,
                 **extra}
    return OmegaConf.merge(OmegaConf.load(EVAL_CONFIG), OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


def test_stop_rule_and_batching_match_one_at_a_time_decoding(loaded):
    model, pause, tokenizer = loaded
    records = load_squad_records("bundled_sample")[::40][:12]
    stops = stop_token_ids(tokenizer, [tokenizer.eot_id, tokenizer.eos_id])
    assert all("}" in tokenizer.decode([i], skip_special_tokens=False) for i in stops - {tokenizer.eot_id,
                                                                                      tokenizer.eos_id})
    probe = abstention_probe(tokenizer)
    kwargs = dict(prompt_style="single_turn", stop_ids=stops, probe=probe, max_new_tokens=40)
    batched = answer_records(model, tokenizer, records, pause, **kwargs)
    single = answer_records(model, tokenizer, records, pause, use_cache=False, **kwargs)
    assert [r["raw_output"] for r in batched] == [r["raw_output"] for r in single]
    for b, s in zip(batched, single):
        assert b["na_prob"] == pytest.approx(s["na_prob"], abs=1e-5)
    # the trained model writes the block and stops right after its "}"
    assert sum(r["raw_output"].rstrip().endswith("}") for r in batched) >= 6
    assert all(r["raw_output"].count("}") <= 1 for r in batched)
    # prompts of different lengths really were left-padded together
    from torchtune_blah.data.chat import answer_prompt

    lengths = {len(answer_prompt(tokenizer, r, pause.sequence)) for r in records}
    assert len(lengths) > 5


def test_decoding_never_emits_pause_tokens(loaded, tokenizer):
    model, pause, _ = loaded
    from torchtune_blah.pause import PauseTokens

    # Pretend some ordinary ids are pause tokens: masking must keep them out of the output.
    prompt = tokenizer.encode("Context: Normandy is in France", add_bos=True, add_eos=False)
    free = greedy_generate(model, [prompt], pad_id=tokenizer.pad_id, stop_ids=set(), max_new_tokens=8)[0].tokens
    banned = PauseTokens(ids=tuple(sorted(set(free))), names=tuple("x" * len(set(free))), num=len(set(free)),
                         mode="reserved")
    masked = greedy_generate(model, [prompt], pad_id=tokenizer.pad_id, stop_ids=set(), max_new_tokens=8,
                             pause=banned)[0].tokens
    assert not set(masked) & set(free)


@pytest.mark.parametrize("style", ["single_turn", "multi_turn"])
def test_tune_run_blah_eval_writes_every_file(trained_run, tmp_path, style):
    out = tmp_path / "eval"
    result = subprocess.run([TUNE, "run", "blah_eval", "--config", "demo_cpu_blah_eval", f"run_dir={trained_run}",
                             f"output_dir={out}", "dataset.max_examples=12", "batch_size=4",
                             f"prompt_style={style}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "official SQuAD 2.0 metrics:" in result.stdout and "% Valid JSON" in result.stdout
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    if style == "multi_turn":
        assert all("first_turn_output" in r for r in rows)
    predictions = json.loads((out / "predictions.json").read_text())
    na_probs = json.loads((out / "na_probs.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(predictions) == set(na_probs) == {r["id"] for r in rows}
    assert all(0.0 <= p <= 1.0 for p in na_probs.values())
    # The official numbers follow from predictions.json and the gold answers alone.
    records = {r.id: r for r in load_squad_records("bundled_sample")}
    recomputed = []
    for qid, prediction in predictions.items():
        golds = records[qid].answers
        answer = "?" if prediction == "" else prediction
        recomputed.append({"has_answer": bool(golds), **score_example(golds, answer)})
    assert {k: v for k, v in metrics["official"].items() if not k.startswith("best")} == official_metrics(recomputed)
    assert metrics["stage"] == "lora" and metrics["num_pause_tokens"] == 5
    assert (out / "results.md").read_text().startswith("| Model | % Valid JSON | % Exact Match |")
    queue = [json.loads(line) for line in (out / "review_queue.jsonl").read_text().splitlines()]
    assert len(queue) == 12


def test_resume_after_interruption_gives_the_same_files(trained_run, tmp_path, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    recipe = BlahEvalRecipe(_eval_cfg(trained_run, whole))
    recipe.setup()
    recipe.evaluate()

    import torchtune_blah.recipes.blah_eval as blah_eval

    real, calls = blah_eval.Answerer.answer, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(blah_eval.Answerer, "answer", dies_on_third_batch)
    recipe = BlahEvalRecipe(_eval_cfg(trained_run, resumed))
    recipe.setup()
    with pytest.raises(KeyboardInterrupt):
        recipe.evaluate()
    lines = (resumed / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8
    with open(resumed / "predictions.jsonl", "a") as f:  # a kill in the middle of a write
        f.write(lines[0][:40])
    monkeypatch.setattr(blah_eval.Answerer, "answer", real)
    recipe = BlahEvalRecipe(_eval_cfg(trained_run, resumed))
    recipe.setup()
    recipe.evaluate()
    for name in ("predictions.jsonl", "predictions.json", "na_probs.json", "metrics.json", "results.md",
                 "review_queue.jsonl", "eval_data.json"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name

    # An evaluation of an earlier version (rows without contexts and runs, llama-squad's exact match
    # named seed_exact) resumes into today's files, answering nothing again.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "eval_settings.json").write_text((whole / "eval_settings.json").read_text())
    old_rows = []
    for line in (whole / "predictions.jsonl").read_text().splitlines():
        row = {k: v for k, v in json.loads(line).items() if k not in ("title", "context", "run_dir", "stage")}
        old_rows.append(json.dumps({"seed_exact" if k == "llama_squad_exact" else k: v for k, v in row.items()}))
    (earlier / "predictions.jsonl").write_text("\n".join(old_rows) + "\n")
    def answers_nothing(*args, **kwargs):
        raise AssertionError("every question was answered already")

    monkeypatch.setattr(blah_eval.Answerer, "answer", answers_nothing)
    recipe = BlahEvalRecipe(_eval_cfg(trained_run, earlier))
    recipe.setup()
    recipe.evaluate()
    for name in ("predictions.jsonl", "predictions.json", "na_probs.json", "metrics.json", "review_queue.jsonl"):
        assert (earlier / name).read_bytes() == (whole / name).read_bytes(), name

    with pytest.raises(ValueError, match="holds an evaluation with other settings"):
        BlahEvalRecipe(_eval_cfg(trained_run, resumed, prompt_style="multi_turn")).setup()


def test_review_queue_round_trip_into_training(trained_run, tmp_path, tokenizer):
    out = tmp_path / "eval"
    recipe = BlahEvalRecipe(_eval_cfg(trained_run, out, review_queue_size=6))
    recipe.setup()
    recipe.evaluate()
    queue_file = out / "review_queue.jsonl"
    queue = [json.loads(line) for line in queue_file.read_text().splitlines()]
    assert len(queue) == 6
    keys = [(q["model_answer"] is not None, abs(q["na_prob"] - 0.5)) for q in queue]
    assert keys == sorted(keys, key=lambda k: k[0]) and keys[0][0] in (False, True)
    # an expert corrects the first proposal, then the file is training data
    queue[0]["answers"] = ["Normandy"]
    queue_file.write_text("".join(json.dumps(q) + "\n" for q in queue))
    records = load_squad_records("json", data_files=str(queue_file))
    originals = {r.id: r for r in load_squad_records("bundled_sample")}
    assert [r.id for r in records] == [q["id"] for q in queue]
    assert records[0].answers == ("Normandy",)
    assert all(r.context == originals[r.id].context and r.question == originals[r.id].question for r in records)
    dataset = squad_chat_dataset(tokenizer, source="json", data_files=str(queue_file),
                                 pause_tokens={"num": 5, "vocab_size": 1056})
    supervised = [t for t in dataset[0]["labels"] if t != -100]
    assert '"answer": "Normandy"' in tokenizer.decode(supervised)


@pytest.mark.parametrize("extra, message", [
    ({"stage": "embed", "run": "/nonexistent"}, "blah_config.yaml not found"),
    ({"prompt_style": "three_turn"}, "prompt_style must be one of"),
    ({"stage": "middle"}, "stage must be one of"),
    ({"+pause_tokens.num": 3}, r"pause_tokens.num=3 but .* was trained with num=5"),
    ({"abstain_treshold": 0.3}, r"abstain_treshold is not a blah_eval key; did you mean abstain_threshold\?"),
    ({"dataset.max_exampels": 3}, r"dataset.max_exampels is not a blah_eval key; did you mean dataset.max_examples\?"),
    ({"batch_size": "eight"}, r"batch_size: Value 'eight' of type 'str' could not be converted to Integer"),
])
def test_bad_eval_input_fails_early(trained_run, tmp_path, extra, message):
    extra = dict(extra)
    cfg = _eval_cfg(extra.pop("run", trained_run), tmp_path / "eval", **{k.lstrip("+"): v for k, v in extra.items()})
    with pytest.raises(ValueError, match=message):
        BlahEvalRecipe(cfg)


def test_stage_without_artifacts_fails_early(tmp_path, trained_run):
    run = tmp_path / "half"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "lora")
    with pytest.raises(ValueError, match="stage=lora: .* holds no finished phase"):
        BlahEvalRecipe(_eval_cfg(str(run), tmp_path / "eval", stage="lora"))
    assert BlahEvalRecipe(_eval_cfg(str(run), tmp_path / "eval2"))._stage == "embed"  # latest finished


def test_unquantized_base_and_embed_stage(trained_run, tmp_path):
    from torchao.dtypes.nf4tensor import NF4Tensor

    recipe = BlahEvalRecipe(_eval_cfg(trained_run, tmp_path / "eval", quantize_base=False, stage="embed",
                                      **{"dataset.max_examples": 4}))
    recipe.setup()
    assert not any(isinstance(p, NF4Tensor) for p in recipe._answerer.model.parameters())
    assert all(m.disabled for m in recipe._answerer.model.modules() if hasattr(m, "lora_a"))  # embed: adapters off
    metrics = recipe.evaluate()
    assert metrics["stage"] == "embed" and metrics["official"]["total"] == 4


def test_sigkill_mid_evaluation_then_rerun_gives_the_same_files(trained_run, tmp_path):
    import time

    def args(out):
        return [TUNE, "run", "blah_eval", "--config", "demo_cpu_blah_eval", f"run_dir={trained_run}",
                f"output_dir={out}", "dataset.max_examples=48", "batch_size=4"]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(args(whole), cwd=tmp_path, capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(args(killed), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = killed / "predictions.jsonl"
    deadline = time.time() + 300
    while not (predictions.exists() and len(predictions.read_text().splitlines()) >= 8):
        assert proc.poll() is None and time.time() < deadline, "finished before it could be killed"
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert not (killed / "metrics.json").exists()
    assert subprocess.run(args(killed), cwd=tmp_path, capture_output=True, timeout=600).returncode == 0
    for name in ("predictions.jsonl", "predictions.json", "na_probs.json", "metrics.json", "review_queue.jsonl"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
