"""The review web app: Starlette routes over ``ReviewDB`` and one static page.

Starlette because the app is a handful of JSON routes and three static files: a small,
well-kept ASGI toolkit (FastAPI is built on it) that needs no code generation and no front-end
build; uvicorn serves it. The page is plain HTML/JS/CSS shipped in the package: nothing is
fetched from a CDN, so it works offline.

Who is who: every ``/api`` call carries ``Authorization: Bearer <token>``, a token made by
``review add-reviewer`` (the page asks for it once); the reviewer is the token's, never a name
the request gives. What is refused, before anything is read or written:

- a Host header that is not the server's (DNS rebinding): 400 (Starlette's ``TrustedHostMiddleware``);
- a POST that is not ``Content-Type: application/json`` (415), has a ``Transfer-Encoding`` or no
  Content-Length (411), a body over 64 KiB or longer than it said (413: counted as it streams, before
  the token is looked at), or comes from another origin (``Origin`` / ``Sec-Fetch-Site``: 403);
- a missing, unknown, revoked or expired token (401), another reviewer's name or an admin route for
  a reviewer (403); only then is the body parsed;
- bodies that are not a JSON object or are nested too deep, ids that are not ASCII digits or are
  outside SQLite's integers (400), stale leases (409), answers that are not a span of the context (422);
- the database held by another process's write lock for over ``BUSY_SECONDS``: 503 + Retry-After
  (the work runs in the thread pool, so nobody else waits).

Every response, refusals and 500s included, carries a Content-Security-Policy (same origin only,
no framing), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy:
no-referrer``; uvicorn's ``server`` banner is off.

Routes (JSON; errors are ``{"error": message}``):
    GET  /api/me                    {name, admin}
    GET  /api/next                  the caller's item (leased to them), or {"item": null, "state": leased|done}
    POST /api/decide                {item_id, lease, action, answer?, answer_start?, note?}
    POST /api/undo                  undo the caller's latest decision (never over someone else's)
    GET  /api/history?q=TEXT        the caller's decisions, latest first
    POST /api/revise                {item_id, action, answer?, answer_start?, note?}: a new decision row
    GET  /api/item?item_id=N        one item (to revise it)
    GET  /api/progress, /api/stats  counts; agreement, per-reviewer numbers
    GET  /api/guidelines            {text}: the Markdown file given to serve
    GET  /api/disagreements         admin: items whose reviewers disagree, with the votes
    POST /api/resolve               admin: {item_id, action: no_answer|span, answer?, answer_start?}
    POST /api/release               admin: {holder?}: give back every lease (or one reviewer's)
"""

import asyncio
import json
import logging
import math
import os
import re
import socket
import sys
from typing import Any, Dict, List, Optional, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from torchtune_blah.review.agreement import disagreements, stats
from torchtune_blah.review.db import MAX_ID, Reviewer, ReviewDB, ReviewError

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_BODY = 64 * 1024
POST_METHODS = ("POST", "PUT", "PATCH", "DELETE")
_DIGITS = re.compile(r"[0-9]{1,19}")  # (ASCII digits only: str.isdigit() takes "²", which int() refuses)
BUSY_SECONDS = 2.0  # how long a request waits for another process's write lock before a 503
logger = logging.getLogger(__name__)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _error(e: ReviewError) -> JSONResponse:
    headers = {"Retry-After": f"{BUSY_SECONDS:g}"} if e.status == 503 else None
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


class Guard:
    """ASGI middleware, outermost: security headers on every response (refusals and 500s
    included); POSTs refused unless same-origin JSON of a bounded size. The body is read here, byte
    by byte counted, and refused at the cap whatever the headers say, before any authentication
    or database work; a ``Transfer-Encoding`` (chunked) body is refused outright. An exception
    that escapes a route is a JSON 500 with the same headers (never a traceback)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                    if k.lower().encode() not in names]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope["method"], headers)
        if refusal is None and scope["method"] in POST_METHODS:
            body, refusal = await self._read_body(receive, int(headers["content-length"]))
            if refusal is None:
                receive = _replay(body)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:  # (a bug: logged with its traceback, answered without one)
            logger.exception("review server: %s %s failed", scope["method"], scope.get("path"))
            if not started:
                await JSONResponse({"error": "internal error (logged by the server)"}, 500)(
                    scope, receive, send_with_headers)

    @staticmethod
    def _refusal(method: str, headers: Dict[str, str]) -> Optional[Response]:
        if method not in POST_METHODS:
            return None
        host = headers.get("host", "")
        origin = headers.get("origin")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            return JSONResponse({"error": f"cross-origin request from {origin!r:.100} refused"}, 403)
        if headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
            return JSONResponse({"error": "cross-site request refused"}, 403)
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return JSONResponse({"error": "the request body must be JSON (Content-Type: application/json)"}, 415)
        if "transfer-encoding" in headers:
            return JSONResponse({"error": "Transfer-Encoding is not accepted: send the body with a Content-Length"},
                                411)
        length = headers.get("content-length")
        if length is None or not _DIGITS.fullmatch(length):
            return JSONResponse({"error": "a Content-Length is required"}, 411)
        if int(length) > MAX_BODY:
            return JSONResponse({"error": f"request body over {MAX_BODY} bytes"}, 413)
        return None

    @staticmethod
    async def _read_body(receive, length: int):
        """``(body, None)``, or ``(None, refusal)`` once more than ``length`` (<= MAX_BODY) bytes
        arrived: nothing past the cap is kept."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, JSONResponse({"error": "the client went away"}, 400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > length:
                return None, JSONResponse({"error": f"the body is longer than its Content-Length ({length})"}, 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes):
    """An ASGI ``receive`` that gives the body read by ``Guard``, then waits for the disconnect."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # (nothing more will come; Starlette only asks to detect a disconnect)
    return receive


def _body(raw: bytes) -> Dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # (RecursionError: JSON nested deeper than Python's parser goes)
        raise ReviewError("the request body must be a JSON object (at most a few hundred levels deep)") from None
    if not isinstance(body, dict):
        raise ReviewError("the request body must be a JSON object")
    return body


def _query_int(request: Request, name: str) -> int:
    value = request.query_params.get(name, "")
    if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= MAX_ID:
        raise ReviewError(f"{name} must be an integer from 1 to {MAX_ID}")
    return int(value)


def create_app(db: ReviewDB, guidelines: str = "", allowed_hosts: Sequence[str] = ("127.0.0.1", "localhost"),
               ) -> Starlette:
    def who(request: Request, admin: bool = False) -> Reviewer:
        header = request.headers.get("authorization", "")
        token = header[len("Bearer "):] if header.startswith("Bearer ") else None
        reviewer = db.authenticate(token)
        if reviewer is None:
            raise ReviewError("a valid reviewer token is required (Authorization: Bearer <token>, from "
                              "`review add-reviewer`; it may have been revoked or have expired)", 401)
        if admin and not reviewer.admin:
            raise ReviewError("this needs an admin token", 403)
        return reviewer

    def route(handler, admin: bool = False, post: bool = False):
        """A JSON endpoint: the token is checked first, then the body is parsed; the work (SQLite)
        runs in Starlette's thread pool, so one slow request never holds the event loop."""
        def work(request: Request, raw: Optional[bytes]):
            reviewer = who(request, admin)
            body = _body(raw) if post else None
            claimed = [x for x in (request.query_params.get("reviewer"), (body or {}).get("reviewer"))
                       if x is not None]
            if any(c != reviewer.name for c in claimed):
                raise ReviewError("you cannot act as another reviewer", 403)
            return handler(request, reviewer, body)

        async def endpoint(request: Request):
            raw = await request.body() if post else None
            try:
                return JSONResponse(await run_in_threadpool(work, request, raw))
            except ReviewError as e:
                return _error(e)
        return endpoint

    def lease_json(lease, reviewer: Reviewer) -> Dict[str, Any]:
        if lease is None:
            return {"item": None, "state": db.queue_state(reviewer.name), "progress": db.progress()}
        return {"item": lease.item, "lease": lease.token, "lease_expires": lease.expires, "progress": db.progress()}

    def decide(request, reviewer, body):
        if not isinstance(body.get("lease"), str):
            raise ReviewError("lease must be the token /api/next gave you", 409)
        decision = db.decide(body.get("item_id"), body["lease"], reviewer.name, body.get("action"),
                             answer=body.get("answer"), answer_start=body.get("answer_start"), note=body.get("note"))
        return {"decision": decision, "progress": db.progress()}

    def revise(request, reviewer, body):
        decision = db.revise(body.get("item_id"), reviewer.name, body.get("action"), answer=body.get("answer"),
                             answer_start=body.get("answer_start"), note=body.get("note"))
        return {"decision": decision, "progress": db.progress()}

    def resolve(request, reviewer, body):
        return {"resolution": db.resolve(body.get("item_id"), reviewer.name, body.get("action"),
                                         answer=body.get("answer"), answer_start=body.get("answer_start"),
                                         note=body.get("note"))}

    def release(request, reviewer, body):
        return {"released": db.release_leases(body.get("holder"))}

    async def index(request: Request):
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    return Starlette(routes=[
        Route("/", index),
        Route("/api/me", route(lambda r, me, b: {"name": me.name, "admin": me.admin})),
        Route("/api/next", route(lambda r, me, b: lease_json(db.next_item(me.name), me))),
        Route("/api/decide", route(decide, post=True), methods=["POST"]),
        Route("/api/undo", route(lambda r, me, b: lease_json(db.undo(me.name), me), post=True), methods=["POST"]),
        Route("/api/history", route(lambda r, me, b: {"decisions": db.history(me.name, r.query_params.get("q", "")[:200])})),
        Route("/api/revise", route(revise, post=True), methods=["POST"]),
        Route("/api/item", route(lambda r, me, b: {"item": db.item(_query_int(r, "item_id"))})),
        Route("/api/progress", route(lambda r, me, b: db.progress())),
        Route("/api/stats", route(lambda r, me, b: stats(db))),
        Route("/api/guidelines", route(lambda r, me, b: {"text": guidelines})),
        Route("/api/disagreements", route(lambda r, me, b: {"items": disagreements(db)}, admin=True)),
        Route("/api/resolve", route(resolve, admin=True, post=True), methods=["POST"]),
        Route("/api/release", route(release, admin=True, post=True), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ], middleware=[Middleware(Guard), Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))])


WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_allowed_hosts(host: str) -> List[str]:
    """The Host headers a server bound to ``host`` answers to by default: loopback names for a
    loopback bind; for a wildcard bind (0.0.0.0, ::) this machine's names and addresses too; else
    ``host`` itself. Anything else (a DNS name in front of a proxy) goes in ``--allowed-host``."""
    if host in LOOPBACK_HOSTS:
        return ["127.0.0.1", "localhost", "[::1]"]
    if host not in WILDCARD_HOSTS:
        return [f"[{host}]" if ":" in host else host]
    names = {"127.0.0.1", "localhost", "[::1]", socket.gethostname(), socket.getfqdn()}
    try:
        for *_, address in socket.getaddrinfo(socket.gethostname(), None):
            names.add(f"[{address[0]}]" if ":" in address[0] else address[0])
    except OSError:  # (a machine whose own name does not resolve: its names above still count)
        pass
    return sorted(n for n in names if n)


def check_lease_seconds(value: Any) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or not 1 <= seconds <= 7 * 24 * 3600:
        raise ReviewError(f"--lease-seconds {value}: give seconds from 1 to 604800 (a week)")
    return seconds


def serve(db_path: str, host: str = "127.0.0.1", port: int = 8000, lease_seconds: float = 600.0,
          overlap: Optional[int] = None, guidelines_path: Optional[str] = None,
          allowed_hosts: Sequence[str] = ()) -> None:
    """Check everything (the database, the guidelines file, the lease) before the server starts."""
    import uvicorn

    lease_seconds = check_lease_seconds(lease_seconds)
    guidelines = ""
    if guidelines_path:
        try:
            with open(guidelines_path, encoding="utf-8") as f:
                guidelines = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ReviewError(f"--guidelines {guidelines_path}: cannot read it as UTF-8 text "
                              f"({getattr(e, 'strerror', None) or e})") from None
    db = ReviewDB(db_path, lease_seconds=lease_seconds, create=False, busy_seconds=BUSY_SECONDS)
    if overlap is not None:
        db.set_overlap(overlap)
    if not db.reviewers():
        print(f"warning: {db_path} has no reviewers yet; add them with `python -m torchtune_blah.review "
              f"add-reviewer --db {db_path} NAME` (each gets a token)", file=sys.stderr)
    if host not in LOOPBACK_HOSTS:
        print(f"warning: serving on {host}, reachable from other machines; tokens travel in clear text over "
              "plain HTTP: put it behind HTTPS (a reverse proxy) or keep it on 127.0.0.1", file=sys.stderr)
    hosts = list(allowed_hosts) or default_allowed_hosts(host)
    print(f"Reviewing {db_path}: open http://{host}:{port}/ ({db.progress()['total']} items, overlap {db.overlap}); "
          f"answering to Host {', '.join(hosts)}")
    uvicorn.Server(server_config(create_app(db, guidelines, hosts), host, port)).run()


def server_config(app, host: str, port: int):
    """How uvicorn serves the app: quiet, and no ``server:`` banner naming the software."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", server_header=False)
