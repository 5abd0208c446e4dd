"""The review database: SQLite (stdlib ``sqlite3``), WAL mode, one file.

Tables:

- ``items``: one model output to review (question, context, the model's answer, raw output,
  abstention probability, the run/stage/file it came from) and its queue priority. Importing the
  same output twice adds nothing (``source_key``).
- ``reviewers``: who may review, created by whoever runs the server (``add_reviewer``); only a
  SHA-256 of each token is stored. A token may expire (``expires_at``), be replaced
  (``rotate_token``) or be revoked (``revoke_reviewer``): the next request with it gets 401.
  Admins may also resolve disagreements and release leases.
- ``leases``: which reviewer holds which item, until when (at most one item per reviewer; with
  ``overlap`` N an item is leased to at most N reviewers at once, never twice to one).
- ``decisions``: the audit trail, append-only. Every accept / no-answer / span / skip is a row
  with reviewer, time and the seconds the reviewer had the item; a revision is a newer row of the
  same reviewer on the same item; an undo is a row naming the decision it undoes. A reviewer's
  *vote* on an item is their latest decision that is neither an undo nor undone.
- ``resolutions``: an admin's final answer for an item the reviewers disagree on (latest wins).
- ``settings``: ``overlap``, how many reviewers see each item.

Every write is one ``BEGIN IMMEDIATE`` transaction, so concurrent reviewers (threads of the web
app, or several processes) never interleave. A database of schema version 1 (self-asserted
reviewer names, one lease per item) or 2 (tokens that never expire) is migrated in place; nothing in
it is lost. Another process holding the write lock longer than ``busy_seconds`` is a ``ReviewError``
with status 503 ("busy, try again"), never a hang.

(Over 350 lines: one owner for every write to the file, so every rule above is checked in one place.)
"""

import hashlib
import json
import math
import os
import secrets
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional

from torchtune_blah.checkpointing import atomic_text
from torchtune_blah.data.squad import NO_ANSWER
from torchtune_blah.review.sources import ReviewItem, item_view

SCHEMA_VERSION = 3
ACTIONS = ("accept", "no_answer", "span", "skip")
REVIEWED = ("accept", "no_answer", "span")
MAX_ID = 2 ** 63 - 1  # SQLite's INTEGER

_TABLES = """
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
    p_agrees INTEGER NOT NULL,   -- 0 (was: the answer agrees with na_prob); kept so older files open
    p_distance REAL NOT NULL     -- the answer's confidence (was: |na_prob - threshold|); low first
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
    undoes INTEGER UNIQUE REFERENCES decisions(id),
    seconds REAL
);
CREATE INDEX IF NOT EXISTS decisions_item ON decisions(item_id);
CREATE INDEX IF NOT EXISTS items_queue ON items(p_valid, p_agrees, p_distance, id);
"""

_V2 = """
CREATE TABLE IF NOT EXISTS reviewers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    item_id INTEGER NOT NULL REFERENCES items(id),
    reviewer TEXT NOT NULL,
    token TEXT NOT NULL,
    granted REAL NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (item_id, reviewer)
);
CREATE TABLE IF NOT EXISTS resolutions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL REFERENCES items(id),
    admin TEXT NOT NULL,
    resolved_at TEXT NOT NULL,
    answer TEXT NOT NULL,
    answer_start INTEGER,
    note TEXT
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
DROP VIEW IF EXISTS effective;
CREATE VIEW IF NOT EXISTS live_decisions AS
    SELECT d.* FROM decisions d
    WHERE d.action != 'undo' AND NOT EXISTS (SELECT 1 FROM decisions u WHERE u.undoes = d.id);
CREATE VIEW IF NOT EXISTS votes AS
    SELECT l.* FROM live_decisions l
    WHERE l.id = (SELECT MAX(l2.id) FROM live_decisions l2 WHERE l2.item_id = l.item_id AND l2.reviewer = l.reviewer);
"""

# Version 3: tokens that expire or are revoked.
_V3 = """
ALTER TABLE reviewers ADD COLUMN expires_at REAL;
ALTER TABLE reviewers ADD COLUMN revoked_at TEXT;
"""

# Version 1 kept one lease in three columns of items: the live ones move to leases, then the
# columns go (SQLite >= 3.35).
_V1_TO_V2 = """
INSERT OR IGNORE INTO leases (item_id, reviewer, token, granted, expires)
    SELECT id, lease_reviewer, lease_token, lease_expires - {lease}, lease_expires FROM items
    WHERE lease_token IS NOT NULL AND lease_reviewer IS NOT NULL AND lease_expires IS NOT NULL;
ALTER TABLE items DROP COLUMN lease_token;
ALTER TABLE items DROP COLUMN lease_reviewer;
ALTER TABLE items DROP COLUMN lease_expires;
ALTER TABLE decisions ADD COLUMN seconds REAL;
"""


class ReviewError(ValueError):
    """A request the database refuses; ``status`` is the HTTP status the web app answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class Lease:
    item: Dict[str, Any]
    token: str
    expires: float


@dataclass(frozen=True)
class Reviewer:
    name: str
    admin: bool


class ReviewDB:
    """One review database file. Safe to use from many threads and processes: every call opens
    its own connection."""

    def __init__(self, path: str, lease_seconds: float = 600.0, create: bool = True, busy_seconds: float = 30.0):
        """``create=False``: a missing file is an error (the command line passes it unless told
        ``--create``: a mistyped path never becomes a new, empty database)."""
        self.path = path
        self.lease_seconds = float(lease_seconds)
        if not math.isfinite(self.lease_seconds) or self.lease_seconds <= 0:
            raise ReviewError(f"lease_seconds={lease_seconds!r}: give a positive number of seconds")
        self.busy_seconds = float(busy_seconds)
        if os.path.isdir(path):
            raise ReviewError(f"{path} is a folder; --db names the review database file (e.g. review.sqlite)")
        if not create and not os.path.isfile(path):
            raise ReviewError(f"{path} does not exist; create it by importing model outputs: python -m "
                              f"torchtune_blah.review import --create --db {path} predictions.jsonl")
        try:
            self._open()
        except sqlite3.DatabaseError as e:  # (e.g. "file is not a database")
            raise ReviewError(f"{path} is not a review database ({e}); check --db") from None

    def _open(self) -> None:
        path = self.path
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ReviewError(f"{path} has schema version {version}, newer than this torchtune-blah's "
                                  f"{SCHEMA_VERSION}: upgrade torchtune-blah to open it (nothing was changed)")
            if version == 0 and conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                raise ReviewError(f"{path} is an SQLite file of something else (its tables are not a review "
                                  "database's); check --db")
            script = {0: _TABLES + _V2 + _V3, 1: _V2 + _V1_TO_V2.format(lease=self.lease_seconds) + _V3,
                      2: _V3}.get(version, "")
            for statement in script.split(";\n"):  # (executescript would commit the transaction half-way)
                if statement.strip():
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        with self._connection() as conn:
            conn.execute("PRAGMA journal_mode=WAL")

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.busy_seconds, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row  # (connect's timeout is SQLite's busy timeout)
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise ReviewError(f"the review database is busy (another process holds its write lock for over "
                                  f"{self.busy_seconds:g} s); try again in a moment", 503) from None
            raise
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed on success, rolled back on any error. The threads of
        one process take turns on a lock first (a queue, where SQLite's busy handler would poll
        with sleeps of up to 100 ms and leave the file idle); only another process's lock is
        SQLite's to wait for, up to ``busy_seconds``."""
        lock = _write_lock(self.path)
        if not lock.acquire(timeout=max(10.0, 5 * self.busy_seconds)):
            raise ReviewError("the review server is busy (too many decisions at once); try again in a moment", 503)
        try:
            with self._connection() as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        finally:
            lock.release()

    # ------------------------------------------------------------------ reviewers and settings

    def add_reviewer(self, name: str, admin: bool = False, expires_days: Optional[float] = None) -> str:
        """Create a reviewer; returns their token (shown once: only its hash is kept), valid for
        ``expires_days`` (None: until rotated or revoked)."""
        name = _name(name)
        token = secrets.token_urlsafe(24)
        expires = _expiry(expires_days)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM reviewers WHERE name = ?", (name,)).fetchone():
                raise ReviewError(f"reviewer {name!r} exists; choose another name (or rotate-token {name})")
            conn.execute("INSERT INTO reviewers (name, token_sha256, admin, created_at, expires_at) "
                         "VALUES (?, ?, ?, ?, ?)", (name, token_hash(token), int(admin), now_iso(), expires))
        return token

    def rotate_token(self, name: str, expires_days: Optional[float] = None) -> str:
        """A new token for ``name`` (also un-revokes them); the old one stops working at once."""
        name = _name(name)
        token = secrets.token_urlsafe(24)
        expires = _expiry(expires_days)
        with self._write() as conn:
            updated = conn.execute("UPDATE reviewers SET token_sha256 = ?, expires_at = ?, revoked_at = NULL "
                                   "WHERE name = ?", (token_hash(token), expires, name)).rowcount
            if not updated:
                raise ReviewError(f"no reviewer {name!r} (see `review reviewers`)")
        return token

    def revoke_reviewer(self, name: str) -> None:
        """``name``'s token stops working at once and their leases are given back; their decisions stay."""
        name = _name(name)
        with self._write() as conn:
            if not conn.execute("UPDATE reviewers SET revoked_at = ? WHERE name = ?", (now_iso(), name)).rowcount:
                raise ReviewError(f"no reviewer {name!r} (see `review reviewers`)")
            conn.execute("DELETE FROM leases WHERE reviewer = ?", (name,))

    def reviewers(self) -> List[Dict[str, Any]]:
        with self._connection() as conn:
            return [{"name": r["name"], "admin": bool(r["admin"]), "created_at": r["created_at"],
                     "expires_at": r["expires_at"], "revoked_at": r["revoked_at"]}
                    for r in conn.execute("SELECT * FROM reviewers ORDER BY id")]

    def authenticate(self, token: Any) -> Optional[Reviewer]:
        """The reviewer a token belongs to, or None (unknown, revoked or expired)."""
        if not isinstance(token, str) or not token or len(token) > 200:
            return None
        with self._connection() as conn:
            row = conn.execute("SELECT name, admin FROM reviewers WHERE token_sha256 = ? AND revoked_at IS NULL "
                               "AND (expires_at IS NULL OR expires_at > ?)", (token_hash(token), time.time())
                               ).fetchone()
        return None if row is None else Reviewer(row["name"], bool(row["admin"]))

    @property
    def overlap(self) -> int:
        with self._connection() as conn:
            return _overlap(conn)

    def set_overlap(self, overlap: int) -> None:
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 1 <= overlap <= 20:
            raise ReviewError(f"overlap must be an integer from 1 to 20, got {overlap!r}")
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('overlap', ?)", (str(overlap),))

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
        """The item this reviewer holds, else the first item they have not decided that still needs
        reviewers (fewer than ``overlap`` votes and live leases of others), leased to them for
        ``lease_seconds``; None when there is none. Items they skipped come last."""
        reviewer = _name(reviewer)
        now = time.time()
        with self._write() as conn:
            overlap = _overlap(conn)
            conn.execute("DELETE FROM leases WHERE expires <= ?", (now,))
            held = conn.execute("SELECT * FROM leases WHERE reviewer = ?", (reviewer,)).fetchone()
            if held is not None:  # a reload keeps the reviewer's lease (same token), renewed
                expires = now + self.lease_seconds
                conn.execute("UPDATE leases SET expires = ? WHERE item_id = ? AND reviewer = ?",
                             (expires, held["item_id"], reviewer))
                row = conn.execute("SELECT * FROM items WHERE id = ?", (held["item_id"],)).fetchone()
                return Lease(item=item_view(row), token=held["token"], expires=expires)
            row = conn.execute(
                "SELECT i.*, mine.action AS my_action FROM items i "
                "LEFT JOIN votes mine ON mine.item_id = i.id AND mine.reviewer = ? "
                "WHERE (mine.action IS NULL OR mine.action = 'skip') "
                "AND (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id AND v.action != 'skip') "
                "  + (SELECT COUNT(*) FROM leases l WHERE l.item_id = i.id) < ? "
                "ORDER BY (mine.action IS NOT NULL), i.p_valid, i.p_agrees, i.p_distance, i.id LIMIT 1",
                (reviewer, overlap)).fetchone()
            if row is None:
                return None
            token, expires = uuid.uuid4().hex, now + self.lease_seconds
            conn.execute("INSERT INTO leases (item_id, reviewer, token, granted, expires) VALUES (?, ?, ?, ?, ?)",
                         (row["id"], reviewer, token, now, expires))
            return Lease(item=item_view(row), token=token, expires=expires)

    def queue_state(self, reviewer: str) -> str:
        """Why ``next_item`` found nothing: ``leased`` (items still need reviewers but others hold
        them: try again soon) or ``done``."""
        reviewer = _name(reviewer)
        with self._connection() as conn:
            waiting = conn.execute(
                "SELECT COUNT(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = i.id "
                "AND v.reviewer = ? AND v.action != 'skip') AND "
                "(SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id AND v.action != 'skip') < ?",
                (reviewer, _overlap(conn))).fetchone()[0]
        return "leased" if waiting else "done"

    def release_leases(self, reviewer: Optional[str] = None) -> int:
        """Admin: give back every lease (or one reviewer's); returns how many."""
        with self._write() as conn:
            if reviewer is None:
                return conn.execute("DELETE FROM leases").rowcount
            return conn.execute("DELETE FROM leases WHERE reviewer = ?", (_name(reviewer),)).rowcount

    def decide(self, item_id: int, lease_token: str, reviewer: str, action: str, answer: Optional[str] = None,
               answer_start: Optional[int] = None, note: Optional[str] = None) -> int:
        """Record a decision on a leased item; returns the decision id. Raises ``ReviewError``
        (nothing written) for an unknown item (404), a lease that is not the caller's or has
        expired (409), or an answer that is not a span of the context (422)."""
        reviewer, item_id = _name(reviewer), _item_id(item_id)
        _check_action(action, note)
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise ReviewError(f"unknown item {item_id}", 404)
            lease = conn.execute("SELECT * FROM leases WHERE item_id = ? AND reviewer = ?",
                                 (item_id, reviewer)).fetchone()
            if lease is None or lease["token"] != lease_token:
                raise ReviewError("this item is not leased to you (any more): reload to get your next item", 409)
            if lease["expires"] <= now:
                raise ReviewError("your lease on this item expired: reload to get your next item", 409)
            answer, answer_start = _checked_answer(row, action, answer, answer_start)
            cursor = conn.execute(
                "INSERT INTO decisions (item_id, reviewer, decided_at, action, answer, answer_start, note, seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (item_id, reviewer, now_iso(), action, answer, answer_start,
                                                    note or None, round(now - lease["granted"], 3)))
            conn.execute("DELETE FROM leases WHERE item_id = ? AND reviewer = ?", (item_id, reviewer))
            return cursor.lastrowid

    def revise(self, item_id: int, reviewer: str, action: str, answer: Optional[str] = None,
               answer_start: Optional[int] = None, note: Optional[str] = None) -> int:
        """A new decision of ``reviewer`` on an item they decided before (the old row stays)."""
        reviewer, item_id = _name(reviewer), _item_id(item_id)
        _check_action(action, note)
        with self._write() as conn:
            row = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise ReviewError(f"unknown item {item_id}", 404)
            mine = conn.execute("SELECT action FROM votes WHERE item_id = ? AND reviewer = ?",
                                (item_id, reviewer)).fetchone()
            if mine is None:
                raise ReviewError("you have not decided this item: revise only your own decisions", 403)
            if mine["action"] == "skip" and action != "skip":
                # A skip is no vote: turning it into one takes a place, as next_item would give it.
                others = conn.execute(
                    "SELECT (SELECT COUNT(*) FROM votes WHERE item_id = ? AND reviewer != ? AND action != 'skip') + "
                    "(SELECT COUNT(*) FROM leases WHERE item_id = ? AND reviewer != ? AND expires > ?)",
                    (item_id, reviewer, item_id, reviewer, time.time())).fetchone()[0]
                if others >= _overlap(conn):
                    raise ReviewError(f"you skipped this item and {others} other reviewer(s) have taken it since "
                                      f"(overlap {_overlap(conn)}): it needs no more votes", 409)
            answer, answer_start = _checked_answer(row, action, answer, answer_start)
            return conn.execute(
                "INSERT INTO decisions (item_id, reviewer, decided_at, action, answer, answer_start, note) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (item_id, reviewer, now_iso(), action, answer, answer_start, note or None)).lastrowid

    def undo(self, reviewer: str) -> Lease:
        """Undo this reviewer's latest live decision (an appended ``undo`` row) and lease its item
        back to them. 409 when there is nothing to undo, when someone else decided the item since,
        or when it is leased to someone else and no place is left."""
        reviewer = _name(reviewer)
        now = time.time()
        with self._write() as conn:
            last = conn.execute("SELECT * FROM live_decisions WHERE reviewer = ? ORDER BY id DESC LIMIT 1",
                                (reviewer,)).fetchone()
            if last is None:
                raise ReviewError("nothing to undo", 409)
            later = conn.execute("SELECT reviewer FROM live_decisions WHERE item_id = ? AND id > ? AND reviewer != ?",
                                 (last["item_id"], last["id"], reviewer)).fetchone()
            if later is not None:
                raise ReviewError(f"{later['reviewer']} decided this item after you: undo would change theirs too; "
                                  "revise your decision from the history instead", 409)
            others = conn.execute(
                "SELECT (SELECT COUNT(*) FROM leases WHERE item_id = ? AND reviewer != ? AND expires > ?) + "
                "(SELECT COUNT(*) FROM votes WHERE item_id = ? AND reviewer != ? AND action != 'skip')",
                (last["item_id"], reviewer, now, last["item_id"], reviewer)).fetchone()[0]
            if last["action"] == "skip" and others >= _overlap(conn):
                raise ReviewError("others are reviewing this item now (you skipped it); try again later", 409)
            conn.execute("INSERT INTO decisions (item_id, reviewer, decided_at, action, undoes) VALUES (?, ?, ?, ?, ?)",
                         (last["item_id"], reviewer, now_iso(), "undo", last["id"]))
            # Give back whatever else the reviewer held, then lease them the undone item.
            conn.execute("DELETE FROM leases WHERE reviewer = ?", (reviewer,))
            token, expires = uuid.uuid4().hex, now + self.lease_seconds
            conn.execute("INSERT INTO leases (item_id, reviewer, token, granted, expires) VALUES (?, ?, ?, ?, ?)",
                         (last["item_id"], reviewer, token, now, expires))
            row = conn.execute("SELECT * FROM items WHERE id = ?", (last["item_id"],)).fetchone()
            return Lease(item=item_view(row), token=token, expires=expires)

    def resolve(self, item_id: int, admin: str, action: str, answer: Optional[str] = None,
                answer_start: Optional[int] = None, note: Optional[str] = None) -> int:
        """An admin's final answer for an item (``no_answer`` or ``span``); the latest one wins."""
        admin, item_id = _name(admin), _item_id(item_id)
        if action not in ("no_answer", "span"):
            raise ReviewError("a resolution is no_answer or span", 400)
        _check_action(action, note)
        with self._write() as conn:
            row = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise ReviewError(f"unknown item {item_id}", 404)
            answer, answer_start = _checked_answer(row, action, answer, answer_start)
            return conn.execute(
                "INSERT INTO resolutions (item_id, admin, resolved_at, answer, answer_start, note) "
                "VALUES (?, ?, ?, ?, ?, ?)", (item_id, admin, now_iso(), answer, answer_start, note or None)).lastrowid

    # ------------------------------------------------------------------ reading

    def progress(self) -> Dict[str, Any]:
        """Items, items with all their votes, skips, and how often the reviewers agreed with the model."""
        with self._connection() as conn:
            overlap = _overlap(conn)
            total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            reviewed = conn.execute(
                "SELECT COUNT(*) FROM (SELECT item_id FROM votes WHERE action != 'skip' GROUP BY item_id "
                "HAVING COUNT(*) >= ?)", (overlap,)).fetchone()[0]
            rows = conn.execute("SELECT v.action, v.answer, i.model_answer FROM votes v JOIN items i "
                                "ON i.id = v.item_id WHERE v.action != 'skip'").fetchall()
            skipped = conn.execute("SELECT COUNT(*) FROM votes WHERE action = 'skip'").fetchone()[0]
        agreed = sum(r["answer"] == r["model_answer"] for r in rows)
        return {"total": total, "reviewed": reviewed, "skipped": skipped, "overlap": overlap,
                "agreement": agreed / len(rows) if rows else None}

    def decisions(self) -> List[Dict[str, Any]]:
        """The whole audit trail, in order."""
        with self._connection() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM decisions ORDER BY id")]

    def history(self, reviewer: str, search: str = "", limit: int = 50) -> List[Dict[str, Any]]:
        """A reviewer's votes, latest first (``search``: in the question, title or answer)."""
        reviewer = _name(reviewer)
        pattern = f"%{search.strip()}%"
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT v.*, i.qid, i.title, i.question, i.model_answer FROM votes v JOIN items i ON i.id = v.item_id "
                "WHERE v.reviewer = ? AND (i.question LIKE ? OR i.title LIKE ? OR IFNULL(v.answer, '') LIKE ?) "
                "ORDER BY v.id DESC LIMIT ?", (reviewer, pattern, pattern, pattern, int(limit))).fetchall()
        return [{"decision_id": r["id"], "item_id": r["item_id"], "qid": r["qid"], "title": r["title"],
                 "question": r["question"], "action": r["action"], "answer": r["answer"],
                 "answer_start": r["answer_start"], "decided_at": r["decided_at"], "note": r["note"]} for r in rows]

    def item(self, item_id: int) -> Dict[str, Any]:
        with self._connection() as conn:
            row = conn.execute("SELECT * FROM items WHERE id = ?", (_item_id(item_id),)).fetchone()
        if row is None:
            raise ReviewError(f"unknown item {item_id}", 404)
        return item_view(row)

    def votes_by_item(self) -> Dict[int, List[Dict[str, Any]]]:
        """Every item's non-skip votes, in decision order (for agreement and resolution)."""
        out: Dict[int, List[Dict[str, Any]]] = {}
        with self._connection() as conn:
            for r in conn.execute("SELECT * FROM votes WHERE action != 'skip' ORDER BY id"):
                out.setdefault(r["item_id"], []).append(dict(r))
        return out

    def resolutions(self) -> Dict[int, Dict[str, Any]]:
        with self._connection() as conn:
            return {r["item_id"]: dict(r) for r in conn.execute("SELECT * FROM resolutions ORDER BY id")}

    def items(self) -> Dict[int, Dict[str, Any]]:
        with self._connection() as conn:
            return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM items ORDER BY id")}

    def export(self, out: str, since: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
        """Write the resolved questions (``agreement.corrections``) to ``out`` as JSONL, atomically;
        an existing file only with ``overwrite``. Returns ``{written, unresolved, pending}``."""
        from torchtune_blah.review.agreement import corrections

        if since is not None:
            since = parse_time(since, "--since")
        if _same_file(out, self.path):
            raise ReviewError(f"--out {out} is the review database (or one of its journal files): choose another "
                              "file (nothing was written)")
        if os.path.isdir(out):
            raise ReviewError(f"--out {out} is a folder; name a .jsonl file")
        if os.path.exists(out) and not overwrite:
            raise ReviewError(f"{out} exists; pass --overwrite to replace it")
        records, unresolved, pending = corrections(self, since)
        atomic_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), out)
        return {"written": len(records), "unresolved": unresolved, "pending": pending}


_WRITE_LOCKS: Dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _write_lock(path: str) -> threading.Lock:
    """One lock per database file in this process, whichever ``ReviewDB`` object writes."""
    key = os.path.realpath(path)
    with _LOCKS_LOCK:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())


def parse_time(text: str, what: str = "time") -> datetime:
    """An ISO time as an aware datetime (no zone given: UTC), so that times written in any zone compare."""
    try:
        stamp = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ReviewError(f"{what} {text!r} is not an ISO time (e.g. 2026-11-28T12:00:00+01:00; no zone: UTC)") from None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=timezone.utc)


def _expiry(days: Optional[float]) -> Optional[float]:
    if days is None:
        return None
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not math.isfinite(days) or days <= 0:
        raise ReviewError(f"--expires-days {days!r}: give a positive number of days")
    return time.time() + float(days) * 86400


def _same_file(a: str, b: str) -> bool:
    """``a`` is ``b`` or one of SQLite's files beside it (``-wal``, ``-shm``, ``-journal``)."""
    real = os.path.realpath(a)
    return any(real == os.path.realpath(b + suffix) for suffix in ("", "-wal", "-shm", "-journal"))


def _overlap(conn: sqlite3.Connection) -> int:
    """How many reviewers see each item, read in the caller's connection (and transaction)."""
    row = conn.execute("SELECT value FROM settings WHERE key = 'overlap'").fetchone()
    return 1 if row is None else int(row["value"])


def _name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise ReviewError("reviewer must be a name (1 to 100 characters)")
    return name.strip()


def _item_id(item_id: Any) -> int:
    if isinstance(item_id, bool) or not isinstance(item_id, int) or not 1 <= item_id <= MAX_ID:
        raise ReviewError(f"item_id must be an integer from 1 to {MAX_ID}")
    return item_id


def _check_action(action: Any, note: Any) -> None:
    if action not in ACTIONS:
        raise ReviewError(f"action must be one of {ACTIONS}, got {action!r:.40}")
    if note is not None and (not isinstance(note, str) or len(note) > 4000):
        raise ReviewError("note must be a text of at most 4000 characters")


def _checked_answer(row, action: str, answer: Any, answer_start: Any):
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
    if not isinstance(answer, str) or not answer.strip() or len(answer) > len(context):
        raise ReviewError("a span decision needs the selected text as answer", 422)
    if isinstance(answer_start, bool) or not isinstance(answer_start, int) or not 0 <= answer_start < len(context):
        raise ReviewError("a span decision needs answer_start, the offset of the answer in the context", 422)
    if context[answer_start:answer_start + len(answer)] != answer:
        raise ReviewError(f"{answer!r:.80} is not the span of the context at {answer_start}: select it in the context",
                          422)
    return answer, answer_start
