"""python -m torchtune_blah.review {serve,import,export}: the review tool's command line."""

import argparse
import sys
from typing import Optional, Sequence

from torchtune_blah.review.db import ReviewDB, ReviewError
from torchtune_blah.review.sources import SourceError, read_items


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchtune_blah.review",
                                     description="Experts review the model's least certain answers.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="add blah_eval / blah_generate outputs to the review database")
    imp.add_argument("--db", required=True, help="the SQLite file (created if missing)")
    imp.add_argument("files", nargs="+", help="predictions.jsonl, review_queue.jsonl or generations.jsonl")
    srv = sub.add_parser("serve", help="the review web app")
    srv.add_argument("--db", required=True)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--lease-seconds", type=float, default=600.0,
                     help="how long a reviewer holds an item before another may take it (default 600)")
    exp = sub.add_parser("export", help="reviewed items as training records (JSONL)")
    exp.add_argument("--db", required=True)
    exp.add_argument("--out", required=True, help="corrections.jsonl (id, context, question, answers)")
    exp.add_argument("--since", default=None, help="only decisions after this ISO time")
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            # Every file is read and checked before the database is touched; then one transaction.
            items = [item for path in args.files for item in read_items(path)]
            added = ReviewDB(args.db).import_items(items)
            print(f"{args.db}: {added} new items ({len(items) - added} already there)")
        elif args.command == "serve":
            from torchtune_blah.review.server import serve

            serve(args.db, host=args.host, port=args.port, lease_seconds=args.lease_seconds)
        else:
            n = ReviewDB(args.db, create=False).export(args.out, since=args.since, overwrite=args.overwrite)
            print(f"{args.out}: {n} reviewed questions")
    except (ReviewError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
