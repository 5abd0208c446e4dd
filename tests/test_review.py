"""The review tool: SQLite store, import/export, the web app's API under two concurrent reviewers."""

import json
import os
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest

from review_fixtures import eval_output, server, synthetic_generations  # noqa: F401  (fixtures)

from torchtune_blah.data.squad import load_squad_records
from torchtune_blah.review.__main__ import main as review_cli
from torchtune_blah.review.db import ReviewDB, ReviewError
from torchtune_blah.review.sources import SourceError, read_items


@pytest.mark.slow
def test_import_reads_every_source_once(eval_output, tmp_path):
    db = ReviewDB(str(tmp_path / "review.sqlite"))
    items = read_items(str(eval_output / "predictions.jsonl"))
    assert len(items) == 24 and all(it.context and it.run_dir and it.stage == "lora" for it in items)
    assert db.import_items(items) == 24
    assert db.import_items(read_items(str(eval_output / "predictions.jsonl"))) == 0  # twice: nothing twice
    # review_queue.jsonl holds the same model outputs: nothing new either
    assert db.import_items(read_items(str(eval_output / "review_queue.jsonl"))) == 0
    gen = synthetic_generations(tmp_path / "generations.jsonl", 10)
    assert db.import_items(read_items(gen)) == 10
    assert db.progress() == {"total": 34, "reviewed": 0, "skipped": 0, "agreement": None}
    # queue order: review_queue.jsonl's order for the evaluated items
    queue = [json.loads(line)["id"] for line in (eval_output / "review_queue.jsonl").read_text().splitlines()]
    first = db.next_item("ana")
    assert first.item["qid"] == queue[0] or first.item["qid"] in queue[:3]


@pytest.mark.slow
def test_bad_imports_write_nothing(eval_output, tmp_path, capsys):
    db_path = str(tmp_path / "review.sqlite")
    good = str(eval_output / "predictions.jsonl")
    bad = tmp_path / "generations.jsonl"
    synthetic_generations(bad, 5)
    lines = bad.read_text().splitlines()
    row = json.loads(lines[3])
    del row["question"]
    lines[3] = json.dumps(row)
    bad.write_text("\n".join(lines) + "\n")
    assert review_cli(["import", "--db", db_path, good, str(bad)]) == 2
    assert "line 4 of" in capsys.readouterr().err and "missing field 'question'" in str(
        pytest.raises(SourceError, read_items, str(bad)).value)
    assert not os.path.exists(db_path) or ReviewDB(db_path).progress()["total"] == 0
    lines[3] = json.dumps({**row, "question": "q", "na_prob": "high"})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match="line 4 .* field 'na_prob' must be a number"):
        read_items(str(bad))
    bad.write_text("\n".join(lines[:2]) + "\n{not json\n")
    with pytest.raises(SourceError, match="line 3 .* is not JSON"):
        read_items(str(bad))
    # predictions.jsonl stands alone (its rows carry their contexts)
    lonely = tmp_path / "lonely" / "predictions.jsonl"
    lonely.parent.mkdir()
    lonely.write_text((eval_output / "predictions.jsonl").read_text())
    assert [it.source_key for it in read_items(str(lonely))] == [it.source_key for it in read_items(good)]


def _earlier_version(row, drop=(), renames=()):
    row = {dict(renames).get(k, k): v for k, v in row.items() if k not in drop}
    return json.dumps(row) + "\n"


@pytest.mark.slow
def test_files_of_earlier_versions_import_as_the_same_items(eval_output, tmp_path):
    """review_queue.jsonl once named the reply model_output and no run (eval_settings.json beside it
    did); generations.jsonl named the parsed answer `answer`; predictions.jsonl had no contexts."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "eval_settings.json").write_text((eval_output / "eval_settings.json").read_text())
    queue = [json.loads(line) for line in (eval_output / "review_queue.jsonl").read_text().splitlines()]
    (old / "review_queue.jsonl").write_text("".join(
        _earlier_version(r, drop=("run_dir", "stage", "gold_answers"), renames={"raw_output": "model_output"}.items())
        for r in queue))
    today = read_items(str(eval_output / "review_queue.jsonl"))
    assert [(it.source_key, it.model_answer, it.run_dir, it.stage) for it in read_items(str(old / "review_queue.jsonl"))] \
        == [(it.source_key, it.model_answer, it.run_dir, it.stage) for it in today]
    gen = synthetic_generations(tmp_path / "generations.jsonl", 4)
    rows = [json.loads(line) for line in open(gen)]
    (old / "generations.jsonl").write_text("".join(_earlier_version(r, renames={"model_answer": "answer"}.items())
                                                   for r in rows))
    assert read_items(str(old / "generations.jsonl")) == [
        it.__class__(**{**it.__dict__, "source_file": str(old / "generations.jsonl")}) for it in read_items(gen)]
    predictions = [json.loads(line) for line in (eval_output / "predictions.jsonl").read_text().splitlines()]
    (old / "predictions.jsonl").write_text("".join(_earlier_version(r, drop=("title", "context")) for r in predictions))
    with pytest.raises(SourceError, match="line 1 .*earlier blah_eval, without its context; rerun blah_eval"):
        read_items(str(old / "predictions.jsonl"))


def test_a_newer_schema_is_refused_untouched(tmp_path):
    path = str(tmp_path / "review.sqlite")
    ReviewDB(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    before = open(path, "rb").read()
    with pytest.raises(ReviewError, match="schema version 7, newer"):
        ReviewDB(path)
    assert open(path, "rb").read() == before


def test_decisions_undo_and_export(tmp_path):
    db = ReviewDB(str(tmp_path / "review.sqlite"))
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 6)))
    held = db.next_item("ana")
    item = held.item
    assert db.next_item("ana").item["item_id"] == item["item_id"]  # a reload gives the same item
    context = item["context"]
    # refused, nothing written: wrong lease, unknown item, a span that is not in the context
    for kwargs, status in [({"lease_token": "stale"}, 409), ({"item_id": 999}, 404),
                           ({"action": "span", "answer": "not in there at all", "answer_start": 0}, 422),
                           ({"action": "span", "answer": context[5:15], "answer_start": 6}, 422),
                           ({"action": "maybe"}, 400)]:
        args = {"item_id": item["item_id"], "lease_token": held.token, "reviewer": "ana", "action": "accept", **kwargs}
        with pytest.raises(ReviewError) as e:
            db.decide(args.pop("item_id"), args.pop("lease_token"), **args)
        assert e.value.status == status
    assert db.decisions() == []
    db.decide(item["item_id"], held.token, "ana", "span", answer=context[5:15], answer_start=5, note="by hand")
    second = db.next_item("ana")
    db.decide(second.item["item_id"], second.token, "ana", "no_answer")
    undone = db.undo("ana")  # the no-answer decision is undone: that item is back with ana
    assert undone.item["item_id"] == second.item["item_id"]
    assert db.next_item("bo").item["item_id"] not in (item["item_id"], second.item["item_id"])
    db.decide(undone.item["item_id"], undone.token, "ana", "skip")
    assert [d["action"] for d in db.decisions()] == ["span", "no_answer", "undo", "skip"]
    assert db.progress()["reviewed"] == 1 and db.progress()["skipped"] == 1
    out = tmp_path / "corrections.jsonl"
    assert db.export(str(out)) == 1
    record = json.loads(out.read_text())
    assert record["answers"] == [{"text": context[5:15], "answer_start": 5}] and record["note"] == "by hand"
    assert load_squad_records("json", data_files=str(out))[0].answers == (context[5:15],)  # training data as is
    with pytest.raises(ReviewError, match="exists; pass --overwrite"):
        db.export(str(out))
    stamp = db.decisions()[-1]["decided_at"]
    later = db.next_item("ana")  # the skipped item comes back last; take a fresh one
    db.decide(later.item["item_id"], later.token, "ana", "no_answer")
    assert db.export(str(out), since=stamp, overwrite=True) == 1
    assert json.loads(out.read_text())["answers"] == []
    assert review_cli(["export", "--db", str(tmp_path / "review.sqlite"), "--out", str(out)]) == 2


def _http(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_errors_are_4xx_and_write_nothing(server, tmp_path):
    db, url = server
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 3)))
    status, got = _http("GET", f"{url}/api/next?reviewer=ana")
    item, lease = got["item"], got["lease"]
    cases = [({"item_id": 12345}, 404, "unknown item"), ({"lease": "old"}, 409, "not leased to you"),
             ({"action": "span", "answer": "zzz", "answer_start": 0}, 422, "not the span"),
             ({"reviewer": ""}, 400, "reviewer must be a name"), ({"item_id": "1"}, 400, "item_id must be")]
    for change, code, text in cases:
        body = {"item_id": item["item_id"], "lease": lease, "reviewer": "ana", "action": "no_answer", **change}
        status, answer = _http("POST", f"{url}/api/decide", body)
        assert status == code and text in answer["error"], (change, status, answer)
    assert _http("POST", f"{url}/api/undo", {"reviewer": "ana"})[0] == 409  # nothing to undo yet
    assert db.decisions() == []
    status, page = 0, urllib.request.urlopen(f"{url}/", timeout=10).read().decode()
    assert "<script src=\"/static/app.js\"></script>" in page and "http" not in page.split("<body>")[1].split(
        "</main>")[0].replace("http://", "")  # no CDN


def test_two_reviewers_in_parallel_never_share_an_item(server, tmp_path):
    db, url = server
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 300, seed=1)))
    done = {"ana": [], "bo": []}
    errors = []

    def review(name):
        rng = random.Random(name)
        while True:
            status, got = _http("GET", f"{url}/api/next?reviewer={name}")
            if status != 200:
                errors.append((name, status, got))
                return
            if got["item"] is None:
                return
            action = rng.choice(["accept", "no_answer"]) if got["item"]["highlight"] else "no_answer"
            status, answer = _http("POST", f"{url}/api/decide", {"item_id": got["item"]["item_id"],
                                                                 "lease": got["lease"], "reviewer": name,
                                                                 "action": action})
            if status != 200:
                errors.append((name, status, answer))
                return
            done[name].append(got["item"]["item_id"])

    threads = [threading.Thread(target=review, args=(n,)) for n in done]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert len(done["ana"]) > 50 and len(done["bo"]) > 50  # both really worked in parallel
    assert not set(done["ana"]) & set(done["bo"])  # no item under two leases
    assert sorted(done["ana"] + done["bo"]) == list(range(1, 301))  # none lost, none twice
    decisions = db.decisions()
    assert len(decisions) == 300 and {d["item_id"] for d in decisions} == set(range(1, 301))
    assert sum(d["reviewer"] == "ana" for d in decisions) == len(done["ana"])
    assert db.progress()["reviewed"] == 300


@pytest.mark.slow
def test_the_cycle_retrains_from_the_previous_run_on_exported_corrections(trained_run, eval_output, tmp_path,
                                                                           tiny_base):
    """evaluate -> import -> review -> export -> blah_qlora init_from=<previous run> on the corrections."""
    import torch

    from conftest import demo_cfg, fast_overrides
    from torchtune_blah.pause import read_pause_embeddings
    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    db = ReviewDB(str(tmp_path / "review.sqlite"))
    db.import_items(read_items(str(eval_output / "predictions.jsonl")))
    for i in range(8):
        lease = db.next_item("ana")
        context = lease.item["context"]
        if i % 2:
            db.decide(lease.item["item_id"], lease.token, "ana", "no_answer")
        else:
            start = context.index(" ") + 1
            db.decide(lease.item["item_id"], lease.token, "ana", "span", answer=context[start:start + 12].strip(),
                      answer_start=start)
    corrections = tmp_path / "corrections.jsonl"
    assert db.export(str(corrections)) == 8

    out = tmp_path / "run2"
    cfg = demo_cfg(fast_overrides(out, tiny_base, **{
        "init_from": trained_run, "tokenizer.max_seq_len": 2048, "validation": "null",
        "dataset._component_": "torchtune_blah.data.squad_chat_dataset", "dataset.source": "json",
        "dataset.data_files": str(corrections), "dataset.holdout_fraction": 0.0,
        "embed.max_steps": 2, "lora.max_steps": 2, "model.lora_dropout": 0.0}))
    recipe = BlahQLoRARecipe(cfg)
    recipe.setup(cfg)
    assert sorted(r.id for r in recipe._dataset.records) == sorted(json.loads(l)["id"] for l in open(corrections))
    # step 0: the previous run's pause rows and adapter, bit for bit
    previous_rows, _ = read_pause_embeddings(os.path.join(trained_run, "lora"))
    assert torch.equal(recipe._pause_module.pause_weight.detach(), previous_rows)
    previous_adapter = torch.load(os.path.join(trained_run, "lora", "adapter_model.pt"), weights_only=True)
    params = dict(recipe._model.named_parameters())
    assert previous_adapter and all(torch.equal(params[k].detach(), v) for k, v in previous_adapter.items())
    recipe.train()
    recipe.cleanup()
    new_rows, _ = read_pause_embeddings(str(out / "lora"))
    assert not torch.equal(new_rows, previous_rows)  # the embed phase trained them further
    new_adapter = torch.load(out / "lora" / "adapter_model.pt", weights_only=True)
    assert any(not torch.equal(new_adapter[k], v) for k, v in previous_adapter.items())


@pytest.mark.slow
def test_init_from_mistakes_fail_before_weights_load(trained_run, tmp_path, tiny_base):
    from conftest import demo_cfg, fast_overrides
    from torchtune_blah.recipe_config import ConfigError
    from torchtune_blah.recipes.blah_qlora import BlahQLoRARecipe

    for extra, message in [({"init_from": str(tmp_path)}, "blah_config.yaml not found"),
                           ({"init_from": trained_run, "pause_tokens.num": 3}, "init_from: .* does not match"),
                           ({"init_from": trained_run, "model.lora_rank": 4}, "adapter with r=8 but model.lora_rank=4"),
                           ({"init_from": trained_run, "phases": "[lora]",
                             "pause_embeddings_path": os.path.join(trained_run, "embed")}, "both give the pause rows")]:
        with pytest.raises(ConfigError, match=message):
            BlahQLoRARecipe(demo_cfg(fast_overrides(tmp_path / "o", tiny_base, **extra)))


def test_an_expired_lease_is_refused_and_the_item_goes_to_the_next_reviewer(tmp_path):
    db = ReviewDB(str(tmp_path / "review.sqlite"), lease_seconds=0.3)
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 2)))
    held = db.next_item("ana")
    assert db.next_item("bo").item["item_id"] != held.item["item_id"]  # held: bo gets the other one
    time.sleep(0.4)
    with pytest.raises(ReviewError, match="not leased to you|expired") as e:
        db.decide(held.item["item_id"], held.token, "ana", "no_answer")
    assert e.value.status == 409 and db.decisions() == []
    taken = db.next_item("cy")  # both leases ran out: the first item in the queue is free again
    assert taken.item["item_id"] == held.item["item_id"]
