"""Fixtures shared by the review tool's tests: a real blah_eval output, synthetic model outputs, the
web app running on 127.0.0.1."""

import json
import os
import random
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from torchtune_blah.data.squad import load_squad_records
from torchtune_blah.review.db import ReviewDB


@pytest.fixture(scope="session")
def eval_output(trained_run, tmp_path_factory):
    """A real blah_eval output folder (tiny trained run, 24 dev questions)."""
    from torchtune_blah.recipes.blah_eval import BlahEvalRecipe

    out = tmp_path_factory.mktemp("review_eval") / "eval"
    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", "demo_cpu_blah_eval.yaml")),
                          OmegaConf.from_dotlist([f"run_dir={trained_run}", f"output_dir={out}",
                                                  "dataset.max_examples=24", "review_queue_size=null"]))
    recipe = BlahEvalRecipe(cfg)
    recipe.setup()
    recipe.evaluate()
    return out


def synthetic_generations(path, n, seed=0):
    """A generations.jsonl-shaped file over real dev questions, with made-up model answers (for
    queue mechanics only: no accuracy is read from it)."""
    rng = random.Random(seed)
    records = load_squad_records("bundled_sample")[:n]
    with open(path, "w") as f:
        for r in records:
            answer = r.answers[0] if r.answers and rng.random() < 0.7 else "?"
            f.write(json.dumps({"id": r.id, "title": r.title, "context": r.context, "question": r.question,
                                "model_answer": answer,
                                "prediction": "" if answer == "?" else answer, "na_prob": rng.random(),
                                "raw_output": f'\n```json\n{{\n  "answer": "{answer}"\n}}', "run_dir": "/runs/x",
                                "stage": "lora"}) + "\n")
    return str(path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The web app on 127.0.0.1 (uvicorn in a thread) over a fresh database with reviewers ana, bo
    and cy and an admin, root: yields (db, url, {name: token})."""
    import uvicorn

    from torchtune_blah.review.server import create_app, server_config

    db = ReviewDB(str(tmp_path / "review.sqlite"))
    tokens = {name: db.add_reviewer(name, admin=name == "root") for name in ("ana", "bo", "cy", "root")}
    port = _free_port()
    srv = uvicorn.Server(server_config(create_app(db, guidelines="# Guidelines\nMark the shortest span."),
                                       host="127.0.0.1", port=port))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    yield db, f"http://127.0.0.1:{port}", tokens
    srv.should_exit = True
    thread.join(10)


def http_call(method, url, body=None, token=None, headers=None, raw=None):
    """(status, JSON answer) of one request; an error body that is not JSON comes back as {"error": text}."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    request = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"error": text.decode("utf-8", "replace")}


def leases(db):
    with sqlite3.connect(db.path) as conn:
        return sorted(conn.execute("SELECT item_id, reviewer FROM leases").fetchall())
