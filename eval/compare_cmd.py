"""`ldot eval compare`: runs side by side from MLflow (a sqlite store or a server) and a PNG of
their loss and recall curves."""
from __future__ import annotations

import json
import os
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="runs side by side from MLflow, with a plot of loss and recall curves")
    p.add_argument("--experiment", help="experiment name (default: every experiment)")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="run ids or run names (default: the newest runs)")
    p.add_argument("--sweep", help="only the members of this sweep (tag ldot.sweep)")
    p.add_argument("--max-runs", type=int, default=10, help="how many of the newest runs (default 10)")
    p.add_argument("--tracking-uri", help="a server URL, a sqlite:/// URI, or a training output directory "
                                          "(default: MLFLOW_TRACKING_URI)")
    p.add_argument("--out", default="compare.png", help="the plot (default: compare.png)")
    p.set_defaults(func=run)


def tracking_uri(given: str | None) -> str:
    """--tracking-uri as given; a directory means its mlflow.db (or the run its mlflow_run.json names)."""
    from ldot.eval.errors import EvalError

    if given and Path(given).is_dir():
        d = Path(given)
        if (d / "mlflow.db").is_file():
            return f"sqlite:///{(d / 'mlflow.db').resolve()}"
        if (d / "mlflow_run.json").is_file():
            return json.loads((d / "mlflow_run.json").read_text())["tracking_uri"]
        raise EvalError(f"{d} holds neither mlflow.db nor mlflow_run.json")
    if given:
        return given
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise EvalError("no tracking store: pass --tracking-uri (a server URL, sqlite:///PATH, or an output "
                      "directory such as out/demo/run) or set MLFLOW_TRACKING_URI")


def run(args) -> int:
    from mlflow.tracking import MlflowClient

    from ldot.eval.compare import find_runs, format_comparison, plot_comparison, summarize
    from ldot.eval.errors import EvalError
    from ldot.tracking.outbox import limit_mlflow_retries

    limit_mlflow_retries()
    uri = tracking_uri(args.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        runs = find_runs(client, args.experiment, args.runs, args.sweep, args.max_runs)
    except LookupError as exc:
        raise EvalError(f"{exc.args[0]} ({uri})") from None
    summaries = [summarize(client, r) for r in runs]
    print(f"\n{len(summaries)} runs from {uri} (recall in percent; TR = image->text, IR = text->image)\n")
    print(format_comparison(summaries))
    path = plot_comparison(summaries, args.out)
    print(f"\nloss and recall curves: {path}")
    return 0
