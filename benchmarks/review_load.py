"""The review server under load: N simulated reviewers working through a queue, with an export and
the stats every few seconds, against the real server (``python -m torchtune_blah.review serve``
in its own process) on 127.0.0.1. Bounded in time.

    python benchmarks/review_load.py                       # 20 reviewers, 2,000 items, at most 120 s
    python benchmarks/review_load.py --reviewers 50 --overlap 2 --seconds 60

Each reviewer: GET /api/next, "reads" for a think time (random, mean --think seconds), then POST
/api/decide (accept 55%, no answer 20%, span 15%, skip 10%); now and then GET /api/history or
POST /api/undo. Every --every seconds an admin reads GET /api/stats and a separate process runs
``review export`` (it reads the database while the server writes it). At the end: throughput,
latency per endpoint (p50, p99, max), errors (any answer but 200, except an undo the rules refuse
with 409 because another reviewer took the item one had skipped; must be 0), and whether the
final export accounts for every acknowledged decision (each reviewed question once, with the
answer its acknowledged votes give).

The last line is machine-readable: ``review_load reviewers=.. decisions_per_s=.. p99_ms=.. errors=.. lost=..``.
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "components"))

from torchtune_blah.data.squad import load_squad_records  # noqa: E402
from torchtune_blah.eval.metrics import normalize_answer  # noqa: E402
from torchtune_blah.review.db import ReviewDB  # noqa: E402


def items_file(path: str, n: int, seed: int = 0) -> None:
    """``n`` model outputs over real SQuAD 2.0 questions (the bundled pool, cycled with new ids)."""
    rng = random.Random(seed)
    records = load_squad_records("bundled_pool")
    with open(path, "w", encoding="utf-8") as f:
        for k in range(n):
            r = records[k % len(records)]
            answer = r.answers[0] if r.answers and rng.random() < 0.6 else "?"
            f.write(json.dumps({"id": f"{r.id}-{k}", "title": r.title, "context": r.context, "question": r.question,
                                "model_answer": answer, "prediction": "" if answer == "?" else answer,
                                "na_prob": rng.random(), "confidence": rng.random(),
                                "raw_output": json.dumps({"answer": answer}), "run_dir": "/runs/load",
                                "stage": "lora"}, ensure_ascii=False) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection; every call is timed and counted by endpoint."""

    def __init__(self, port, token, log):
        self.port, self.token, self.log = port, token, log
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method, path, body=None):
        raw = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}"}
        if raw is not None:
            headers.update({"Content-Type": "application/json", "Content-Length": str(len(raw))})
        start = time.perf_counter()
        for attempt in (1, 2):  # (a kept-alive connection the server closed when idle: reconnect once, as browsers do)
            try:
                self.conn.request(method, path, body=raw, headers=headers)
                response = self.conn.getresponse()
                status, data = response.status, response.read()
                break
            except (OSError, http.client.HTTPException) as e:
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                status, data = 0, json.dumps({"error": repr(e)}).encode()
                if not isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)):
                    break
        self.log(path.split("?")[0], time.perf_counter() - start, status, data)
        return status, json.loads(data) if data else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviewers", type=int, default=20)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--overlap", type=int, default=1)
    parser.add_argument("--think", type=float, default=0.2, help="mean seconds a reviewer reads an item")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between the admin's stats and exports")
    parser.add_argument("--seconds", type=float, default=120.0, help="stop after this long even if items are left")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="review_load_")
    db_path, source = os.path.join(work, "review.sqlite"), os.path.join(work, "items.jsonl")
    items_file(source, args.items, args.seed)
    cli = [sys.executable, "-m", "torchtune_blah.review"]
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(HERE), "components")}
    subprocess.run(cli + ["import", "--create", "--db", db_path, source], check=True, env=env, capture_output=True)
    db = ReviewDB(db_path, create=False)
    db.set_overlap(args.overlap)
    tokens = {f"r{k:02d}": db.add_reviewer(f"r{k:02d}") for k in range(args.reviewers)}
    admin = db.add_reviewer("admin", admin=True)
    port = free_port()
    server = subprocess.Popen(cli + ["serve", "--db", db_path, "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                print(server.stderr.read().decode(), file=sys.stderr)
                raise SystemExit("the server did not start")
            time.sleep(0.1)

    lock = threading.Lock()
    latencies, statuses, errors = defaultdict(list), defaultdict(int), []
    acknowledged = {}  # decision id -> (reviewer, item id, action, answer)
    undone = set()

    def log(endpoint, seconds, status, data):
        with lock:
            latencies[endpoint].append(seconds)
            statuses[(endpoint, status)] += 1
            refused_by_the_rules = endpoint == "/api/undo" and status == 409  # (one skipped it, another took it)
            if status != 200 and not refused_by_the_rules:
                errors.append((endpoint, status, data[:200]))

    stop_at = time.time() + args.seconds
    done = threading.Event()

    def reviewer(name, token, seed):
        rng = random.Random(seed)
        client = Client(port, token, log)
        while time.time() < stop_at:
            status, got = client.call("GET", "/api/next")
            if status != 200:
                continue
            item = got.get("item")
            if item is None:
                if got.get("state") == "done":
                    return
                time.sleep(0.5)
                continue
            time.sleep(rng.expovariate(1 / args.think) if args.think > 0 else 0)
            roll = rng.random()
            body = {"item_id": item["item_id"], "lease": got["lease"]}
            if roll < 0.55 and item["model_answer"] is not None:
                body["action"] = "accept"
            elif roll < 0.75:
                body["action"] = "no_answer"
            elif roll < 0.90:
                words = item["context"].split(" ")
                k = rng.randrange(len(words))
                body.update(action="span", answer=words[k] or "x", answer_start=len(" ".join(words[:k])) + (k > 0))
                if not words[k]:
                    body["action"] = "no_answer"
            else:
                body["action"] = "skip"
            status, answer = client.call("POST", "/api/decide", body)
            if status == 200:
                expected = {"accept": item["model_answer"], "no_answer": "?", "skip": None}.get(body["action"],
                                                                                          body.get("answer"))
                with lock:
                    acknowledged[answer["decision"]] = (name, item["item_id"], body["action"], expected)
            if rng.random() < 0.05:
                client.call("GET", "/api/history?q=the")
            if rng.random() < 0.02:
                status, got = client.call("POST", "/api/undo", {})
                if status == 200:
                    with lock:
                        mine = [d for d, v in acknowledged.items() if v[0] == name and d not in undone]
                        undone.add(max(mine))
                    # decide the undone item again at once (it is leased back to us)
                    again = {"item_id": got["item"]["item_id"], "lease": got["lease"], "action": "no_answer"}
                    status, answer = client.call("POST", "/api/decide", again)
                    if status == 200:
                        with lock:
                            acknowledged[answer["decision"]] = (name, got["item"]["item_id"], "no_answer", "?")

    export_seconds = []

    def admin_loop():
        client = Client(port, admin, log)
        n = 0
        while not done.is_set():
            client.call("GET", "/api/stats")
            start = time.perf_counter()
            out = os.path.join(work, f"export{n % 2}.jsonl")
            result = subprocess.run(cli + ["export", "--db", db_path, "--out", out, "--overwrite"], env=env,
                                    capture_output=True, text=True)
            export_seconds.append(time.perf_counter() - start)
            if result.returncode != 0:
                with lock:
                    errors.append(("export", result.returncode, result.stderr[-200:]))
            n += 1
            done.wait(args.every)

    started = time.time()
    threads = [threading.Thread(target=reviewer, args=(name, token, args.seed * 1000 + k))
               for k, (name, token) in enumerate(tokens.items())]
    watcher = threading.Thread(target=admin_loop)
    for t in threads + [watcher]:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    done.set()
    watcher.join()
    server.terminate()
    server.wait(30)

    # Accounting: every acknowledged decision is in the audit trail, and the export holds exactly
    # the questions whose acknowledged live votes are final, with that answer.
    trail = {d["id"]: d for d in db.decisions()}
    lost = [d for d in acknowledged if d not in trail]
    final = os.path.join(work, "final.jsonl")
    db.export(final, overwrite=True)
    exported = {json.loads(line)["id"]: json.loads(line) for line in open(final, encoding="utf-8")}
    qid = {i: row["qid"] for i, row in db.items().items()}
    votes = {}  # (reviewer, item) -> their latest live decision: (id, action, answer)
    for d, (name, item, action, answer) in sorted(acknowledged.items()):
        if d not in undone:
            votes[(name, item)] = (d, action, answer)
    by_item = defaultdict(list)
    for (name, item), (d, action, answer) in votes.items():
        if action != "skip":
            by_item[item].append((d, answer))
    expected = {}
    for item, answers in by_item.items():  # the majority rule (review.agreement), in plain words
        groups = defaultdict(list)
        for d, answer in sorted(answers):
            groups[normalize_answer("" if answer == "?" else answer)].append(answer)
        top = max(groups.values(), key=len)
        if len(answers) >= args.overlap and 2 * len(top) > len(answers):
            expected[qid[item]] = top[-1]
    got = {q: (r["answers"][0]["text"] if r["answers"] else "?") for q, r in exported.items()}
    mismatched = sorted(q for q in expected if got.get(q) != expected[q])
    extra = sorted(set(got) - set(expected))
    decisions = len(acknowledged)

    def ms(values, q):
        values = sorted(values)
        return 1000 * values[min(len(values) - 1, int(q * len(values)))]

    print(f"review_load: {args.reviewers} reviewers, {args.items} items, overlap {args.overlap}, think "
          f"{args.think:g} s (mean), {elapsed:.1f} s; server: python -m torchtune_blah.review serve (uvicorn, SQLite "
          f"WAL); {len(export_seconds)} exports (median {statistics.median(export_seconds or [0]):.2f} s) and stats "
          "calls alongside\n")
    print("| endpoint | requests | p50 ms | p99 ms | max ms | non-200 |")
    print("|---|---:|---:|---:|---:|---:|")
    for endpoint in sorted(latencies):
        values = latencies[endpoint]
        bad = sum(n for (e, s), n in statuses.items() if e == endpoint and s != 200)
        print(f"| {endpoint} | {len(values)} | {ms(values, 0.5):.1f} | {ms(values, 0.99):.1f} | "
              f"{1000 * max(values):.1f} | {bad} |")
    progress = db.progress()
    print(f"\n{decisions} decisions acknowledged ({decisions / elapsed:.1f}/s), {len(undone)} undone; "
          f"{progress['reviewed']} of {progress['total']} items reviewed; export: {len(got)} questions, "
          f"{len(expected)} expected, {len(mismatched)} with another answer, {len(extra)} unexpected; "
          f"{len(lost)} acknowledged decisions missing from the audit trail")
    for e in errors[:10]:
        print("error:", e)
    all_ms = [v for values in latencies.values() for v in values]
    print(f"review_load reviewers={args.reviewers} items={args.items} overlap={args.overlap} "
          f"decisions_per_s={decisions / elapsed:.1f} p50_ms={ms(all_ms, 0.5):.1f} p99_ms={ms(all_ms, 0.99):.1f} "
          f"errors={len(errors)} lost={len(lost) + len(mismatched) + len(extra)}")
    return 0 if not errors and not lost and not mismatched and not extra else 1


if __name__ == "__main__":
    sys.exit(main())
