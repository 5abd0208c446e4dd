"""The review server's rules under random use: a seeded random walk (three reviewers and an admin,
overlap 1 or 2) of next / decide (accept, span, no-answer, skip, with live or stale leases) / undo /
revise / resolve / lease expiry (a fake clock) / server restart / export, through the whole ASGI
app (Guard, Host check, routes, SQLite in the thread pool), checked after every step against a
plain-Python model of the rules:

- every response is the one the model expects (status and item), never a 5xx;
- the live votes are the model's: at most ``overlap`` per item, one per reviewer;
- every acknowledged decision is in the audit trail, across restarts;
- undo takes back only the caller's own latest decision;
- ``export`` writes exactly the model's final answers.

The fast tier walks a few sequences; ``-m slow`` walks 300; ``REVIEW_WALK_SEQUENCES=2000`` more.
A failure names its seed: ``REVIEW_WALK_SEED=<seed>`` replays that one sequence.
"""

import asyncio
import json
import os
import random
import types
from collections import Counter

import pytest

from torchtune_blah.eval.metrics import normalize_answer
from torchtune_blah.review import db as db_module
from torchtune_blah.review.db import ReviewDB
from torchtune_blah.review.server import create_app
from torchtune_blah.review.sources import ReviewItem

REVIEWERS = ("ana", "bo", "cy")
LEASE = 100.0
CONTEXT = "Paris is the capital of France; 東京 is Japan's 🙂 and Lyon is not a capital at all."
SPANS = [("Paris", 0), ("France", CONTEXT.index("France")), ("Lyon", CONTEXT.index("Lyon"))]


RUNNER = asyncio.Runner()  # (one event loop for every request: its worker threads are kept, as uvicorn's are)


def asgi(app, method, path, token=None, body=None):
    """One request through the ASGI app, no sockets: (status, JSON)."""
    raw = b"" if body is None else json.dumps(body).encode()
    path, _, query = path.partition("?")
    headers = [(b"host", b"127.0.0.1:8000")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if method == "POST":
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": headers, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000)}
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    out = {"body": b""}

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    RUNNER.run(app(scope, receive, send))
    return out["status"], json.loads(out["body"])


class Model:
    """The rules, in plain Python."""

    def __init__(self, items, overlap):
        self.items, self.overlap = items, overlap  # item_id -> model_answer
        self.decisions = []  # dicts: id, item, reviewer, action, answer, live
        self.leases = {}  # reviewer -> [item, token, expires]
        self.resolutions = {}
        self.now = 1_000_000.0

    def live_leases(self, item=None, but=None):
        return [r for r, (i, _, e) in self.leases.items() if e > self.now and (item is None or i == item) and r != but]

    def votes(self, item):
        """reviewer -> their vote (latest live decision) on item."""
        out = {}
        for d in self.decisions:
            if d["live"] and d["item"] == item:
                out[d["reviewer"]] = d
        return out

    def real_votes(self, item, but=None):
        return [v for r, v in self.votes(item).items() if v["action"] != "skip" and r != but]

    def eligible(self, reviewer):
        return [i for i in self.items if (self.votes(i).get(reviewer) is None or
                                          self.votes(i)[reviewer]["action"] == "skip")
                and len(self.real_votes(i)) + len(self.live_leases(i)) < self.overlap]

    def final(self, item):
        if item in self.resolutions:
            return self.resolutions[item]
        votes = self.real_votes(item)
        if len(votes) < self.overlap:
            return None
        counts = Counter(normalize_answer("" if v["answer"] == "?" else v["answer"]) for v in votes)
        answer, count = counts.most_common(1)[0]
        if count * 2 <= len(votes):
            return None
        return [v["answer"] for v in sorted(votes, key=lambda v: v["id"])
                if normalize_answer("" if v["answer"] == "?" else v["answer"]) == answer][-1]


def walk(seed, tmp_path, steps=40):
    rng = random.Random(seed)
    overlap = rng.choice((1, 2))
    path = str(tmp_path / f"walk{seed}.sqlite")
    clock = types.SimpleNamespace(time=lambda: model.now)
    db_module.time, real_time = clock, db_module.time
    try:
        db = ReviewDB(path, lease_seconds=LEASE)
        answers = ["?", "Paris", "Lyon", None, "France"]
        items = [ReviewItem(qid=f"q{n}", context=CONTEXT, question=f"Question {n}?", title="T",
                            model_answer=answers[n % len(answers)], raw_output=f"reply {n}", na_prob=0.1 * n,
                            gold_answers=None, run_dir="/r", stage="lora", source_file="/f", confidence=0.1 * n)
                 for n in range(rng.randint(2, 5))]
        db.import_items(items)
        db.set_overlap(overlap)
        tokens = {r: db.add_reviewer(r) for r in REVIEWERS}
        tokens["root"] = db.add_reviewer("root", admin=True)
        ids = {row["qid"]: i for i, row in db.items().items()}
        model = Model({ids[it.qid]: it.model_answer for it in items}, overlap)
        app = create_app(db)
        acknowledged = set()
        stale = {}
        for step in range(steps):
            who = rng.choice(REVIEWERS)
            op = rng.choices(["next", "decide", "undo", "revise", "resolve", "expire", "restart", "export"],
                             [6, 6, 2, 2, 1, 1, 1, 1])[0]
            where = f"seed {seed} (REVIEW_WALK_SEED={seed}), step {step}: {who} {op}, overlap {overlap}"
            if op == "next":
                status, got = asgi(app, "GET", "/api/next", tokens[who])
                assert status == 200, (where, got)
                held = model.leases.get(who)
                if held and held[2] > model.now:
                    assert got["item"]["item_id"] == held[0] and got["lease"] == held[1], where
                    held[2] = model.now + LEASE
                elif got["item"] is None:
                    assert model.eligible(who) == [], (where, model.eligible(who))
                    model.leases.pop(who, None)
                else:
                    assert got["item"]["item_id"] in model.eligible(who), (where, got["item"]["item_id"])
                    model.leases[who] = [got["item"]["item_id"], got["lease"], model.now + LEASE]
                    stale[who] = (got["item"]["item_id"], got["lease"])
            elif op == "decide":
                action = rng.choice(["accept", "span", "no_answer", "skip"])
                held = model.leases.get(who)
                use_stale = held is None or rng.random() < 0.15
                item, lease = (stale.get(who, (next(iter(model.items)), "made-up")) if use_stale else held[:2])
                answer, start = rng.choice(SPANS)
                status, got = asgi(app, "POST", "/api/decide", tokens[who], {
                    "item_id": item, "lease": lease, "action": action, "answer": answer, "answer_start": start})
                live = held is not None and held[0] == item and held[1] == lease and held[2] > model.now
                if not live:
                    assert status == 409, (where, status, got)
                    continue
                expected = {"accept": model.items[item], "span": answer, "no_answer": "?", "skip": None}[action]
                if action == "accept" and expected is None:
                    assert status == 422, (where, status, got)  # invalid JSON: nothing to accept
                    continue
                assert status == 200, (where, status, got)
                model.decisions.append({"id": got["decision"], "item": item, "reviewer": who, "action": action,
                                        "answer": expected, "live": True})
                acknowledged.add(got["decision"])
                del model.leases[who]
            elif op == "undo":
                status, got = asgi(app, "POST", "/api/undo", tokens[who], {})
                mine = [d for d in model.decisions if d["reviewer"] == who and d["live"]]
                if not mine:
                    assert status == 409, (where, status, got)
                    continue
                last = mine[-1]
                later = [d for d in model.decisions if d["live"] and d["item"] == last["item"] and d["id"] > last["id"]
                         and d["reviewer"] != who]
                others = len(model.live_leases(last["item"], but=who)) + len(model.real_votes(last["item"], but=who))
                if later or (last["action"] == "skip" and others >= overlap):
                    assert status == 409, (where, status, got)
                    continue
                assert status == 200 and got["item"]["item_id"] == last["item"], (where, status, got)
                last["live"] = False
                model.leases[who] = [last["item"], got["lease"], model.now + LEASE]
                stale[who] = (last["item"], got["lease"])
            elif op == "revise":
                item = rng.choice(list(model.items))
                action = rng.choice(["span", "no_answer", "skip"])
                answer, start = rng.choice(SPANS)
                status, got = asgi(app, "POST", "/api/revise", tokens[who], {
                    "item_id": item, "action": action, "answer": answer, "answer_start": start})
                vote = model.votes(item).get(who)
                others = len(model.live_leases(item, but=who)) + len(model.real_votes(item, but=who))
                if vote is None:
                    assert status == 403, (where, status, got)
                elif vote["action"] == "skip" and action != "skip" and others >= overlap:
                    assert status == 409, (where, status, got)
                else:
                    assert status == 200, (where, status, got)
                    expected = {"span": answer, "no_answer": "?", "skip": None}[action]
                    model.decisions.append({"id": got["decision"], "item": item, "reviewer": who, "action": action,
                                            "answer": expected, "live": True})
                    acknowledged.add(got["decision"])
            elif op == "resolve":
                item = rng.choice(list(model.items))
                action = rng.choice(["span", "no_answer"])
                answer, start = rng.choice(SPANS)
                status, got = asgi(app, "POST", "/api/resolve", tokens["root"], {
                    "item_id": item, "action": action, "answer": answer, "answer_start": start})
                assert status == 200, (where, status, got)
                model.resolutions[item] = answer if action == "span" else "?"
            elif op == "expire":
                model.now += LEASE + 1
            elif op == "restart":
                db = ReviewDB(path, lease_seconds=LEASE, create=False)
                app = create_app(db)
            else:
                out = str(tmp_path / f"walk{seed}.jsonl")
                db.export(out, overwrite=True)
                exported = {json.loads(line)["id"]: json.loads(line) for line in open(out)}
                qids = {i: q for q, i in ids.items()}
                expected = {qids[i]: model.final(i) for i in model.items if model.final(i) is not None}
                got = {q: r["answers"][0]["text"] if r["answers"] else "?" for q, r in exported.items()}
                assert got == expected, (where, got, expected)
            # after every step: the database's votes and leases are the model's
            votes = {}
            for item, vs in db.votes_by_item().items():
                assert len(vs) <= overlap and len({v["reviewer"] for v in vs}) == len(vs), (where, vs)
                votes[item] = sorted((v["reviewer"], v["answer"]) for v in vs)
            assert votes == {i: sorted((v["reviewer"], v["answer"]) for v in model.real_votes(i))
                             for i in model.items if model.real_votes(i)}, where
            trail = {d["id"] for d in db.decisions() if d["action"] != "undo"}
            assert acknowledged <= trail, where  # nothing acknowledged is ever lost
    finally:
        db_module.time = real_time


def _seeds(first, count):
    if os.environ.get("REVIEW_WALK_SEED"):
        return [int(os.environ["REVIEW_WALK_SEED"])]
    return range(first, first + int(os.environ.get("REVIEW_WALK_SEQUENCES", count)))


def test_a_short_random_walk_keeps_every_rule(tmp_path):
    for seed in _seeds(0, 6):
        walk(seed, tmp_path, steps=30)


@pytest.mark.slow
def test_three_hundred_random_walks_keep_every_rule(tmp_path):
    for seed in _seeds(1000, 300):
        walk(seed, tmp_path, steps=40)
