"""Put the human back in the loop: experts review the model's least certain answers.

- ``db.ReviewDB``: the SQLite store (stdlib ``sqlite3``, WAL): items to review, leases so two
  reviewers never hold the same item, and every decision as an appended row (an undo is a row
  too: nothing is overwritten).
- ``sources``: reading ``blah_eval``'s ``predictions.jsonl`` / ``review_queue.jsonl`` and
  ``blah_generate``'s ``generations.jsonl`` into items.
- ``server``: the local web app (Starlette + a static page, no build step, nothing from a CDN).
- ``python -m torchtune_blah.review {serve,import,export}``: the command line.
"""
