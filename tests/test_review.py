"""The review tool: SQLite store, import/export, the web app's API under two concurrent reviewers.
(Over 350 lines: the tool's rules end to end, on one set of fixtures; attacks and the random walk
have their own files.)"""

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
from review_fixtures import http_call as _http, leases as _leases

from torchtune_blah.data.squad import load_squad_records
from torchtune_blah.review.__main__ import main as review_cli
from torchtune_blah.review.db import SCHEMA_VERSION, ReviewDB, ReviewError
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
    assert db.progress() == {"total": 34, "reviewed": 0, "skipped": 0, "overlap": 1, "agreement": None}
    # queue order: review_queue.jsonl's order for the evaluated items, and over everything imported the
    # same key (invalid JSON first, then the least confident; the generations' rows compete too)
    queue = [json.loads(line)["id"] for line in (eval_output / "review_queue.jsonl").read_text().splitlines()]
    assert [it.qid for it in sorted(items, key=lambda it: it.priority)][:len(queue)] == queue
    everything = items + read_items(gen)
    first = db.next_item("ana")
    assert first.item["qid"] == min(everything, key=lambda it: it.priority).qid


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
    assert review_cli(["import", "--create", "--db", db_path, good, str(bad)]) == 2
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
    assert db.export(str(out)) == {"written": 1, "unresolved": [], "pending": 0}
    record = json.loads(out.read_text())
    assert record["answers"] == [{"text": context[5:15], "answer_start": 5}] and record["note"] == "by hand"
    assert load_squad_records("json", data_files=str(out))[0].answers == (context[5:15],)  # training data as is
    with pytest.raises(ReviewError, match="exists; pass --overwrite"):
        db.export(str(out))
    stamp = db.decisions()[-1]["decided_at"]
    later = db.next_item("ana")  # the skipped item comes back last; take a fresh one
    db.decide(later.item["item_id"], later.token, "ana", "no_answer")
    assert db.export(str(out), since=stamp, overwrite=True)["written"] == 1
    assert json.loads(out.read_text())["answers"] == []
    assert review_cli(["export", "--db", str(tmp_path / "review.sqlite"), "--out", str(out)]) == 2


def test_http_errors_are_4xx_and_write_nothing(server, tmp_path):
    db, url, tok = server
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 3)))
    status, got = _http("GET", f"{url}/api/next", token=tok["ana"])
    item, lease = got["item"], got["lease"]
    cases = [({"item_id": 12345}, 404, "unknown item"), ({"lease": "old"}, 409, "not leased to you"),
             ({"action": "span", "answer": "zzz", "answer_start": 0}, 422, "not the span"),
             ({"item_id": "1"}, 400, "item_id must be"), ({"item_id": 2 ** 70}, 400, "item_id must be"),
             ({"item_id": -1}, 400, "item_id must be"), ({"answer_start": 2 ** 70, "action": "span", "answer": "a"},
                                                         422, "answer_start")]
    for change, code, text in cases:
        body = {"item_id": item["item_id"], "lease": lease, "action": "no_answer", **change}
        status, answer = _http("POST", f"{url}/api/decide", body, token=tok["ana"])
        assert status == code and text in answer["error"], (change, status, answer)
    assert _http("GET", f"{url}/api/item?item_id={2 ** 70}", token=tok["ana"])[0] == 400
    assert _http("POST", f"{url}/api/undo", {}, token=tok["ana"])[0] == 409  # nothing to undo yet
    assert db.decisions() == []
    with urllib.request.urlopen(f"{url}/", timeout=10) as response:
        page, headers = response.read().decode(), response.headers
    assert "<script src=\"/static/app.js\"></script>" in page and "http" not in page.split("<body>")[1].split(
        "</main>")[0].replace("http://", "")  # no CDN
    assert 'name="viewport"' in page
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    assert _http("GET", f"{url}/api/guidelines", token=tok["bo"])[1]["text"].startswith("# Guidelines")


def test_nobody_can_act_as_someone_else(server, tmp_path):
    db, url, tok = server
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 3)))
    assert _http("GET", f"{url}/api/next")[0] == 401  # no token
    assert _http("GET", f"{url}/api/next", token="made-up")[0] == 401
    assert _http("GET", f"{url}/api/next?reviewer=bo", token=tok["ana"])[0] == 403  # another's name
    assert _leases(db) == []
    status, got = _http("GET", f"{url}/api/next", token=tok["bo"])
    body = {"item_id": got["item"]["item_id"], "lease": got["lease"], "action": "no_answer"}
    # bo's lease token is not enough: the reviewer is the Authorization token's
    assert _http("POST", f"{url}/api/decide", body, token=tok["ana"])[0] == 409
    assert _http("POST", f"{url}/api/decide", {**body, "reviewer": "bo"}, token=tok["ana"])[0] == 403
    assert _http("POST", f"{url}/api/decide", body)[0] == 401
    # admin routes need an admin
    assert _http("GET", f"{url}/api/disagreements", token=tok["ana"])[0] == 403
    assert _http("POST", f"{url}/api/resolve", {"item_id": 1, "action": "no_answer"}, token=tok["ana"])[0] == 403
    assert _http("POST", f"{url}/api/release", {}, token=tok["ana"])[0] == 403
    assert db.decisions() == [] and db.resolutions() == {}
    assert _http("POST", f"{url}/api/decide", body, token=tok["bo"])[0] == 200
    assert [d["reviewer"] for d in db.decisions()] == ["bo"]
    assert _http("GET", f"{url}/api/me", token=tok["root"])[1] == {"name": "root", "admin": True}


def test_cross_site_plain_text_wrong_host_and_huge_bodies_are_refused(server, tmp_path):
    import http.client

    db, url, tok = server
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 2)))
    status, got = _http("GET", f"{url}/api/next", token=tok["ana"])
    decide = json.dumps({"item_id": got["item"]["item_id"], "lease": got["lease"], "action": "no_answer"}).encode()
    auth = {"Authorization": f"Bearer {tok['ana']}"}
    for headers, code in [({"Content-Type": "text/plain"}, 415),  # what a cross-site form or fetch can send
                          ({"Origin": "http://evil.example"}, 403),
                          ({"Sec-Fetch-Site": "cross-site"}, 403)]:
        for route in ("decide", "undo"):
            status, answer = _http("POST", f"{url}/api/{route}", raw=decide, headers={**auth, **headers})
            assert status == code, (route, headers, status, answer)
    # DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends its own Host
    host, port = url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/api/next", headers={**auth, "Host": "evil.example"})
    assert conn.getresponse().status == 400
    conn.close()
    # 20 MB announced: refused from the headers, the body is never read
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/api/decide")
    for k, v in {**auth, "Content-Type": "application/json", "Content-Length": str(20 * 1024 * 1024)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(decide[:10])
    assert conn.getresponse().status == 413
    conn.close()
    assert db.decisions() == []
    assert _http("POST", f"{url}/api/decide", raw=decide, headers={**auth, "Origin": url})[0] == 200  # same origin


def test_undo_never_overwrites_another_reviewer_and_leases_are_bounded(server, tmp_path):
    db, url, tok = server
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 1)))
    got = _http("GET", f"{url}/api/next", token=tok["ana"])[1]
    assert _http("POST", f"{url}/api/decide", {"item_id": got["item"]["item_id"], "lease": got["lease"],
                                                "action": "skip"}, token=tok["ana"])[0] == 200
    got = _http("GET", f"{url}/api/next", token=tok["bo"])[1]  # ana skipped it: bo gets it and decides
    assert _http("POST", f"{url}/api/decide", {"item_id": got["item"]["item_id"], "lease": got["lease"],
                                                "action": "no_answer"}, token=tok["bo"])[0] == 200
    status, answer = _http("POST", f"{url}/api/undo", {}, token=tok["ana"])
    assert status == 409 and "bo decided this item after you" in answer["error"]
    assert [d["action"] for d in db.decisions()] == ["skip", "no_answer"]
    out = tmp_path / "c.jsonl"
    db.export(str(out))
    assert [(r["answers"], r["reviewer"]) for r in map(json.loads, out.read_text().splitlines())] == [([], "bo")]
    # squatting: a reviewer holds one item, however often they ask
    db.import_items(read_items(synthetic_generations(tmp_path / "more.jsonl", 20, seed=5)))
    for _ in range(30):
        assert _http("GET", f"{url}/api/next", token=tok["cy"])[0] == 200
    assert [r for _, r in _leases(db)] == ["cy"]
    assert _http("POST", f"{url}/api/release", {"holder": "cy"}, token=tok["root"])[1] == {"released": 1}


def test_two_reviewers_per_item_agreement_and_an_admin_resolution(server, tmp_path):
    db, url, tok = server
    db.set_overlap(2)
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 3)))
    a = _http("GET", f"{url}/api/next", token=tok["ana"])[1]
    b = _http("GET", f"{url}/api/next", token=tok["bo"])[1]
    c = _http("GET", f"{url}/api/next", token=tok["cy"])[1]
    assert a["item"]["item_id"] == b["item"]["item_id"] != c["item"]["item_id"]  # two leases, never a third
    item = a["item"]
    word = item["context"].split()[1]
    start = item["context"].index(word)
    span = {"action": "span", "answer": word, "answer_start": start}
    assert _http("POST", f"{url}/api/decide", {"item_id": item["item_id"], "lease": a["lease"], **span},
                 token=tok["ana"])[0] == 200
    assert _http("GET", f"{url}/api/next", token=tok["ana"])[1]["item"]["item_id"] != item["item_id"]  # never twice
    assert _http("POST", f"{url}/api/decide", {"item_id": item["item_id"], "lease": b["lease"], "action": "no_answer"},
                 token=tok["bo"])[0] == 200
    stats = _http("GET", f"{url}/api/stats", token=tok["cy"])[1]
    assert stats["disagreement"] == 1 and stats["exact_agreement"] == 0.0
    assert stats["pairs"] == [{"reviewers": ["ana", "bo"], "items": 1, "exact_agreement": 0.0,
                               "cohen_kappa_has_answer": 0.0}]
    out = tmp_path / "c.jsonl"
    assert db.export(str(out)) == {"written": 0, "unresolved": [item["qid"]], "pending": 0}
    listed = _http("GET", f"{url}/api/disagreements", token=tok["root"])[1]["items"]
    assert [(v["reviewer"], v["answer"]) for v in listed[0]["votes"]] == [("ana", word), ("bo", "?")]
    assert _http("POST", f"{url}/api/resolve", {"item_id": item["item_id"], **span}, token=tok["root"])[0] == 200
    db.export(str(out), overwrite=True)
    record = json.loads(out.read_text())
    assert record["answers"] == [{"text": word, "answer_start": start}] and record["resolution"] == "admin"
    assert record["reviewer"] == "root" and record["reviewers"] == ["ana"]
    # revise: bo changes their mind (a new row), and the history shows the latest
    assert _http("POST", f"{url}/api/revise", {"item_id": item["item_id"], **span}, token=tok["bo"])[0] == 200
    history = _http("GET", f"{url}/api/history?q={word}", token=tok["bo"])[1]["decisions"]
    assert [(h["item_id"], h["answer"]) for h in history] == [(item["item_id"], word)]
    assert _http("POST", f"{url}/api/revise", {"item_id": c["item"]["item_id"], "action": "no_answer"},
                 token=tok["bo"])[0] == 403  # not bo's decision to revise
    assert [d["action"] for d in db.decisions()] == ["span", "no_answer", "span"]


def test_the_queue_says_when_the_rest_is_leased_to_others(tmp_path):
    db = ReviewDB(str(tmp_path / "review.sqlite"))
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 1)))
    held = db.next_item("ana")
    assert db.next_item("bo") is None and db.queue_state("bo") == "leased"  # the page looks again later
    db.decide(held.item["item_id"], held.token, "ana", "no_answer")
    assert db.next_item("bo") is None and db.queue_state("bo") == "done"


def test_undoing_a_skip_never_takes_an_item_another_reviewer_holds(tmp_path):
    db = ReviewDB(str(tmp_path / "review.sqlite"))
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 1)))
    held = db.next_item("ana")
    db.decide(held.item["item_id"], held.token, "ana", "skip")
    bo = db.next_item("bo")
    with pytest.raises(ReviewError, match="others are reviewing this item now") as e:
        db.undo("ana")
    assert e.value.status == 409 and [d["action"] for d in db.decisions()] == ["skip"]
    db.release_leases("bo")
    assert db.undo("ana").item["item_id"] == bo.item["item_id"]  # free again: ana may take it back


def test_kappas_by_hand():
    from torchtune_blah.review.agreement import cohen_kappa, fleiss_kappa, item_status

    # Cohen's own kind of table: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> 0.4
    a = [True] * 25 + [False] * 25
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # with two raters Fleiss' kappa is Scott's pi: (0.7 - 0.505) / (1 - 0.505)
    assert fleiss_kappa([[x, y] for x, y in zip(a, b)]) == pytest.approx(0.195 / 0.495)
    assert fleiss_kappa([[True, True, True]] * 4) is None  # all the same: chance explains it
    votes = [{"answer": "the Normans"}, {"answer": "Normans."}, {"answer": "?"}]
    assert item_status(votes, 3)[0] == "agreed" and item_status(votes, 3)[1] is votes[1]  # normalised, latest
    assert item_status(votes[1:], 2)[0] == "disagreement" and item_status(votes[:1], 2)[0] == "pending"


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    """tests/data/review_v1.sqlite was written by the version before reviewers had tokens: two
    decisions, an undone skip (its item leased back to ana), a live lease of cy's."""
    import shutil

    path = tmp_path / "review.sqlite"
    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "review_v1.sqlite"), path)
    with sqlite3.connect(path) as conn:
        before = {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in ("decisions",)}
        items = conn.execute("SELECT id, source_key, qid, context, model_answer FROM items ORDER BY id").fetchall()
    db = ReviewDB(str(path))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert conn.execute("SELECT id, source_key, qid, context, model_answer FROM items ORDER BY id").fetchall() \
            == items
        after = conn.execute("SELECT id, item_id, reviewer, decided_at, action, answer, answer_start, note, undoes "
                             "FROM decisions ORDER BY id").fetchall()
    assert after == before["decisions"]
    assert _leases(db) == [(4, "ana"), (5, "cy")]
    assert db.next_item("ana").item["item_id"] == 4  # ana still holds the undone item
    out = tmp_path / "c.jsonl"
    db.export(str(out))
    old = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "data", "review_v1_export.jsonl"))]
    new = [json.loads(line) for line in out.read_text().splitlines()]
    keys = ("id", "title", "context", "question", "answers", "reviewer", "decided_at", "note")
    assert [{k: r.get(k) for k in keys} for r in new] == [{k: r.get(k) for k in keys} for r in old]
    ReviewDB(str(path))  # opening it again changes nothing
    assert db.decisions() == [dict(zip(("id", "item_id", "reviewer", "decided_at", "action", "answer", "answer_start",
                                         "note", "undoes", "seconds"), (*row, None))) for row in after]


def test_two_reviewers_in_parallel_never_share_an_item(server, tmp_path):
    db, url, tok = server
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 300, seed=1)))
    done = {"ana": [], "bo": []}
    errors = []

    def review(name):
        rng = random.Random(name)
        while True:
            status, got = _http("GET", f"{url}/api/next", token=tok[name])
            if status != 200:
                errors.append((name, status, got))
                return
            if got["item"] is None:
                return
            action = rng.choice(["accept", "no_answer"]) if got["item"]["highlight"] else "no_answer"
            status, answer = _http("POST", f"{url}/api/decide", {"item_id": got["item"]["item_id"],
                                                                 "lease": got["lease"], "action": action},
                                token=tok[name])
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
    assert db.export(str(corrections))["written"] == 8

    out = tmp_path / "run2"
    cfg = demo_cfg(fast_overrides(out, tiny_base, **{
        "init_from": trained_run, "tokenizer.max_seq_len": 2048, "validation": "null",
        "dataset._component_": "torchtune_blah.data.squad_chat_dataset", "dataset.source": "json",
        "dataset.data_files": str(corrections), "dataset.holdout_fraction": 0.0,
        "embed.max_steps": 2, "lora.max_steps": 2, "model.lora_dropout": 0.0}))
    recipe = BlahQLoRARecipe(cfg)
    recipe.setup(cfg)
    # each correction twice, and as many questions the previous run trained on (the configs' replay:
    # corrections_repeat 2, ratio 1)
    corrected = [json.loads(line)["id"] for line in open(corrections)]
    from torchtune_blah.data.replay import trained_records
    previous = {r.id for r in trained_records(trained_run, recipe._tokenizer)}
    ids = [r.id for r in recipe._dataset.records]
    assert ids[:16] == corrected * 2 and len(ids) == 24 and set(ids[16:]) <= previous - set(corrected)
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
