"""blah_generate: unlabeled questions in, one answer row per question out, resumable."""

import json
import os
import shutil
import subprocess
import time

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from torchtune_blah.data.squad import SquadRecordError, load_questions_jsonl, load_squad_records, question_id
from torchtune_blah.prediction import REQUIRED
from torchtune_blah.recipes.blah_eval import BlahEvalRecipe
from torchtune_blah.recipes.blah_generate import BlahGenerateRecipe

pytestmark = pytest.mark.slow  # answers from a trained tiny run: the full suite only (python -m pytest -q)

TUNE = shutil.which("tune")
GENERATE_CONFIG = os.path.join(REPO, "configs", "blah_generate.yaml")


def _cfg(run_dir, output_dir, **extra):
    overrides = {"run_dir": run_dir, "output_dir": str(output_dir), "batch_size": 4, **extra}
    return OmegaConf.merge(OmegaConf.load(GENERATE_CONFIG),
                           OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """20 dev questions without their answers; half without ids."""
    records = load_squad_records("bundled_sample")[:20]
    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(records):
            row = {"context": r.context, "question": r.question}
            if i % 2 == 0:
                row["id"] = r.id
            f.write(json.dumps(row) + "\n")
    return str(path), records


def _generate(cfg):
    recipe = BlahGenerateRecipe(cfg)
    recipe.setup()
    return recipe.generate()


def test_unlabeled_questions_get_the_answers_blah_eval_gives(trained_run, questions, tmp_path):
    path, records = questions
    # max_new_tokens as blah_eval's config: the cache length is part of the arithmetic
    rows = _generate(_cfg(trained_run, tmp_path / "gen", questions=path, max_new_tokens=48))
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert [r["id"] for r in rows[::2]] == [r.id for r in records[::2]]
    assert [r["id"] for r in rows[1::2]] == [question_id(r.context, r.question) for r in records[1::2]]
    assert rows == [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    # the same model, prompts and batches as blah_eval on the same questions: the same replies
    eval_cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", "demo_cpu_blah_eval.yaml")),
                               OmegaConf.from_dotlist([f"run_dir={trained_run}", f"output_dir={tmp_path / 'eval'}",
                                                       "dataset.max_examples=20", "dataset.shuffle_seed=null",
                                                       "batch_size=4"]))
    evaluation = BlahEvalRecipe(eval_cfg)
    evaluation.setup()
    evaluation.evaluate()
    evaluated = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [e["question"] for e in evaluated] == [r["question"] for r in rows]
    # One Prediction row: the same fields with the same values, but the scores (no gold answers here)
    for e, r in zip(evaluated, rows):
        assert {k: r[k] for k in REQUIRED if k not in ("id", "title")} == {k: e[k] for k in REQUIRED
                                                                          if k not in ("id", "title")}
        assert r["stage"] == "lora" and r["context"] and "gold_answers" not in r and "has_answer" not in r


def test_one_question_streams_with_its_explanation(trained_run, tmp_path):
    record = load_squad_records("bundled_sample")[0]
    result = subprocess.run([TUNE, "run", "blah_generate", "--config", "blah_generate", f"run_dir={trained_run}",
                             f"output_dir={tmp_path / 'one'}", f"context={json.dumps(record.context)}",
                             f"question={json.dumps(record.question)}", "explain=true", "max_explain_tokens=24"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "one" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["question"] == record.question and isinstance(rows[0]["explanation"], str)
    assert f"Question: {record.question}" in result.stdout
    assert rows[0]["raw_output"] in result.stdout  # streamed as generated
    assert "Explain your reasoning." in result.stdout and f"Answer: {rows[0]['model_answer']!r}" in result.stdout


def test_sigkill_then_rerun_gives_the_same_file(trained_run, questions, tmp_path):
    path, _ = questions

    def args(out):
        return [TUNE, "run", "blah_generate", "--config", "blah_generate", f"run_dir={trained_run}",
                f"output_dir={out}", f"questions={path}", "batch_size=2"]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = subprocess.run(args(whole), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0
    rows = [json.loads(line) for line in (whole / "generations.jsonl").read_text().splitlines()]
    assert f"{rows[3]['id']}: {rows[3]['model_answer']!r}  P(no answer)={rows[3]['na_prob']:.3f}" in result.stdout + result.stderr
    proc = subprocess.Popen(args(killed), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    output = killed / "generations.jsonl"
    deadline = time.time() + 300
    while not (output.exists() and len(output.read_text().splitlines()) >= 4):
        assert proc.poll() is None and time.time() < deadline, "finished before it could be killed"
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert len(output.read_text().splitlines()) < 20
    with open(output, "a") as f:  # as if killed in the middle of a write
        f.write('{"id": "torn')
    assert subprocess.run(args(killed), cwd=tmp_path, capture_output=True, timeout=600).returncode == 0
    assert output.read_bytes() == (whole / "generations.jsonl").read_bytes()
    with pytest.raises(ValueError, match="holds answers made with other settings"):
        BlahGenerateRecipe(_cfg(trained_run, killed, questions=path, explain=True)).setup()


def test_bad_questions_fail_before_the_model_loads(trained_run, tmp_path, monkeypatch):
    import torchtune_blah.recipes.blah_generate as blah_generate

    monkeypatch.setattr(blah_generate.Answerer, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "Paris is in France.", "question": "Where is Paris?"}\n'
                   '{"context": "Paris is in France.", "question": ""}\n')
    with pytest.raises(SquadRecordError, match=r"line 2 of .*bad.jsonl: field 'question' must be a non-empty"):
        BlahGenerateRecipe(_cfg(trained_run, tmp_path / "o", questions=str(bad)))
    bad.write_text('{"context": "Paris is in France.", "question": "Where is Paris?"}\nnot json\n')
    with pytest.raises(SquadRecordError, match="line 2 .* is not JSON"):
        load_questions_jsonl(str(bad))
    bad.write_text('{"context": "a", "question": "b"}\n{"context": "a", "question": "b"}\n')
    with pytest.raises(SquadRecordError, match="repeats line 1"):
        load_questions_jsonl(str(bad))
    with pytest.raises(ValueError, match="either questions=<file.jsonl> or both context"):
        BlahGenerateRecipe(_cfg(trained_run, tmp_path / "o", questions=str(bad), question="Where?"))
    with pytest.raises(ValueError, match="context must be a non-empty text"):
        BlahGenerateRecipe(_cfg(trained_run, tmp_path / "o", question="Where?"))
    with pytest.raises(ValueError, match="stage=middle|stage must be one of"):
        BlahGenerateRecipe(_cfg(trained_run, tmp_path / "o", question="Where?", context="Here.", stage="middle"))
    with pytest.raises(ValueError, match=r"\+question is not a blah_generate key; did you mean question\?"):
        BlahGenerateRecipe(_cfg(trained_run, tmp_path / "o", context="Here.", **{"+question": "Where?"}))
    assert not (tmp_path / "o").exists()


def test_a_threshold_rule_decides_like_blah_eval(trained_run, questions, tmp_path):
    """abstain_threshold in blah_generate: the same spans, scores and decisions as blah_eval's."""
    path, _ = questions
    rows = _generate(_cfg(trained_run, tmp_path / "gen", questions=path, abstain_threshold=0.4))
    eval_cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", "demo_cpu_blah_eval.yaml")),
                               OmegaConf.from_dotlist([f"run_dir={trained_run}", f"output_dir={tmp_path / 'eval'}",
                                                       "dataset.max_examples=20", "dataset.shuffle_seed=null",
                                                       "batch_size=4", "abstain_threshold=0.4"]))
    evaluation = BlahEvalRecipe(eval_cfg)
    evaluation.setup()
    evaluation.evaluate()
    evaluated = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["model_answer"] for r in rows] == [r["model_answer"] for r in evaluated]
    assert [r["span_answer"] for r in rows] == [r["span_answer"] for r in evaluated]
    assert all(r["model_answer"] == ("?" if r["na_prob"] > 0.4 else r["span_answer"]) for r in rows)
    with pytest.raises(ValueError, match="abstain_threshold"):
        BlahGenerateRecipe(_cfg(trained_run, tmp_path / "bad", questions=path, abstain_threshold=2))
