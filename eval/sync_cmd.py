"""`ldot eval sync DIR`: send the MLflow records a job left in its outbox (the tracking server was
away when it ended). Safe to run any number of times: what the server has is not recorded twice."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("sync", help="send the MLflow records left in DIR/mlflow_outbox by a job")
    p.add_argument("dir", help="a training output directory (or any directory holding mlflow_outbox folders)")
    p.add_argument("--tracking-uri", help="send to this tracking URI instead of the one each record names")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from ldot.tracking.outbox import sync

    logging.getLogger("ldot.tracking").setLevel(logging.INFO)
    left = sync(args.dir, args.tracking_uri)
    if left:
        print(f"error: {left} records are still waiting (is the tracking server up?); run this again later",
              file=sys.stderr)
        return 1
    return 0
