"""The Slurm scripts' policy (ldot.slurm) without a cluster: argument parsing, expansion of the site's
roots, the requeue decision, the env file the scripts source, and the refusals of bad input (one line,
exit 2) at submission and in a job's first seconds, through the real bash scripts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ldot.slurm import job
from ldot.slurm.__main__ import main, write_env
from ldot.slurm.job import SlurmError

from ldot.errors import EXIT_BAD_INPUT, EXIT_REQUEUE

ROOT = Path(__file__).resolve().parents[2]
ENV = {"LDOT_DATA_ROOT": "/data/ldot", "LDOT_OUTPUT_ROOT": "/scratch/me"}


# -- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, config, overrides, eval_data", [
    ([], "default.yaml", (), None),
    (["optim.lr=1e-5"], "default.yaml", ("optim.lr=1e-5",), None),
    (["--eval", "${LDOT_DATA_ROOT}/f30k/test", "my.yaml", "data.train=$LDOT_DATA_ROOT/f30k/train"],
     "my.yaml", ("data.train=/data/ldot/f30k/train",), "/data/ldot/f30k/test"),
    (["--eval=/abs/test", "my.yaml"], "my.yaml", (), "/abs/test"),
    (["my.yaml", "output_dir=${LDOT_OUTPUT_ROOT}/mine", "x=${LDOT_DATA_ROOT}:${LDOT_DATA_ROOT}"], "my.yaml",
     ("output_dir=/scratch/me/mine", "x=/data/ldot:/data/ldot"), None),
])
def test_train_arguments(argv, config, overrides, eval_data):
    args = job.parse_train_args(argv, "default.yaml", ENV)
    assert (args.config, args.overrides, args.eval_data) == (config, overrides, eval_data)


@pytest.mark.parametrize("argv, message", [
    (["--eval"], "--eval needs a dataset directory"),
    (["--eval="], "--eval needs a dataset directory"),
    (["--evl", "x"], "unknown option --evl (options: --eval DIR; then CONFIG and key=value overrides)"),
    (["my.yaml", "optim.lr=1", "other.yaml"], "'other.yaml' is not key=value"),
])
def test_train_argument_errors(argv, message):
    with pytest.raises(SlurmError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        job.parse_train_args(argv, "default.yaml", ENV)


def test_expansion_of_the_site_roots():
    assert job.expand("${LDOT_DATA_ROOT}/a", ENV) == "/data/ldot/a"
    assert job.expand("$LDOT_OUTPUT_ROOT/b", ENV) == "/scratch/me/b"
    assert job.expand("$LDOT_DATA_ROOTS/c", ENV) == "$LDOT_DATA_ROOTS/c"  # another name: left alone
    assert job.expand("plain", {}) == "plain"


@pytest.mark.parametrize("arg, env, message", [
    ("data.train=${LDOT_DATA_ROOT}/x", {}, "'data.train=${LDOT_DATA_ROOT}/x' uses $LDOT_DATA_ROOT, which is not set"),
    ("$LDOT_OUTPUT_ROOT/x", {"LDOT_OUTPUT_ROOT": ""}, "'$LDOT_OUTPUT_ROOT/x' uses $LDOT_OUTPUT_ROOT, which is not set"),
    ("data.train=${LDOT_DATAROOT}/x", ENV, "only ${LDOT_DATA_ROOT} and ${LDOT_OUTPUT_ROOT} are expanded, not ${LDOT_DATAROOT}"),
])
def test_expansion_refuses_in_one_line(arg, env, message):
    with pytest.raises(SlurmError) as err:
        job.expand(arg, env)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sweep_entries(tmp_path):
    sweep = tmp_path / "lr.txt"
    sweep.write_text("# lr\noptim.lr=1e-5\n\n  optim.lr=3e-5   data.train=${LDOT_DATA_ROOT}/t  # two keys\nbroken\n")
    assert job.sweep_entries(sweep) == [["optim.lr=1e-5"], ["optim.lr=3e-5", "data.train=${LDOT_DATA_ROOT}/t"],
                                        ["broken"]]
    assert job.sweep_entry(sweep, "2", ENV) == (["optim.lr=3e-5", "data.train=/data/ldot/t"], 3)
    for index, message in [(None, f"not an array job: submit with sbatch --array=1-3 ({sweep} has 3 entries)"),
                           ("4", f"array index 4 is outside 1-3, the entries of {sweep}"),
                           ("3", f"{sweep} entry 3: 'broken' is not key=value")]:
        with pytest.raises(SlurmError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            job.sweep_entry(sweep, index, ENV)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(SlurmError, match="has no entries"):
        job.sweep_entries(tmp_path / "empty.txt")
    assert job.sweep_name(sweep, "1234", {}) == "lr-1234"
    assert job.sweep_name(sweep, "1234", {"LDOT_SWEEP": "mine"}) == "mine"


def test_eval_arguments():
    a = job.parse_eval_args(["mine", "${LDOT_OUTPUT_ROOT}/run/checkpoints/final", "$LDOT_DATA_ROOT/coco/train",
                             "--k", "50"], ENV)
    assert a.argv() == ["mine", "--checkpoint", "/scratch/me/run/checkpoints/final", "--data", "/data/ldot/coco/train",
                        "--out", "/scratch/me/run/checkpoints/final/hard_negatives/train", "--k", "50"]
    assert job.parse_eval_args(["ck", "data", "--out", "o"], ENV).argv() == [
        "recall", "--checkpoint", "ck", "--data", "data", "--out", "o"]
    with pytest.raises(SlurmError, match="^usage: sbatch slurm/eval.sbatch"):
        job.parse_eval_args(["mine", "ck"], ENV)


# -- names and places ----------------------------------------------------------------------------

def test_job_names_and_places():
    env = {**ENV, "SLURM_JOB_NAME": "ldot-finetune", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "8"}
    values = job.job_env(env)
    assert values == {"LDOT_OUTPUT_ROOT": "/scratch/me", "LDOT_LOG_ROOT": "/scratch/me/logs",
                      "LDOT_JOB_TAG": "ldot-finetune-42", "LDOT_LOG_DIR": "/scratch/me/logs/ldot-finetune-42",
                      "MLFLOW_TRACKING_URI": "sqlite:////scratch/me/mlflow.db", "OMP_NUM_THREADS": "8"}
    array = {**env, "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3", "LDOT_LOG_ROOT": "/logs",
             "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert job.job_tag(array) == "ldot-finetune-40_3"
    assert job.job_env(array)["LDOT_LOG_DIR"] == "/logs/ldot-finetune-40_3"
    assert job.job_env(array)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # the job's defaults first: the user's overrides win
    assert job.job_overrides(env, ["output_dir=/mine"]) == [
        "output_dir=/scratch/me/ldot-finetune-42", "tracking.run_name=ldot-finetune-42", "output_dir=/mine"]
    with pytest.raises(SlurmError, match="^LDOT_OUTPUT_ROOT is not set: copy slurm/site.env.example"):
        job.job_env({"SLURM_JOB_ID": "1"})
    with pytest.raises(SlurmError, match="not inside a Slurm job"):
        job.job_env(ENV)
    with pytest.raises(SlurmError, match="^LDOT_MAX_REQUEUES='x': not a whole number"):
        job.job_env({**env, "LDOT_MAX_REQUEUES": "x"})


# -- the requeue decision ------------------------------------------------------------------------

@pytest.mark.parametrize("exit_code, restarts, most, usr1, term, action, code, says", [
    # training done: go on to recall
    (0, 0, 20, False, False, "continue", 0, "training done"),
    (0, 5, 20, True, False, "continue", 0, "training done"),
    # the trainer checkpointed and left with 75: requeue while restarts remain
    (EXIT_REQUEUE, 0, 20, True, False, "requeue", 0, "requeueing (restart 1 of at most 20)"),
    (EXIT_REQUEUE, 19, 20, True, False, "requeue", 0, "requeueing (restart 20 of at most 20)"),
    (EXIT_REQUEUE, 0, 20, False, False, "requeue", 0, "requeueing (restart 1"),  # USR1 sent to the tasks only
    (EXIT_REQUEUE, 20, 20, True, False, "exit", EXIT_REQUEUE, "not requeued: restart 20 reached LDOT_MAX_REQUEUES=20"),
    (EXIT_REQUEUE, 0, 0, True, False, "exit", EXIT_REQUEUE, "not requeued: restart 0 reached LDOT_MAX_REQUEUES=0"),
    # SIGTERM: cancelled, out of time, or Slurm preempts (and requeues) the job itself
    (EXIT_REQUEUE, 0, 20, True, True, "exit", EXIT_REQUEUE, "not requeued by the script"),
    (EXIT_REQUEUE, 0, 20, False, True, "exit", EXIT_REQUEUE, "not requeued by the script"),
    # SIGUSR1 before training started
    (None, 0, 20, True, False, "requeue", 0, "SIGUSR1 came before training started; requeueing (restart 1"),
    (None, 0, 0, True, False, "exit", EXIT_REQUEUE, "SIGUSR1 came before training started; not requeued: restart 0"),
    # a task killed by a SIGUSR1 that beat its handler: still a preemption
    (138, 0, 20, True, False, "requeue", 0, "training ended with exit 138 after SIGUSR1: treated as preempted"),
    # failures: never requeued, the training's own exit code
    (1, 0, 20, False, False, "exit", 1, "training failed (exit 1): not requeued"),
    (138, 0, 20, True, True, "exit", 138, "training failed (exit 138)"),
    (EXIT_BAD_INPUT, 0, 20, True, False, "exit", EXIT_BAD_INPUT, "training failed (exit 2)"),
])
def test_requeue_decision(exit_code, restarts, most, usr1, term, action, code, says):
    d = job.decide(exit_code, restarts, most, usr1, term)
    assert (d.action, d.code) == (action, code) and says in d.message, d


# -- the bash side -------------------------------------------------------------------------------

def _bash(script: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_bash_exit_codes_are_ldot_errors():
    """common.sh keeps a copy of the two codes (it exits 2 before any Python is found): they agree."""
    proc = _bash(f"source {ROOT}/slurm/common.sh; echo $LDOT_EXIT_BAD_INPUT $LDOT_EXIT_REQUEUE")
    assert proc.stdout.split() == [str(EXIT_BAD_INPUT), str(EXIT_REQUEUE)]


def test_env_file_round_trips_through_bash(tmp_path):
    nasty = ["a b", "it's", 'say "hi"', "$HOME `id` $(id)", "tab\there", "new\nline", "", "*", "x=1;rm -rf /"]
    f = tmp_path / "env"
    write_env(f, {"ONE": nasty[3], "MANY": nasty, "EXPORTED": "e v"}, export=["EXPORTED"])
    proc = _bash(f"source {f}; printf '%s\\0' \"$ONE\" \"${{#MANY[@]}}\" \"${{MANY[@]}}\"; "
                 "bash -c 'printf %s \"$EXPORTED\"'; printf '\\0'")
    assert proc.stdout.split("\0")[:-1] == [nasty[3], str(len(nasty)), *nasty, "e v"]


def _dataset(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"num_images": 1}))
    return path


def _job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A batch job's environment, faked: what matters before srun, on no cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LDOT_", "MLFLOW_"))}
    env.update(LDOT_ROOT=str(ROOT), LDOT_SITE_ENV="/dev/null", LDOT_PYTHON=sys.executable,
               LDOT_OUTPUT_ROOT=str(tmp_path / "out"), LDOT_DATA_ROOT=str(tmp_path / "data"),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="ldot-finetune", PATH=f"{tmp_path / 'bin'}:{env['PATH']}")
    (tmp_path / "bin").mkdir(exist_ok=True)
    srun = tmp_path / "bin" / "srun"  # a job that gets as far as srun records it and stops there
    srun.write_text(f"#!/bin/sh\necho \"$@\" >>{tmp_path / 'srun.calls'}\nexit 0\n")
    srun.chmod(0o755)
    env.update(extra)
    return env


def test_train_verb_writes_what_the_script_runs(tmp_path):
    """The train verb checks the job and answers with the trainer's arguments, expanded, the job's own
    defaults first, through the env file the script sources."""
    _dataset(tmp_path / "data" / "train")
    env = _job_env(tmp_path)
    proc = _bash("source slurm/common.sh; ldot_setup; ldot_train_job finetune "
                 "--eval '${LDOT_DATA_ROOT}/train' train/configs/demo.yaml 'data.train=${LDOT_DATA_ROOT}/train' "
                 "optim.max_steps=3; printf '%s\\n' \"${LDOT_TRAIN_ARGS[@]}\"", env=env)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "out" / "ldot-finetune-4242"
    assert proc.stdout.splitlines()[-8:] == [
        "--config", "train/configs/demo.yaml", f"output_dir={run_dir}", "tracking.run_name=ldot-finetune-4242",
        f"data.train={tmp_path}/data/train", "optim.max_steps=3", "--resume", "auto"]
    calls = (tmp_path / "srun.calls").read_text().splitlines()
    assert "-m ldot.train --config train/configs/demo.yaml" in calls[0]
    assert f"-m ldot.eval recall --checkpoint {run_dir}/checkpoints/final --data {tmp_path}/data/train" in calls[1]
    log = (tmp_path / "out" / "logs" / "ldot-finetune-4242" / "job.log").read_text()
    assert f"config train/configs/demo.yaml; outputs in {run_dir}" in log
    assert (tmp_path / "out" / "mlflow.db").is_file()  # the store readied before any task starts


@pytest.mark.parametrize("args, message", [
    # a typo in --eval: refused before training, not after it
    (["--eval", "${LDOT_DATA_ROOT}/tset", "train/configs/demo.yaml", "data.train=${LDOT_DATA_ROOT}/train"],
     "--eval: no dataset directory at {data}/tset"),
    (["train/configs/demo.yaml", "data.train=${LDOT_DATA_ROOT}/train", "data.val=${LDOT_DATA_ROOT}/vall"],
     "data.val: no dataset directory at {data}/vall"),
    (["train/configs/demo.yaml", "data.train=${LDOT_DATA_ROOT}/train", "model.init_from=${LDOT_DATA_ROOT}/train"],
     "model.init_from: {data}/train is not an exported ldot checkpoint (no ldot.json)"),
    (["train/configs/demo.yaml", "data.train=${LDOT_DATA_ROOT}/train", "optim.no_such_key=1"],
     "unknown config key in section 'optim': no_such_key"),
    (["train/configs/dmeo.yaml"], "config not found: train/configs/dmeo.yaml (paths are relative to the checkout"),
    (["train/configs/demo.yaml", "data.train=${LDOT_DATAROOT}/train"],
     "'data.train=${LDOT_DATAROOT}/train': only ${LDOT_DATA_ROOT} and ${LDOT_OUTPUT_ROOT} are expanded"),
])
def test_bad_job_input_is_refused_before_srun_in_one_line(tmp_path, args, message):
    """Exit 2 with one line naming the key or path, in the .out (stderr) and in job.log, and no srun."""
    _dataset(tmp_path / "data" / "train")
    env = _job_env(tmp_path)
    quoted = " ".join("'" + a + "'" for a in args)
    proc = _bash(f"source slurm/common.sh; ldot_setup; ldot_train_job finetune {quoted}", env=env)
    message = message.replace("{data}", str(tmp_path / "data"))
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("ldot-slurm: error: ") and message in errors[0], proc.stderr
    job_log = (tmp_path / "out" / "logs" / "ldot-finetune-4242" / "job.log").read_text()
    assert message in job_log.splitlines()[-1]
    assert not (tmp_path / "srun.calls").exists()


def test_submit_refuses_an_output_root_it_cannot_create(tmp_path):
    (tmp_path / "afile").write_text("")
    env = _job_env(tmp_path, LDOT_OUTPUT_ROOT=str(tmp_path / "afile" / "runs"))
    proc = subprocess.run([str(ROOT / "slurm" / "submit"), "slurm/finetune.sbatch"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip() == (f"error: LDOT_OUTPUT_ROOT: {tmp_path}/afile/runs cannot be created: "
                                   f"{tmp_path}/afile is a file")


def test_submit_checks_every_path_before_sbatch(tmp_path):
    """A typo in --eval is refused at submission: sbatch (here a stand-in that would record it) never runs."""
    _dataset(tmp_path / "data" / "train")
    env = _job_env(tmp_path)
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text(f"#!/bin/sh\necho \"$@\" >>{tmp_path / 'sbatch.calls'}\necho 'Submitted batch job 7'\n")
    sbatch.chmod(0o755)
    submit = [str(ROOT / "slurm" / "submit"), "--time=5", "slurm/finetune.sbatch"]
    good = ["train/configs/demo.yaml", "data.train=${LDOT_DATA_ROOT}/train"]
    proc = subprocess.run([*submit, "--eval", "${LDOT_DATA_ROOT}/tset", *good], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip() == f"error: --eval: no dataset directory at {tmp_path}/data/tset"
    assert not (tmp_path / "sbatch.calls").exists()

    proc = subprocess.run([*submit, "--eval", "${LDOT_DATA_ROOT}/train", *good], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "Submitted batch job 7\n", proc.stderr
    # the site's options first, the user's after them; arguments passed on unexpanded (the job expands)
    assert (tmp_path / "sbatch.calls").read_text().split() == [
        f"--output={tmp_path}/out/logs/%x-%j.out", "--time=5", "slurm/finetune.sbatch", "--eval",
        "${LDOT_DATA_ROOT}/train", *good]


def test_decide_verb_answers_through_the_env_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("LDOT_MAX_REQUEUES", "2")
    f = tmp_path / "env"
    assert main(["decide", "--env-file", str(f), "--exit-code", "75", "--usr1", "1", "--term", "0"]) == 0
    assert f.read_text() == "LDOT_DECISION=exit\nLDOT_DECISION_CODE=75\n"
    assert "not requeued: restart 2 reached LDOT_MAX_REQUEUES=2" in capsys.readouterr().out
    assert main(["decide", "--env-file", str(f), "--exit-code", "75", "--usr1", "yes", "--term", "0"]) == 2
    assert f.read_text() == "LDOT_ERROR='--usr1 takes 0 or 1, not '\"'\"'yes'\"'\"''\n"
