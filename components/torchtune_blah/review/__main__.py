"""python -m torchtune_blah.review {import,add-reviewer,rotate-token,revoke-reviewer,reviewers,serve,stats,export}:
the review tool's command line. Only ``import --create`` makes a new database file; every other
command refuses a --db that does not exist (a mistyped path never becomes an empty database)."""

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Optional, Sequence

from torchtune_blah.review.db import ReviewDB, ReviewError
from torchtune_blah.review.sources import SourceError, read_items


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchtune_blah.review",
                                     description="Experts review the model's least certain answers.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="add blah_eval / blah_generate outputs to the review database")
    imp.add_argument("--db", required=True, help="the SQLite file")
    imp.add_argument("--create", action="store_true", help="make --db if it does not exist (else that is an error)")
    imp.add_argument("files", nargs="+", help="predictions.jsonl, review_queue.jsonl or generations.jsonl")
    add = sub.add_parser("add-reviewer", help="create a reviewer and print their token (shown once)")
    add.add_argument("--db", required=True)
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may resolve disagreements and release leases")
    add.add_argument("--expires-days", type=float, default=None, help="the token stops working after this many days")
    rot = sub.add_parser("rotate-token", help="a new token for a reviewer (the old one stops working at once)")
    rot.add_argument("--db", required=True)
    rot.add_argument("name")
    rot.add_argument("--expires-days", type=float, default=None, help="the new token stops working after this many days")
    rev = sub.add_parser("revoke-reviewer", help="a reviewer's token stops working at once (their decisions stay)")
    rev.add_argument("--db", required=True)
    rev.add_argument("name")
    who = sub.add_parser("reviewers", help="list the reviewers")
    who.add_argument("--db", required=True)
    srv = sub.add_parser("serve", help="the review web app")
    srv.add_argument("--db", required=True)
    srv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--lease-seconds", type=float, default=600.0,
                     help="how long a reviewer holds an item before another may take it (default 600)")
    srv.add_argument("--overlap", type=int, default=None,
                     help="how many different reviewers see each item (stored in the database; default 1)")
    srv.add_argument("--guidelines", default=None, help="a Markdown file shown on the page")
    srv.add_argument("--allowed-host", action="append", default=[],
                     help="a Host name the server answers to (default: the --host, or localhost)")
    st = sub.add_parser("stats", help="agreement and per-reviewer numbers (JSON)")
    st.add_argument("--db", required=True)
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
            new = not os.path.exists(args.db)
            added = ReviewDB(args.db, create=args.create).import_items(items)
            print(f"{args.db}: {'created; ' if new else ''}{added} new items ({len(items) - added} already there)")
        elif args.command in ("add-reviewer", "rotate-token"):
            db = ReviewDB(args.db, create=False)
            if args.command == "add-reviewer":
                token = db.add_reviewer(args.name, admin=args.admin, expires_days=args.expires_days)
            else:
                token = db.rotate_token(args.name, expires_days=args.expires_days)
            print(f"{args.name}{' (admin)' if getattr(args, 'admin', False) else ''}: {token}\n(give this token to "
                  f"{args.name}; it is not stored and cannot be shown again"
                  + (f"; it expires in {args.expires_days:g} days" if args.expires_days else "") + ")")
        elif args.command == "revoke-reviewer":
            ReviewDB(args.db, create=False).revoke_reviewer(args.name)
            print(f"{args.name}: token revoked (their decisions stay; `rotate-token {args.name}` gives a new one)")
        elif args.command == "reviewers":
            for r in ReviewDB(args.db, create=False).reviewers():
                state = (f"  revoked {r['revoked_at']}" if r["revoked_at"] else
                         f"  token expires {datetime.fromtimestamp(r['expires_at'], timezone.utc).isoformat(timespec='seconds')}"
                         if r["expires_at"] else "")
                print(f"{r['name']}{' (admin)' if r['admin'] else ''}  since {r['created_at']}{state}")
        elif args.command == "serve":
            from torchtune_blah.review.server import serve

            serve(args.db, host=args.host, port=args.port, lease_seconds=args.lease_seconds, overlap=args.overlap,
                  guidelines_path=args.guidelines, allowed_hosts=args.allowed_host)
        elif args.command == "stats":
            from torchtune_blah.review.agreement import stats

            print(json.dumps(stats(ReviewDB(args.db, create=False)), indent=2))
        else:
            result = ReviewDB(args.db, create=False).export(args.out, since=args.since, overwrite=args.overwrite)
            print(f"{args.out}: {result['written']} reviewed questions; {result['pending']} items partly reviewed "
                  f"(fewer reviewers than the overlap); {len(result['unresolved'])} in disagreement"
                  + (f" (an admin resolves them on the page): {', '.join(result['unresolved'])}"
                     if result["unresolved"] else ""))
    except (ReviewError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
