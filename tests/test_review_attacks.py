"""The review server under attack, and careless admins: each test reproduces one finding of the
hostile review (issue 26) and checks the refusal: a 4xx (or a clear command-line error), nothing
written, nothing frozen, never a 500 without its security headers. (Over 350 lines: one test per
finding, kept together so the list of what was tried reads in one place.)"""

import json
import os
import socket
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from review_fixtures import server, synthetic_generations  # noqa: F401  (fixtures)
from review_fixtures import http_call, leases

from torchtune_blah.review.__main__ import main as review_cli
from torchtune_blah.review.db import ReviewDB, ReviewError
from torchtune_blah.review.server import default_allowed_hosts, serve
from torchtune_blah.review.sources import SourceError, read_items

CONTEXT = "🙂 Les cafés de 東京: the Café Noir (e\u0301 with a combining accent) opened in 1923 😀 and closed in 1971."


def _raw(url, head: bytes, body_chunks=(), read_timeout=10.0):
    """Send ``head`` then ``body_chunks`` on a raw socket (stopping when the server closes);
    returns the response's status line and headers as text."""
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except OSError:  # (the server answered and closed: what we want)
                break
        answer = b""
        while b"\r\n\r\n" not in answer:
            part = s.recv(65536)
            if not part:
                break
            answer += part
    return answer.decode("latin-1")


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _item(db, context=CONTEXT, model_answer="Café Noir"):
    path = os.path.join(os.path.dirname(db.path), f"one_{abs(hash(context))}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "q-utf", "title": "Cafés", "context": context, "question": "Which café?",
                            "model_answer": model_answer, "prediction": model_answer, "na_prob": 0.25,
                            "raw_output": json.dumps({"answer": model_answer}), "run_dir": "/runs/x",
                            "stage": "lora"}, ensure_ascii=False) + "\n")
    db.import_items(read_items(path))
    return path


def test_a_chunked_body_is_refused_before_it_is_read_whatever_content_length_says(server):
    db, url, tok = server
    host = url.rsplit("/", 1)[1]
    garbage = b"x" * (1 << 20)
    before = _rss_mb()
    for token in (None, tok["ana"]):  # without a token as with one: refused before authentication
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = (f"POST /api/decide HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
                "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        chunks = [b"%x\r\n" % len(garbage) + garbage + b"\r\n"] * 100  # 100 MB if it were all read
        answer = _raw(url, head, chunks)
        assert answer.split()[1] in ("400", "411", "413"), answer[:200]
        # chunked without a Content-Length: refused the same way
        head = (f"POST /api/undo HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
                "Transfer-Encoding: chunked\r\n\r\n").encode()
        assert _raw(url, head, [b"2\r\n{}\r\n0\r\n\r\n"]).split()[1] in ("400", "411")
    assert _rss_mb() - before < 30  # (the 200 MB sent were not kept; was +400 MB)
    assert db.decisions() == []


def test_a_body_longer_than_its_content_length_is_cut_at_the_cap(server):
    db, url, tok = server
    host = url.rsplit("/", 1)[1]
    head = (f"POST /api/undo HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {tok['ana']}\r\nContent-Length: 2\r\n\r\n").encode()
    answer = _raw(url, head, [b"{}" + b" " * 10])  # the extra bytes are not a body: never parsed as one
    assert answer.split()[1] in ("200", "400", "409", "413")


def test_deep_json_is_a_400_and_the_token_is_checked_first(server):
    db, url, tok = server
    deep = b"[" * 30000 + b"]" * 30000  # under the 64 KiB cap, deeper than Python's parser goes
    assert http_call("POST", f"{url}/api/undo", raw=deep)[0] == 401
    status, answer = http_call("POST", f"{url}/api/undo", raw=deep, token=tok["ana"])
    assert status == 400 and "JSON object" in answer["error"]
    deep = b'{"a":' * 10000 + b"1" + b"}" * 10000
    assert http_call("POST", f"{url}/api/decide", raw=deep, token=tok["ana"])[0] == 400


def test_non_ascii_digits_are_400_not_500(server):
    db, url, tok = server
    from urllib.parse import quote

    for value in ("²", "١٢", "1²"):
        assert http_call("GET", f"{url}/api/item?item_id={quote(value)}", token=tok["ana"])[0] == 400
    host = url.rsplit("/", 1)[1]
    head = (f"POST /api/undo HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {tok['ana']}\r\nContent-Length: ²\r\n\r\n").encode("utf-8")
    assert _raw(url, head).split()[1] in ("400", "411")


def test_a_locked_database_is_a_503_and_never_freezes_the_server(server, tmp_path):
    db, url, tok = server
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 3)))
    db.busy_seconds = 1.5
    blocker = sqlite3.connect(db.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process writing (a backup, an export, a second server)
    got = {}
    writer = threading.Thread(target=lambda: got.update(next=http_call("GET", f"{url}/api/next", token=tok["ana"])))
    try:
        writer.start()
        time.sleep(0.3)
        start = time.time()
        assert http_call("GET", f"{url}/api/me", token=tok["bo"])[0] == 200  # a read: not held up by the writer
        assert time.time() - start < 1.0
        writer.join(10)
        status, answer = got["next"]
        assert status == 503 and "busy" in answer["error"], got
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert http_call("GET", f"{url}/api/next", token=tok["ana"])[0] == 200


def test_a_503_says_when_to_retry(server, tmp_path):
    import urllib.error
    import urllib.request

    db, url, tok = server
    db.busy_seconds = 0.2
    blocker = sqlite3.connect(db.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        request = urllib.request.Request(f"{url}/api/next", headers={"Authorization": f"Bearer {tok['ana']}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 503 and e.value.headers["Retry-After"] and e.value.headers["X-Frame-Options"] == "DENY"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_skip_revised_into_a_vote_respects_the_overlap(tmp_path):
    db = ReviewDB(str(tmp_path / "review.sqlite"))
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 2)))
    db.set_overlap(2)
    lease = db.next_item("ana")
    item = lease.item["item_id"]
    db.decide(item, lease.token, "ana", "skip")
    # with one other vote there is still a place: the skip may become a vote
    lease = db.next_item("bo")
    assert lease.item["item_id"] == item
    db.decide(item, lease.token, "bo", "no_answer")
    lease = db.next_item("cy")
    assert lease.item["item_id"] == item
    db.decide(item, lease.token, "cy", "span", answer=lease.item["context"][:5], answer_start=0)
    with pytest.raises(ReviewError, match="skipped this item and 2 other") as e:
        db.revise(item, "ana", "span", answer=lease.item["context"][:5], answer_start=0)
    assert e.value.status == 409
    votes = [v for v in db.votes_by_item()[item]]
    assert sorted(v["reviewer"] for v in votes) == ["bo", "cy"]  # still a disagreement for an admin
    # a skip with room left is revisable
    other = db.next_item("ana")
    db.decide(other.item["item_id"], other.token, "ana", "skip")
    db.revise(other.item["item_id"], "ana", "no_answer")
    assert [v["reviewer"] for v in db.votes_by_item()[other.item["item_id"]]] == ["ana"]


def test_offsets_count_code_points_on_both_sides(server, tmp_path):
    db, url, tok = server
    _item(db)
    status, got = http_call("GET", f"{url}/api/next", token=tok["ana"])
    it = got["item"]
    start, end = it["highlight"]
    assert it["context"][start:end] == "Café Noir"  # code points, as Python counts
    answer = "1923"
    status, answer_json = http_call("POST", f"{url}/api/decide", {
        "item_id": it["item_id"], "lease": got["lease"], "action": "span", "answer": answer,
        "answer_start": CONTEXT.index(answer)}, token=tok["ana"])
    assert status == 200, answer_json
    utf16 = len(CONTEXT[:CONTEXT.index(answer)].encode("utf-16-le")) // 2
    assert utf16 == CONTEXT.index(answer) + 1  # (one emoji before it: what the page used to send)
    assert db.decisions()[-1]["answer_start"] == CONTEXT.index(answer)


def test_export_since_compares_times_not_strings(tmp_path):
    db = ReviewDB(str(tmp_path / "review.sqlite"))
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 1)))
    lease = db.next_item("ana")
    db.decide(lease.item["item_id"], lease.token, "ana", "no_answer")
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    out = str(tmp_path / "c.jsonl")
    for zone, expected in ((5, 1), (-5, 1), (0, 1)):
        since = an_hour_ago.astimezone(timezone(timedelta(hours=zone))).isoformat()
        assert db.export(out, since=since, overwrite=True)["written"] == expected, since
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).astimezone(timezone(timedelta(hours=-5)))
    assert db.export(out, since=later.isoformat(), overwrite=True)["written"] == 0
    naive_utc = an_hour_ago.replace(tzinfo=None).isoformat()  # no zone: UTC
    assert db.export(out, since=naive_utc, overwrite=True)["written"] == 1
    with pytest.raises(ReviewError, match="not an ISO time"):
        db.export(out, since="yesterday", overwrite=True)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "7.5", "-0.1"])
def test_a_probability_outside_0_1_is_refused_on_import(tmp_path, value):
    path = tmp_path / "g.jsonl"
    synthetic_generations(path, 3)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"na_prob": ', f'"na_prob": {value}, "was": ', 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"line 2 .* field 'na_prob' must be a probability from 0 to 1"):
        read_items(str(path))
    db_path = str(tmp_path / "review.sqlite")
    assert review_cli(["import", "--create", "--db", db_path, str(path)]) == 2
    assert not os.path.exists(db_path)


def test_export_never_overwrites_the_database(tmp_path, capsys):
    db = ReviewDB(str(tmp_path / "review.sqlite"))
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 2)))
    before = db.items()
    for out in (db.path, db.path + "-wal", os.path.join(str(tmp_path), ".", "review.sqlite")):
        assert review_cli(["export", "--db", db.path, "--out", out, "--overwrite"]) == 2
        assert "is the review database" in capsys.readouterr().err
    assert ReviewDB(db.path, create=False).items() == before


def test_tokens_can_be_revoked_rotated_and_expire(server, tmp_path, capsys):
    db, url, tok = server
    assert http_call("GET", f"{url}/api/me", token=tok["bo"])[0] == 200
    assert review_cli(["revoke-reviewer", "--db", db.path, "bo"]) == 0
    assert "bo: token revoked" in capsys.readouterr().out
    assert http_call("GET", f"{url}/api/me", token=tok["bo"])[0] == 401  # at once
    assert review_cli(["rotate-token", "--db", db.path, "bo"]) == 0
    new = capsys.readouterr().out.split("bo: ")[1].split()[0]
    assert http_call("GET", f"{url}/api/me", token=new)[1]["name"] == "bo"
    assert http_call("GET", f"{url}/api/me", token=tok["bo"])[0] == 401  # the old one stays dead
    assert review_cli(["rotate-token", "--db", db.path, "nobody"]) == 2
    short = db.add_reviewer("dee", expires_days=0.5 / 86400)  # half a second
    assert http_call("GET", f"{url}/api/me", token=short)[0] == 200
    time.sleep(0.7)
    assert http_call("GET", f"{url}/api/me", token=short)[0] == 401
    assert review_cli(["add-reviewer", "--db", db.path, "eve", "--expires-days", "-1"]) == 2
    listed = {r["name"]: r for r in db.reviewers()}
    assert listed["bo"]["revoked_at"] is None and listed["dee"]["expires_at"] is not None
    db.revoke_reviewer("cy")
    assert db.reviewers()[2]["revoked_at"] is not None


def test_a_version_2_database_gains_token_expiry_in_place(tmp_path):
    path = str(tmp_path / "review.sqlite")
    token = ReviewDB(path).add_reviewer("ana")
    with sqlite3.connect(path) as conn:  # as version 2 wrote it
        conn.execute("ALTER TABLE reviewers DROP COLUMN expires_at")
        conn.execute("ALTER TABLE reviewers DROP COLUMN revoked_at")
        conn.execute("PRAGMA user_version = 2")
    db = ReviewDB(path, create=False)
    assert db.authenticate(token).name == "ana"


def test_bad_serve_settings_fail_before_the_server_starts(tmp_path, capsys):
    db = ReviewDB(str(tmp_path / "review.sqlite"))
    for args, message in [(["--lease-seconds", "nan"], "--lease-seconds nan"),
                          (["--lease-seconds", "-5"], "--lease-seconds -5"),
                          (["--guidelines", str(tmp_path / "nothing.md")], "--guidelines")]:
        assert review_cli(["serve", "--db", db.path, "--port", "9", *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ReviewError, match="lease_seconds"):
        ReviewDB(db.path, lease_seconds=float("nan"))
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("hello, this is not a database\n" * 100)
    for command in (["serve", "--db", str(not_sqlite)], ["stats", "--db", str(not_sqlite)]):
        assert review_cli(command) == 2
        assert "notes.txt is not a review database" in capsys.readouterr().err
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER)")
    assert review_cli(["stats", "--db", str(other)]) == 2
    assert "something else" in capsys.readouterr().err
    assert ReviewDB  # (the tables of other.sqlite were left alone)
    with sqlite3.connect(other) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["accounts"]


def test_commands_never_create_a_database_unless_told(tmp_path, capsys):
    typo = str(tmp_path / "reveiw.sqlite")
    for command in (["add-reviewer", "--db", typo, "ana"], ["reviewers", "--db", typo], ["stats", "--db", typo],
                    ["rotate-token", "--db", typo, "ana"], ["revoke-reviewer", "--db", typo, "ana"],
                    ["import", "--db", typo, synthetic_generations(tmp_path / "g.jsonl", 2)]):
        assert review_cli(command) == 2, command
        assert "does not exist" in capsys.readouterr().err
        assert not os.path.exists(typo)
    assert review_cli(["import", "--create", "--db", typo, str(tmp_path / "g.jsonl")]) == 0
    assert "created; 2 new items" in capsys.readouterr().out


def test_unreadable_inputs_are_named_not_tracebacks(tmp_path, capsys):
    from torchtune_blah.eval.abstention import load_calibration
    from torchtune_blah.resumable import check_settings

    binary = tmp_path / "predictions.jsonl"
    binary.write_bytes(b'{"id": "\xff\xfe"}\n')
    assert review_cli(["import", "--create", "--db", str(tmp_path / "r.sqlite"), str(binary)]) == 2
    assert "is not UTF-8" in capsys.readouterr().err
    queue = tmp_path / "eval" / "review_queue.jsonl"
    queue.parent.mkdir()
    synthetic_generations(queue, 2)
    (queue.parent / "eval_settings.json").write_text("{broken")
    with pytest.raises(SourceError, match="eval_settings.json .*not valid JSON"):
        read_items(str(queue))
    bad = tmp_path / "calibration.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="calibration.json .*abstention calibration.* not valid JSON"):
        load_calibration(str(bad), {}, "single_turn")
    a_file = tmp_path / "out"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="output_dir .*out is a file"):
        check_settings(str(a_file / "eval_settings.json"), {}, "an evaluation")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "eval_settings.json").write_text("[1,")
    with pytest.raises(ValueError, match="eval_settings.json .*not valid JSON"):
        check_settings(str(tmp_path / "ok" / "eval_settings.json"), {}, "an evaluation")


def test_a_wildcard_bind_answers_to_the_machine_names(server):
    hosts = default_allowed_hosts("0.0.0.0")
    assert {"127.0.0.1", "localhost", socket.gethostname()} <= set(hosts)
    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert default_allowed_hosts("10.1.2.3") == ["10.1.2.3"]


def test_refusals_and_500s_carry_the_security_headers_and_no_banner(server, monkeypatch):
    import http.client

    db, url, tok = server
    host, port = url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/api/next", headers={"Host": "evil.example"})
    response = conn.getresponse()
    assert response.status == 400 and response.getheader("Content-Security-Policy")
    assert response.getheader("X-Frame-Options") == "DENY" and response.getheader("Server") is None
    conn.close()

    def broken():
        raise RuntimeError("a bug in our code")
    monkeypatch.setattr(db, "progress", broken)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/api/progress", headers={"Authorization": f"Bearer {tok['ana']}"})
    response = conn.getresponse()
    body = response.read().decode()
    assert response.status == 500 and "Traceback" not in body and "a bug" not in body
    assert json.loads(body)["error"].startswith("internal error")
    assert response.getheader("X-Content-Type-Options") == "nosniff" and response.getheader("Server") is None
    conn.close()
    assert leases(db) == []


def test_serve_refuses_a_missing_database_without_creating_it(tmp_path):
    with pytest.raises(ReviewError, match="does not exist"):
        serve(str(tmp_path / "nothing.sqlite"))
    assert not os.path.exists(tmp_path / "nothing.sqlite")
