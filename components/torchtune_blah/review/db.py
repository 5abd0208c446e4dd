"""The review database: SQLite (stdlib ``sqlite3``), WAL mode, one file.

Tables:

- ``items``: one model output to review (question, context, the model's answer, raw output,
  abstention probability, the run/stage/file it came from), its queue priority, and its lease
  (who holds it, until when). Importing the same output twice adds nothing (``source_key``).
- ``decisions``: the audit trail, append-only. Every accept / no-answer / span / skip is a row
  with reviewer and time; an undo is a row that names the decision it undoes. An item's
  *effective* decision is its latest decision that is neither an undo nor undone.

Every write is one ``BEGIN IMMEDIATE`` transaction, so concurrent reviewers (threads of the web
app, or several processes) never interleave: two reviewers never lease the same item, and a
decision is written only by the holder of a live lease.
"""

import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional

from torchtune_blah.checkpointing import atomic_text
from torchtune_blah.review.sources import ReviewItem

SCHEMA_VERSION = 1
ACTIONS = ("accept", "no_answer", "span", "skip")
REVIEWED = ("accept", "no_answer", "span")
NO_ANSWER = "?"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    source_key TEXT NOT NULL UNIQUE,
    qid TEXT NOT NULL,
    title TEXT NOT NULL,
    context TEXT NOT NULL,
    question TEXT NOT NULL,
    model_answer TEXT,
    raw_output TEXT NOT NULL,
    na_prob REAL NOT NULL,
    gold_answers TEXT,
    run_dir TEXT NOT NULL,
    stage TEXT NOT NULL,
    source_file TEXT NOT NULL,
    imported_at TEXT NOT NULL,
    p_valid INTEGER NOT NULL,
    p_agrees INTEGER NOT NULL,
    p_distance REAL NOT NULL,
    lease_token TEXT,
    lease_reviewer TEXT,
    lease_expires REAL
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL REFERENCES items(id),
    reviewer TEXT NOT NULL,
    decided_at TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('accept', 'no_answer', 'span', 'skip', 'undo')),
    answer TEXT,
    answer_start INTEGER,
    note TEXT,
    undoes INTEGER UNIQUE REFERENCES decisions(id)
);
CREATE INDEX IF NOT EXISTS decisions_item ON decisions(item_id);
CREATE INDEX IF NOT EXISTS items_queue ON items(p_valid, p_agrees, p_distance, id);
CREATE VIEW IF NOT EXISTS live_decisions AS
    SELECT d.* FROM decisions d
    WHERE d.action != 'undo' AND NOT EXISTS (SELECT 1 FROM decisions u WHERE u.undoes = d.id);
CREATE VIEW IF NOT EXISTS effective AS
    SELECT l.* FROM live_decisions l
    WHERE l.id = (SELECT MAX(l2.id) FROM live_decisions l2 WHERE l2.item_id = l.item_id);
"""


class ReviewError(ValueError):
    """A request the database refuses; ``status`` is the HTTP status the web app answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class Lease:
    item: Dict[str, Any]
    token: str
    expires: float


class ReviewDB:
    """One review database file. Safe to use from many threads and processes: every call opens
    its own connection."""

    def __init__(self, path: str, lease_seconds: float = 600.0, create: bool = True):
        self.path = path
        self.lease_seconds = float(lease_seconds)
        if not create and not os.path.isfile(path):
            raise ReviewError(f"{path} does not exist; import a file first (python -m torchtune_blah.review import)")
        with self._connection() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ReviewError(f"{path} has schema version {version}, newer than this torchtune-blah's "
                                  f"{SCHEMA_VERSION}: upgrade torchtune-blah to open it (nothing was changed)")
            conn.execute("PRAGMA journal_mode=WAL")
            if version < SCHEMA_VERSION:  # IF NOT EXISTS everywhere: two processes creating it at once is fine
                conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed on success, rolled back on any error."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ------------------------------------------------------------------ import

    def import_items(self, items: List[ReviewItem]) -> int:
        """Add ``items`` in one transaction; those already imported are left alone. Returns how many were new."""
        stamp = now_iso()
        with self._write() as conn:
            before = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            for it in items:
                valid, agrees, distance = it.priority
                conn.execute(
                    "INSERT OR IGNORE INTO items (source_key, qid, title, context, question, model_answer, raw_output, "
                    "na_prob, gold_answers, run_dir, stage, source_file, imported_at, p_valid, p_agrees, p_distance) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (it.source_key, it.qid, it.title, it.context, it.question, it.model_answer, it.raw_output,
                     it.na_prob, None if it.gold_answers is None else json.dumps(it.gold_answers), it.run_dir,
                     it.stage, it.source_file, stamp, valid, agrees, distance))
            return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] - before

    # ------------------------------------------------------------------ queue and leases

    def next_item(self, reviewer: str) -> Optional[Lease]:
        """The item this reviewer holds, else the first unreviewed item nobody holds (leased to
        them for ``lease_seconds``); None when the queue is empty. Skipped items come last."""
        reviewer = _reviewer(reviewer)
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT * FROM items WHERE lease_reviewer = ? AND lease_expires > ? ORDER BY id LIMIT 1",
                (reviewer, now)).fetchone()
            held = row is not None
            if row is None:
                row = conn.execute(
                    "SELECT i.* FROM items i LEFT JOIN effective e ON e.item_id = i.id "
                    "WHERE (e.action IS NULL OR e.action = 'skip') AND (i.lease_expires IS NULL OR i.lease_expires <= ?) "
                    "ORDER BY (e.action IS NOT NULL), i.p_valid, i.p_agrees, i.p_distance, i.id LIMIT 1",
                    (now,)).fetchone()
            if row is None:
                return None
            # A reload keeps the reviewer's lease (same token), renewed.
            token, expires = row["lease_token"] if held else uuid.uuid4().hex, now + self.lease_seconds
            conn.execute("UPDATE items SET lease_token = ?, lease_reviewer = ?, lease_expires = ? WHERE id = ?",
                         (token, reviewer, expires, row["id"]))
            return Lease(item=_item_view(row), token=token, expires=expires)

    def decide(self, item_id: int, lease_token: str, reviewer: str, action: str, answer: Optional[str] = None,
               answer_start: Optional[int] = None, note: Optional[str] = None) -> int:
        """Record a decision on a leased item; returns the decision id. Raises ``ReviewError``
        (nothing written) for an unknown item (404), a lease that is not the caller's or has
        expired (409), or an answer that is not a span of the context (422)."""
        reviewer = _reviewer(reviewer)
        if action not in ACTIONS:
            raise ReviewError(f"action must be one of {ACTIONS}, got {action!r}")
        if note is not None and (not isinstance(note, str) or len(note) > 4000):
            raise ReviewError("note must be a text of at most 4000 characters")
        with self._write() as conn:
            row = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise ReviewError(f"unknown item {item_id!r}", 404)
            if row["lease_token"] != lease_token or row["lease_reviewer"] != reviewer:
                raise ReviewError(f"item {item_id} is not leased to you (any more): reload to get your next item", 409)
            if row["lease_expires"] is None or row["lease_expires"] <= time.time():
                raise ReviewError(f"your lease on item {item_id} expired: reload to get your next item", 409)
            answer, answer_start = _checked_answer(row, action, answer, answer_start)
            cursor = conn.execute(
                "INSERT INTO decisions (item_id, reviewer, decided_at, action, answer, answer_start, note) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (item_id, reviewer, now_iso(), action, answer, answer_start,
                                                 note or None))
            conn.execute("UPDATE items SET lease_token = NULL, lease_reviewer = NULL, lease_expires = NULL "
                         "WHERE id = ?", (item_id,))
            return cursor.lastrowid

    def undo(self, reviewer: str) -> Lease:
        """Undo this reviewer's last live decision (an appended ``undo`` row) and lease its item
        back to them. 409 when there is nothing to undo, or the item is held by someone else."""
        reviewer = _reviewer(reviewer)
        now = time.time()
        with self._write() as conn:
            last = conn.execute("SELECT * FROM live_decisions WHERE reviewer = ? ORDER BY id DESC LIMIT 1",
                                (reviewer,)).fetchone()
            if last is None:
                raise ReviewError("nothing to undo", 409)
            row = conn.execute("SELECT * FROM items WHERE id = ?", (last["item_id"],)).fetchone()
            if row["lease_reviewer"] not in (None, reviewer) and row["lease_expires"] > now:
                raise ReviewError(f"item {row['id']} is being reviewed by {row['lease_reviewer']}; try again later",
                                  409)
            conn.execute("INSERT INTO decisions (item_id, reviewer, decided_at, action, undoes) VALUES (?, ?, ?, ?, ?)",
                         (last["item_id"], reviewer, now_iso(), "undo", last["id"]))
            # Give back whatever else the reviewer held, then lease them the undone item.
            conn.execute("UPDATE items SET lease_token = NULL, lease_reviewer = NULL, lease_expires = NULL "
                         "WHERE lease_reviewer = ?", (reviewer,))
            token, expires = uuid.uuid4().hex, now + self.lease_seconds
            conn.execute("UPDATE items SET lease_token = ?, lease_reviewer = ?, lease_expires = ? WHERE id = ?",
                         (token, reviewer, expires, row["id"]))
            return Lease(item=_item_view(row), token=token, expires=expires)

    # ------------------------------------------------------------------ reading

    def progress(self) -> Dict[str, Any]:
        """Items, reviewed items, and how often the reviewers agreed with the model."""
        with self._connection() as conn:
            total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            rows = conn.execute("SELECT e.action, e.answer, i.model_answer FROM effective e JOIN items i "
                                "ON i.id = e.item_id WHERE e.action != 'skip'").fetchall()
            skipped = conn.execute("SELECT COUNT(*) FROM effective WHERE action = 'skip'").fetchone()[0]
        agreed = sum(_decided_answer(r["action"], r["answer"]) == r["model_answer"] for r in rows)
        return {"total": total, "reviewed": len(rows), "skipped": skipped,
                "agreement": agreed / len(rows) if rows else None}

    def decisions(self) -> List[Dict[str, Any]]:
        """The whole audit trail, in order."""
        with self._connection() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM decisions ORDER BY id")]

    def corrections(self, since: Optional[str] = None) -> List[Dict[str, Any]]:
        """Reviewed questions as training records (``id, title, context, question, answers``), one
        per question: its latest effective decision over every item of that question wins.
        ``since``: only decisions made after this ISO time."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT e.*, i.qid, i.title, i.context, i.question FROM effective e JOIN items i ON i.id = e.item_id "
                "WHERE e.action != 'skip' ORDER BY e.id").fetchall()
        latest: Dict[str, Any] = {}
        for r in rows:
            latest[r["qid"]] = r  # ordered by decision id: the last one wins
        records = []
        for r in sorted(latest.values(), key=lambda r: r["id"]):
            if since is not None and r["decided_at"] <= since:
                continue
            answers = [] if r["action"] == "no_answer" or r["answer"] == NO_ANSWER else [
                {"text": r["answer"], "answer_start": r["answer_start"]}]
            records.append({"id": r["qid"], "title": r["title"], "context": r["context"], "question": r["question"],
                            "answers": answers, "reviewer": r["reviewer"], "decided_at": r["decided_at"],
                            **({"note": r["note"]} if r["note"] else {})})
        return records

    def export(self, out: str, since: Optional[str] = None, overwrite: bool = False) -> int:
        """Write ``corrections`` to ``out`` as JSONL, atomically; an existing file only with ``overwrite``."""
        if since is not None:
            try:
                datetime.fromisoformat(since)
            except ValueError:
                raise ReviewError(f"--since {since!r} is not an ISO time (e.g. 2026-11-28T12:00:00+00:00)") from None
        if os.path.exists(out) and not overwrite:
            raise ReviewError(f"{out} exists; pass --overwrite to replace it")
        records = self.corrections(since)
        atomic_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), out)
        return len(records)


def _reviewer(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise ReviewError("reviewer must be a name (1 to 100 characters)")
    return name.strip()


def _decided_answer(action: str, answer: Optional[str]) -> Optional[str]:
    return NO_ANSWER if action == "no_answer" else answer


def _checked_answer(row, action: str, answer: Optional[str], answer_start: Optional[int]):
    """The (answer, answer_start) stored for a decision, checked against the item's context."""
    context = row["context"]
    if action == "skip":
        return None, None
    if action == "no_answer":
        return NO_ANSWER, None
    if action == "accept":
        model = row["model_answer"]
        if model is None:
            raise ReviewError("the model's reply is not valid JSON: there is no answer to accept; select the span "
                              "or mark no answer", 422)
        if model == NO_ANSWER:
            return NO_ANSWER, None
        start = context.find(model)
        if start < 0:
            raise ReviewError(f"the model's answer {model!r} is not in the context: select the span or mark no "
                              "answer", 422)
        return model, start
    # span
    if not isinstance(answer, str) or not answer.strip():
        raise ReviewError("a span decision needs the selected text as answer", 422)
    if isinstance(answer_start, bool) or not isinstance(answer_start, int) or answer_start < 0:
        raise ReviewError("a span decision needs answer_start, the offset of the answer in the context", 422)
    if context[answer_start:answer_start + len(answer)] != answer:
        raise ReviewError(f"{answer!r} is not the span of the context at {answer_start}: select it in the context",
                          422)
    return answer, answer_start


def _item_view(row) -> Dict[str, Any]:
    """What the review page shows of an item."""
    model = row["model_answer"]
    start = row["context"].find(model) if model and model != NO_ANSWER else -1
    return {
        "item_id": row["id"], "qid": row["qid"], "title": row["title"], "context": row["context"],
        "question": row["question"], "model_answer": model, "raw_output": row["raw_output"], "na_prob": row["na_prob"],
        "highlight": [start, start + len(model)] if start >= 0 else None,
        "run_dir": row["run_dir"], "stage": row["stage"],
    }
