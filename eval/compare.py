"""Runs side by side from MLflow: the params that differ, best validation AR, test recall, R@1 both
ways, throughput; and one figure of their loss and recall curves.

Reads through the MLflow client, so a sqlite store and a tracking server alike. Metric names are the
trainer's: `loss/<task>`, `samples_per_s`, `val/<k>` (validation during training), `test/<k>` (from
`ldot eval recall`), with k in ar, tr_r1, ir_r1, ...
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

Points = list[tuple[int, float]]


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    losses: dict[str, Points] = field(default_factory=dict)  # task -> (step, loss)
    val_ar: Points = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)  # val ar, tr_r1, ir_r1 at the best-AR step
    best_step: int | None = None
    test: dict[str, float] = field(default_factory=dict)  # ar, tr_r1, ir_r1
    samples_per_s: float | None = None  # median over steps (the first left out: warm-up)

    @property
    def steps(self) -> int | None:
        last = [pts[-1][0] for pts in self.losses.values() if pts]
        return max(last) if last else None


def _history(client, run_id: str, key: str) -> Points:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def find_runs(client, experiment: str | None = None, refs: list[str] | None = None, sweep: str | None = None,
              max_runs: int = 10) -> list:
    """Runs named by id or run name (`refs`), else the newest `max_runs` runs of the experiment (all
    experiments if none), optionally one sweep's members. Sweep parents hold no curves: left out."""
    from mlflow.exceptions import MlflowException

    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise LookupError(f"no experiment named {experiment!r}")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if refs:
        runs = []
        for ref in refs:
            try:
                runs.append(client.get_run(ref))
                continue
            except MlflowException:
                pass
            if "'" in ref:
                raise LookupError(f"no run {ref!r}")
            named = client.search_runs(exp_ids, f"attributes.run_name = '{ref}'", max_results=2)
            if len(named) != 1:
                raise LookupError(f"no run with id or name {ref!r}" if not named else
                                  f"{ref!r} names several runs: give the run id")
            runs.append(named[0])
        return runs
    flt = f"tags.`ldot.sweep` = '{sweep}'" if sweep else ""
    found = client.search_runs(exp_ids, flt, order_by=["attributes.start_time DESC"], max_results=max_runs * 2 + 10)
    runs = [r for r in found if "ldot.sweep_parent" not in r.data.tags][:max_runs]
    if not runs:
        raise LookupError("no runs found" + (f" in experiment {experiment!r}" if experiment else ""))
    return runs[::-1]  # oldest first


def summarize(client, run) -> RunSummary:
    run_id, metrics = run.info.run_id, run.data.metrics
    s = RunSummary(run_id=run_id, name=run.info.run_name or run_id[:8], status=run.info.status,
                   params=dict(run.data.params))
    for key in sorted(metrics):
        if key.startswith("loss/"):
            s.losses[key[len("loss/"):]] = _history(client, run_id, key)
    if "val/ar" in metrics:
        s.val_ar = _history(client, run_id, "val/ar")
        s.best_step, best_ar = max(s.val_ar, key=lambda p: (p[1], -p[0]))
        s.best["ar"] = best_ar
        for k in ("tr_r1", "ir_r1"):
            at = dict(_history(client, run_id, f"val/{k}")) if f"val/{k}" in metrics else {}
            if s.best_step in at:
                s.best[k] = at[s.best_step]
    s.test = {k: metrics[f"test/{k}"] for k in ("ar", "tr_r1", "ir_r1") if f"test/{k}" in metrics}
    if "samples_per_s" in metrics:
        speeds = [v for _, v in _history(client, run_id, "samples_per_s")]
        s.samples_per_s = statistics.median(speeds[1:] if len(speeds) > 2 else speeds)
    return s


def differing_params(summaries: list[RunSummary]) -> dict[str, list[str | None]]:
    keys = sorted(set().union(*(s.params for s in summaries)))
    table = {k: [s.params.get(k) for s in summaries] for k in keys}
    return {k: v for k, v in table.items() if len(set(v)) > 1}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cell(text: str, width: int = 40) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def format_comparison(summaries: list[RunSummary]) -> str:
    """A Markdown table, one column per run: outcome rows, then every param whose value differs."""
    def row(label: str, cells) -> str:
        return f"| {label} | " + " | ".join(_cell(c) for c in cells) + " |"

    lines = [row("", [s.name for s in summaries]), "|" + "---|" * (len(summaries) + 1),
             row("run id", [s.run_id[:12] for s in summaries]),
             row("status", [s.status for s in summaries]),
             row("steps", ["–" if s.steps is None else str(s.steps) for s in summaries])]
    tasks = sorted(set().union(*(s.losses for s in summaries)))
    for task in tasks:
        lines.append(row(f"final loss/{task}", [f"{s.losses[task][-1][1]:.4f}" if s.losses.get(task) else "–"
                                                for s in summaries]))
    lines += [
        row("best val AR % (step)", [f"{_pct(s.best.get('ar'))} ({s.best_step})" if s.best else "–" for s in summaries]),
        row("val R@1 % TR / IR", [f"{_pct(s.best.get('tr_r1'))} / {_pct(s.best.get('ir_r1'))}" if s.best else "–"
                                  for s in summaries]),
        row("test AR %", [_pct(s.test.get("ar")) for s in summaries]),
        row("test R@1 % TR / IR", [f"{_pct(s.test.get('tr_r1'))} / {_pct(s.test.get('ir_r1'))}" if s.test else "–"
                                   for s in summaries]),
        row("samples/s (median)", ["–" if s.samples_per_s is None else f"{s.samples_per_s:.1f}" for s in summaries]),
    ]
    diff = differing_params(summaries)
    if diff:
        lines.append(row("**params that differ**", ["" for _ in summaries]))
        lines += [row(k, ["–" if v is None else v for v in values]) for k, values in diff.items()]
    else:
        lines.append(row("**params**", ["all equal" for _ in summaries]))
    return "\n".join(lines)


def _smooth(points: Points) -> Points:
    if len(points) <= 200:
        return points
    w = max(2, len(points) // 50)
    values = [v for _, v in points]
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - w] if i >= w else 0.0)
        out.append((points[i][0], acc / min(i + 1, w)))
    return out


def plot_comparison(summaries: list[RunSummary], path: str | Path) -> Path:
    """Loss per task (left) and recall (right: validation AR by step, test AR as a star) of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    tasks = sorted(set().union(*(s.losses for s in summaries)))
    any_recall = False
    for i, s in enumerate(summaries):
        color = colors[i % len(colors)]
        for j, task in enumerate(tasks):
            pts = s.losses.get(task)
            if not pts:
                continue
            if len(pts) > 200:
                ax_loss.plot(*zip(*pts), color=color, alpha=0.2, linewidth=0.8)
            ax_loss.plot(*zip(*_smooth(pts)), color=color, linestyle=styles[j % len(styles)],
                         label=f"{s.name} · {task}" if len(tasks) > 1 else s.name)
        if s.val_ar:
            any_recall = True
            steps, values = zip(*s.val_ar)
            ax_rec.plot(steps, [100 * v for v in values], color=color, marker="o", markersize=3,
                        label=f"{s.name} · val AR")
        if "ar" in s.test:
            any_recall = True
            ax_rec.plot([s.steps or 0], [100 * s.test["ar"]], color=color, marker="*", markersize=14,
                        linestyle="none", label=f"{s.name} · test AR")
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_rec.set(title="recall", xlabel="step", ylabel="AR (%)")
    for ax in (ax_loss, ax_rec):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not any_recall:
        ax_rec.text(0.5, 0.5, "no recall recorded\n(eval.every_steps, or ldot eval recall)",
                    ha="center", va="center", transform=ax_rec.transAxes, color="gray")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
