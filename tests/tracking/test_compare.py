"""`ldot eval compare`: two runs side by side (the params that differ, best AR, R@1 both ways,
samples/s) and a PNG of their curves, read from a sqlite store through the MLflow client."""
import math

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ldot.eval.__main__ import main


def _run(client, exp, name, lr, speed, best_ar):
    run = client.create_run(exp, run_name=name)
    rid = run.info.run_id
    params = {"optim.lr": lr, "data.batch_size": "16", "world_size": "2"}
    metrics = [Metric("loss/cmr", 3.0 * math.exp(-s / (20 if lr == "1e-4" else 10)), 1000 + s, s) for s in range(1, 61)]
    metrics += [Metric("samples_per_s", speed + (s % 3), 1000 + s, s) for s in range(1, 61)]
    for step, frac in ((20, 0.6), (40, 1.0), (60, 0.9)):
        metrics += [Metric("val/ar", best_ar * frac, 2000 + step, step),
                    Metric("val/tr_r1", 0.5 * best_ar * frac, 2000 + step, step),
                    Metric("val/ir_r1", 0.4 * best_ar * frac, 2000 + step, step)]
    metrics += [Metric("test/ar", best_ar - 0.05, 3000, 60), Metric("test/tr_r1", 0.3, 3000, 60),
                Metric("test/ir_r1", 0.2, 3000, 60)]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(rid)
    return rid


def test_compare_two_runs_prints_what_differs_and_plots(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    a = _run(client, exp, "lr-small", "1e-4", 100.0, 0.50)
    _run(client, exp, "lr-large", "3e-4", 80.0, 0.70)  # named by its run name below
    client.create_run(exp, run_name="other-experiment-noise")  # a third run, not asked for

    png = tmp_path / "cmp.png"
    assert main(["compare", "--tracking-uri", uri, "--runs", a, "lr-large", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if "lr-small" in line)
    assert header.index("lr-small") < header.index("lr-large")
    lr_row = next(line for line in lines if line.startswith("| optim.lr |"))
    assert "1e-4" in lr_row and "3e-4" in lr_row
    assert not any(line.startswith("| data.batch_size |") for line in lines), "equal params are not listed"
    assert "| best val AR % (step) | 50.0 (40) | 70.0 (40) |" in out
    assert "| val R@1 % TR / IR | 25.0 / 20.0 | 35.0 / 28.0 |" in out
    assert "| test R@1 % TR / IR | 30.0 / 20.0 | 30.0 / 20.0 |" in out
    assert "| samples/s (median) | 101.0 | 81.0 |" in out
    assert png.is_file() and png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"

    # the newest runs of an experiment by default; a directory stands for its mlflow.db
    assert main(["compare", "--tracking-uri", str(tmp_path), "--experiment", "cmp", "--out", str(png)]) == 0
    assert "other-experiment-noise" in capsys.readouterr().out


def test_compare_names_a_missing_run_in_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    assert main(["compare", "--tracking-uri", uri, "--runs", "nope"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # MLflow may log before it
    assert last.startswith("error: no run with id or name 'nope'")


@pytest.mark.parametrize("n", [5, 500])
def test_smoothing_keeps_the_steps(n):
    from ldot.eval.compare import _smooth

    pts = [(s, float(s % 7)) for s in range(n)]
    out = _smooth(pts)
    assert [s for s, _ in out] == [s for s, _ in pts]


def test_smoothing_is_a_trailing_mean_over_a_fiftieth_of_the_points():
    from ldot.eval.compare import _smooth

    # 250 points: a window of 250 // 50 = 5 points. A ramp with one spike of 5 at index 100.
    pts = [(10 * i, i + (5.0 if i == 100 else 0.0)) for i in range(250)]
    # By hand: while the window fills, the mean of 0..i is i/2; then the mean of i-4..i is i-2, plus 5/5
    # at the 5 points whose window holds the spike.
    want = [i / 2 if i < 4 else i - 2 + (1.0 if 100 <= i <= 104 else 0.0) for i in range(250)]
    out = _smooth(pts)
    assert [s for s, _ in out] == [s for s, _ in pts]
    assert [v for _, v in out] == pytest.approx(want, abs=1e-9)
    assert _smooth(pts[:200]) == pts[:200]  # 200 points or fewer are drawn as they are
