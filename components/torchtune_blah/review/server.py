"""The review web app: Starlette routes over ``ReviewDB`` and one static page.

Starlette because the app is a handful of JSON routes and three static files: a small,
well-kept ASGI toolkit (FastAPI is built on it) that needs no code generation and no front-end
build; uvicorn serves it. The page is plain HTML/JS/CSS shipped in the package: nothing is
fetched from a CDN, so it works offline.

Routes:
    GET  /                  the page
    GET  /api/next?reviewer=NAME      the reviewer's item (leased to them), or {"item": null} when done
    POST /api/decide        {item_id, lease, reviewer, action, answer?, answer_start?, note?}
    POST /api/undo          {reviewer}: undo their last decision, lease the item back
    GET  /api/progress      {total, reviewed, skipped, agreement}

Errors are JSON ``{"error": message}`` with a 4xx status; a refused request writes nothing.
"""

import os
from typing import Any, Dict

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from torchtune_blah.review.db import ReviewDB, ReviewError

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _error(e: ReviewError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.status)


def _lease_json(lease, db: ReviewDB) -> Dict[str, Any]:
    if lease is None:
        return {"item": None, "progress": db.progress()}
    return {"item": lease.item, "lease": lease.token, "lease_expires": lease.expires, "progress": db.progress()}


async def _body(request: Request) -> Dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ReviewError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ReviewError("the request body must be a JSON object")
    return body


def create_app(db: ReviewDB) -> Starlette:
    async def index(request: Request):
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    async def next_item(request: Request):
        try:
            return JSONResponse(_lease_json(db.next_item(request.query_params.get("reviewer", "")), db))
        except ReviewError as e:
            return _error(e)

    async def decide(request: Request):
        try:
            body = await _body(request)
            item_id = body.get("item_id")
            if isinstance(item_id, bool) or not isinstance(item_id, int):
                raise ReviewError("item_id must be an integer")
            if not isinstance(body.get("lease"), str):
                raise ReviewError("lease must be the token /api/next gave you", 409)
            decision = db.decide(item_id, body["lease"], body.get("reviewer"), body.get("action"),
                                 answer=body.get("answer"), answer_start=body.get("answer_start"),
                                 note=body.get("note"))
            return JSONResponse({"decision": decision, "progress": db.progress()})
        except ReviewError as e:
            return _error(e)

    async def undo(request: Request):
        try:
            body = await _body(request)
            return JSONResponse(_lease_json(db.undo(body.get("reviewer")), db))
        except ReviewError as e:
            return _error(e)

    async def progress(request: Request):
        return JSONResponse(db.progress())

    return Starlette(routes=[
        Route("/", index),
        Route("/api/next", next_item),
        Route("/api/decide", decide, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/progress", progress),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ])


def serve(db_path: str, host: str = "127.0.0.1", port: int = 8000, lease_seconds: float = 600.0) -> None:
    import uvicorn

    db = ReviewDB(db_path, lease_seconds=lease_seconds, create=False)
    print(f"Reviewing {db_path}: open http://{host}:{port}/ ({db.progress()['total']} items)")
    uvicorn.run(create_app(db), host=host, port=port, log_level="warning")
