"""The Slurm jobs' policy, as plain functions: what the sbatch scripts and slurm/submit decide.

The bash side (slurm/common.sh) keeps only what must run in the batch shell: sourcing the site file,
module load and activation, srun, the signal traps and `scontrol requeue`. Everything it decides comes
from here, through `python -m ldot.slurm VERB` (slurm/__main__.py):

  - a training script's arguments, `[--eval DIR] [CONFIG] [key=value ...]` (parse_train_args), and a
    sweep file's entries (sweep_entries, sweep_entry);
  - `${LDOT_DATA_ROOT}` / `${LDOT_OUTPUT_ROOT}` in them (expand);
  - the job's names and places: its tag, run and log directories, the store (job_env, job_overrides);
  - after training, whether to go on, requeue or stop (decide).

Standard library only: it runs on the batch node before anything heavy is imported.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ldot.errors import EXIT_BAD_INPUT, EXIT_REQUEUE, LdotError

ROOT_VARS = ("LDOT_DATA_ROOT", "LDOT_OUTPUT_ROOT")
_ROOT_REF = re.compile(r"\$\{(LDOT_DATA_ROOT|LDOT_OUTPUT_ROOT)\}|\$(LDOT_DATA_ROOT|LDOT_OUTPUT_ROOT)(?![A-Za-z0-9_])")
_OTHER_REF = re.compile(r"\$\{([^}]*)\}")

# The recipe each training script uses when no CONFIG is given (sweep.sbatch fine-tunes).
DEFAULT_CONFIGS = {
    "pretrain": "train/configs/pretrain-paper.yaml",
    "finetune": "train/configs/finetune-flickr30k.yaml",
    "sweep": "train/configs/finetune-flickr30k.yaml",
}
TRAIN_USAGE = "[--eval DIR] [CONFIG] [key=value ...]"
SWEEP_USAGE = f"usage: sbatch --array=1-N slurm/sweep.sbatch SWEEP_FILE {TRAIN_USAGE}"
EVAL_USAGE = "usage: sbatch slurm/eval.sbatch [recall|mine] CHECKPOINT DATA [eval options]"
DEFAULT_MAX_REQUEUES = 20


class SlurmError(LdotError):
    """A bad submission, site setting or job argument: one line, exit 2, never requeued."""


# -- arguments -----------------------------------------------------------------------------------

def expand(arg: str, env: Mapping[str, str]) -> str:
    """`${LDOT_DATA_ROOT}` and `${LDOT_OUTPUT_ROOT}` (or `$NAME`) in an argument become the site's roots,
    so one command line or sweep file serves every site. Any other `${...}` is refused: the scripts
    expand nothing else, and a misspelt root would otherwise become a path that does not exist."""
    def root(match: re.Match) -> str:
        var = match.group(1) or match.group(2)
        value = env.get(var, "")
        if not value:
            raise SlurmError(f"'{arg}' uses ${var}, which is not set (slurm/site.env or the environment)")
        return value

    for match in _OTHER_REF.finditer(arg):
        if match.group(1) not in ROOT_VARS:
            raise SlurmError(f"'{arg}': only ${{LDOT_DATA_ROOT}} and ${{LDOT_OUTPUT_ROOT}} are expanded, "
                             f"not ${{{match.group(1)}}}")
    return _ROOT_REF.sub(root, arg)


@dataclass(frozen=True)
class TrainArgs:
    config: str
    overrides: tuple[str, ...]  # the user's, expanded
    eval_data: str | None       # --eval DIR, expanded


def parse_train_args(argv: Sequence[str], default_config: str, env: Mapping[str, str]) -> TrainArgs:
    """`[--eval DIR] [CONFIG] [key=value ...]`: options first, then the config (the first argument
    without '='), then overrides."""
    argv, eval_data, i = list(argv), None, 0
    while i < len(argv) and argv[i].startswith("--"):
        arg = argv[i]
        if arg == "--eval":
            if i + 1 >= len(argv) or not argv[i + 1]:
                raise SlurmError("--eval needs a dataset directory")
            eval_data, i = expand(argv[i + 1], env), i + 2
        elif arg.startswith("--eval="):
            if not arg[len("--eval="):]:
                raise SlurmError("--eval needs a dataset directory")
            eval_data, i = expand(arg[len("--eval="):], env), i + 1
        else:
            raise SlurmError(f"unknown option {arg} (options: --eval DIR; then CONFIG and key=value overrides)")
    config = default_config
    if i < len(argv) and "=" not in argv[i]:
        config, i = argv[i], i + 1
    overrides = []
    for arg in argv[i:]:
        if "=" not in arg:
            raise SlurmError(f"'{arg}' is not key=value (arguments: {TRAIN_USAGE}; CONFIG comes first)")
        overrides.append(expand(arg, env))
    return TrainArgs(config=config, overrides=tuple(overrides), eval_data=eval_data)


def sweep_entries(path: str | Path) -> list[list[str]]:
    """A sweep file's entries: one a line, whitespace-separated key=value overrides; `#` starts a
    comment; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise SlurmError(f"sweep file not found: {p} (paths are relative to the checkout)")
    entries = []
    for line in p.read_text().splitlines():
        items = line.split("#", 1)[0].split()
        if items:
            entries.append(items)
    if not entries:
        raise SlurmError(f"sweep file {p} has no entries")
    return entries


def sweep_entry(path: str | Path, index: str | None, env: Mapping[str, str]) -> tuple[list[str], int]:
    """Entry `index` (counted from 1: the array task id) of a sweep file, expanded; and how many there are."""
    entries = sweep_entries(path)
    if not index:
        raise SlurmError(f"not an array job: submit with sbatch --array=1-{len(entries)} "
                         f"({path} has {len(entries)} entries)")
    if not index.isdigit() or not 1 <= int(index) <= len(entries):
        raise SlurmError(f"array index {index} is outside 1-{len(entries)}, the entries of {path}")
    entry = entries[int(index) - 1]
    for item in entry:
        if "=" not in item:
            raise SlurmError(f"{path} entry {index}: '{item}' is not key=value")
    return [expand(item, env) for item in entry], len(entries)


def sweep_name(path: str | Path, array_job_id: str, env: Mapping[str, str]) -> str:
    """The sweep's parent run name: $LDOT_SWEEP, else the file's stem and the array id (finetune-lr-1234)."""
    return env.get("LDOT_SWEEP") or f"{Path(path).stem}-{array_job_id}"


@dataclass(frozen=True)
class EvalArgs:
    command: str       # recall | mine
    checkpoint: str
    data: str
    options: tuple[str, ...]

    def argv(self) -> list[str]:
        """`ldot eval` arguments; `mine` writes beside the checkpoint unless --out is given."""
        extra: list[str] = []
        if self.command == "mine" and not any(o == "--out" or o.startswith("--out=") for o in self.options):
            extra = ["--out", str(Path(self.checkpoint) / "hard_negatives" / Path(self.data).name)]
        return [self.command, "--checkpoint", self.checkpoint, "--data", self.data, *extra, *self.options]


def parse_eval_args(argv: Sequence[str], env: Mapping[str, str]) -> EvalArgs:
    argv, command = list(argv), "recall"
    if argv and argv[0] in ("recall", "mine"):
        command, argv = argv[0], argv[1:]
    if len(argv) < 2:
        raise SlurmError(EVAL_USAGE)
    return EvalArgs(command, expand(argv[0], env), expand(argv[1], env), tuple(argv[2:]))


# -- the job's names and places ------------------------------------------------------------------

def output_root(env: Mapping[str, str]) -> Path:
    root = env.get("LDOT_OUTPUT_ROOT", "")
    if not root:
        raise SlurmError("LDOT_OUTPUT_ROOT is not set: copy slurm/site.env.example to slurm/site.env and set it "
                         "(or export it)")
    return Path(os.path.realpath(os.path.expanduser(root)))


def log_root(env: Mapping[str, str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(env.get("LDOT_LOG_ROOT") or str(output_root(env) / "logs"))))


def tracking_uri(env: Mapping[str, str]) -> str:
    """One store for all of the site's runs, so that a sweep's tasks land in one experiment."""
    return env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_root(env) / 'mlflow.db'}"


def job_tag(env: Mapping[str, str]) -> str:
    """<job name>-<job id>, or <job name>-<array id>_<index> for an array task: the run's and the logs' name."""
    name = env.get("SLURM_JOB_NAME") or "ldot"
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{name}-{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    if not env.get("SLURM_JOB_ID"):
        raise SlurmError("not inside a Slurm job (no SLURM_JOB_ID): submit this script with sbatch")
    return f"{name}-{env['SLURM_JOB_ID']}"


def max_requeues(env: Mapping[str, str]) -> int:
    value = env.get("LDOT_MAX_REQUEUES") or str(DEFAULT_MAX_REQUEUES)
    if not value.isdigit():
        raise SlurmError(f"LDOT_MAX_REQUEUES={value!r}: not a whole number >= 0")
    return int(value)


def restarts(env: Mapping[str, str]) -> int:
    value = env.get("SLURM_RESTART_COUNT") or "0"
    return int(value) if value.isdigit() else 0


def job_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables every job exports before its first step (the directories are made by the caller)."""
    tag = job_tag(env)
    max_requeues(env)  # refused now, not after training
    return {
        "LDOT_OUTPUT_ROOT": str(output_root(env)),
        "LDOT_LOG_ROOT": str(log_root(env)),
        "LDOT_JOB_TAG": tag,
        "LDOT_LOG_DIR": str(log_root(env) / tag),
        "MLFLOW_TRACKING_URI": tracking_uri(env),
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or env.get("SLURM_CPUS_PER_TASK") or "1",
    }


def job_overrides(env: Mapping[str, str], user: Sequence[str]) -> list[str]:
    """The job's own defaults first (outputs in <root>/<tag>, the run named <tag>), so the user's win."""
    tag = job_tag(env)
    return [f"output_dir={output_root(env) / tag}", f"tracking.run_name={tag}", *user]


# -- after training ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    action: str   # "continue" (training done), "requeue", or "exit" with `code`
    code: int
    message: str


def decide(exit_code: int | None, restarts: int, max_requeues: int, usr1: bool, term: bool) -> Decision:
    """What the batch script does once the training step has ended with `exit_code` (None: it never
    started, because SIGUSR1 came first), after `restarts` requeues, having seen SIGUSR1 (`usr1`: the
    warning before the time limit, or `scancel --signal=USR1 --batch`) and/or SIGTERM (`term`: scancel,
    the time limit itself, or Slurm's own preemption, which requeues the job itself).

    Only a preemption is requeued: the trainer's exit 75, or a task killed by a SIGUSR1 that came before
    its handler was installed. Bad input (exit 2) and every other failure end the job."""
    if exit_code == 0:
        return Decision("continue", 0, "training done")
    if exit_code is None:
        why = "SIGUSR1 came before training started"
    elif exit_code == EXIT_REQUEUE:
        why = f"training checkpointed and stopped (exit {EXIT_REQUEUE})"
    elif usr1 and not term and exit_code != EXIT_BAD_INPUT:
        why = f"training ended with exit {exit_code} after SIGUSR1: treated as preempted"
    else:
        return Decision("exit", exit_code, f"training failed (exit {exit_code}): not requeued")
    if term:
        return Decision("exit", EXIT_REQUEUE,
                        f"{why}; not requeued by the script: the job was cancelled or Slurm requeues it itself")
    if restarts >= max_requeues:
        return Decision("exit", EXIT_REQUEUE, f"{why}; not requeued: restart {restarts} reached "
                                              f"LDOT_MAX_REQUEUES={max_requeues}")
    return Decision("requeue", 0, f"{why}; requeueing (restart {restarts + 1} of at most {max_requeues}); "
                                  "it continues with --resume auto")
