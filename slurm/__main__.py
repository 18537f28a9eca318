"""`python -m ldot.slurm VERB ...`: the Python side of slurm/*.sbatch and slurm/submit.

    env   --env-file F                       the job's names and places; makes its output and log directories
    train --env-file F KIND ARGS...          checks a training job (KIND: pretrain, finetune, sweep) before srun
    eval  --env-file F ARGS...               checks an eval.sbatch job: [recall|mine] CHECKPOINT DATA [options]
    decide --env-file F --exit-code N|none --usr1 0|1 --term 0|1
                                             after training: continue, requeue or exit (job.decide)
    fail-run RUN_DIR                         marks the run's MLflow run FAILED (the job failed after training)
    submit [sbatch options] SCRIPT [ARGS]    slurm/submit: site options, checks, an array's parent run, sbatch

The batch script reads the answers back from the env file, which it sources: plain assignments (and
arrays) quoted with shlex.quote, so any value survives; LDOT_ERROR holds the one-line error when the
verb fails (exit 2). Lines on stdout are the job's log lines (job.log); stderr goes to the .out file.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ldot.slurm import job
from ldot.slurm.job import SlurmError

from ldot.errors import EXIT_BAD_INPUT, LdotError

TRAIN_KINDS = ("pretrain", "finetune", "sweep")


def write_env(path: str | Path, values: Mapping[str, str | Sequence[str]], export: Sequence[str] = ()) -> None:
    lines = []
    for key, value in values.items():
        if isinstance(value, str):
            lines.append(f"{'export ' if key in export else ''}{key}={shlex.quote(value)}")
        else:
            lines.append(f"{key}=({' '.join(shlex.quote(v) for v in value)})")
    Path(path).write_text("\n".join(lines) + "\n")


def _flag(value: str, name: str) -> bool:
    if value not in ("0", "1"):
        raise SlurmError(f"{name} takes 0 or 1, not {value!r}")
    return value == "1"


# -- verbs ---------------------------------------------------------------------------------------

def cmd_env(env: Mapping[str, str]) -> tuple[dict, list[str], list[str]]:
    from ldot.train.preflight import check_writable_dir

    values = job.job_env(env)
    check_writable_dir("LDOT_OUTPUT_ROOT", values["LDOT_OUTPUT_ROOT"])
    check_writable_dir("LDOT_LOG_ROOT", values["LDOT_LOG_DIR"])
    return values, list(values), []


def check_train(config: str, overrides: Sequence[str], eval_data: str | None, paths: bool = True):
    """Every path the job will need, in its first second: the config and its overrides, the datasets,
    the init checkpoint, the text encoder, the DeepSpeed config, a writable output directory, --eval's
    dataset (paths=False: the config alone). Returns the resolved config."""
    from ldot.train.config import load_config
    from ldot.train.preflight import check_dataset, check_paths

    if not Path(config).is_file():
        raise SlurmError(f"config not found: {config} (paths are relative to the checkout {Path.cwd()})")
    cfg = load_config(config, list(overrides))
    if paths:
        check_dataset("--eval", eval_data)
        check_paths(cfg)  # last: it makes the output directory
    return cfg


def cmd_train(kind: str, argv: list[str], env: Mapping[str, str]) -> tuple[dict, list[str], list[str]]:
    if kind not in TRAIN_KINDS:
        raise SlurmError(f"unknown training job {kind!r} (one of {', '.join(TRAIN_KINDS)})")
    log, exports, values = [], [], {}
    entry: list[str] = []
    if kind == "sweep":
        if not argv:
            raise SlurmError(job.SWEEP_USAGE)
        sweep, argv = argv[0], argv[1:]
        index = env.get("SLURM_ARRAY_TASK_ID")
        entry, n = job.sweep_entry(sweep, index, env)
        name = job.sweep_name(sweep, env.get("SLURM_ARRAY_JOB_ID", ""), env)
        if env.get("LDOT_PARENT_RUN_ID"):  # made by slurm/submit, for every task of the array
            log.append(f"sweep {name} ({sweep}) entry {index}/{n}: {' '.join(entry)}; "
                       f"parent run {env['LDOT_PARENT_RUN_ID']}")
        else:  # plain sbatch: the trainer nests every task under the parent run named LDOT_SWEEP
            values["LDOT_SWEEP"] = name
            exports.append("LDOT_SWEEP")
            log.append(f"sweep {name} ({sweep}) entry {index}/{n}: {' '.join(entry)}")
    args = job.parse_train_args(argv, job.DEFAULT_CONFIGS[kind], env)
    overrides = job.job_overrides(env, [*args.overrides, *entry])
    cfg = check_train(args.config, overrides, args.eval_data)

    from ldot.slurm.runs import ensure_store
    from ldot.tracking import RUN_FILE, resolve_tracking_uri

    run_dir = Path(cfg.output_dir).resolve()
    ensure_store(resolve_tracking_uri(cfg.tracking.tracking_uri, run_dir))
    eval_data = args.eval_data or cfg.data.val
    trained = job.restarts(env) > 0 and (run_dir / "checkpoints" / "final" / RUN_FILE).is_file()
    values.update(LDOT_RUN_DIR=str(run_dir), LDOT_EVAL_DATA=str(Path(eval_data).resolve()) if eval_data else "",
                  LDOT_TRAINED="1" if trained else "0",
                  LDOT_TRAIN_ARGS=["--config", args.config, *overrides, "--resume", env.get("LDOT_RESUME") or "auto"])
    exports.append("LDOT_RUN_DIR")
    log.append(f"config {args.config}; outputs in {run_dir}")
    return values, exports, log


def cmd_eval(argv: list[str], env: Mapping[str, str]) -> tuple[dict, list[str], list[str]]:
    from ldot.train.preflight import check_dataset, check_export

    args = job.parse_eval_args(argv, env)
    check_export("CHECKPOINT", args.checkpoint)
    check_dataset("DATA", args.data)
    cmd = args.argv()
    done = f"done: recall.json in {args.checkpoint}"
    if args.command == "mine":
        done = f"done: hard negatives in {cmd[cmd.index('--out') + 1] if '--out' in cmd else 'the --out directory'}"
    return {"LDOT_EVAL_ARGS": cmd, "LDOT_EVAL_COMMAND": args.command, "LDOT_EVAL_DONE": done}, [], []


def cmd_decide(argv: list[str], env: Mapping[str, str]) -> tuple[dict, list[str], list[str]]:
    opts = dict(zip(argv[::2], argv[1::2]))
    if len(argv) % 2 or set(opts) != {"--exit-code", "--usr1", "--term"}:
        raise SlurmError("usage: python -m ldot.slurm decide --env-file F --exit-code N|none --usr1 0|1 --term 0|1")
    code = opts["--exit-code"]
    if code != "none" and not code.isdigit():
        raise SlurmError(f"--exit-code {code!r}: a number or 'none'")
    d = job.decide(None if code == "none" else int(code), job.restarts(env), job.max_requeues(env),
                   _flag(opts["--usr1"], "--usr1"), _flag(opts["--term"], "--term"))
    return {"LDOT_DECISION": d.action, "LDOT_DECISION_CODE": str(d.code)}, [], [d.message]


def cmd_fail_run(argv: list[str]) -> int:
    """Never fails the job itself: it is already failing; a line for its log says what happened."""
    if len(argv) != 1:
        print("usage: python -m ldot.slurm fail-run RUN_DIR", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        from ldot.slurm.runs import fail_run

        print(fail_run(argv[0]))
    except Exception as exc:  # a job's failure report must not be lost to a tracking problem
        print(f"the MLflow run in {argv[0]} could not be marked FAILED: {type(exc).__name__}: {exc}")
    return 0


# -- submission ----------------------------------------------------------------------------------

def _is_array_option(opt: str) -> bool:
    return opt.startswith("-a") or opt.startswith("--array")


def site_options(env: Mapping[str, str], kind: str) -> list[str]:
    """The site's partition, account, QoS and (training jobs) shape, before the user's own options."""
    opts = [f"--{flag}={env[var]}" for var, flag in
            (("LDOT_PARTITION", "partition"), ("LDOT_ACCOUNT", "account"), ("LDOT_QOS", "qos")) if env.get(var)]
    if kind != "eval" and env.get("LDOT_SBATCH_ARGS"):
        opts += shlex.split(env["LDOT_SBATCH_ARGS"])
    return opts


def check_submission(kind: str, args: list[str], env: Mapping[str, str], out_root: Path, paths: bool) -> list:
    """What the job would refuse in its first seconds, refused before it waits in the queue (paths=False:
    the arguments and configs only). Returns the resolved config of each run the submission starts
    (one per sweep entry)."""
    from ldot.train.preflight import check_dataset, check_export

    if kind == "eval":
        if not paths:
            return []
        a = job.parse_eval_args(args, env)
        check_export("CHECKPOINT", a.checkpoint)
        check_dataset("DATA", a.data)
        return []
    entries: list[list[str]] = [[]]
    if kind == "sweep":
        if not args:
            raise SlurmError(job.SWEEP_USAGE)
        path, args = args[0], args[1:]
        entries = []
        for i, raw in enumerate(job.sweep_entries(path), 1):
            for item in raw:
                if "=" not in item:
                    raise SlurmError(f"{path} entry {i}: '{item}' is not key=value")
            entries.append([job.expand(item, env) for item in raw])
    a = job.parse_train_args(args, job.DEFAULT_CONFIGS[kind], env)
    # the run directory is named after the job id, which sbatch has not given yet: check its root
    return [check_train(a.config, [f"output_dir={out_root}", *a.overrides, *entry], a.eval_data, paths)
            for entry in entries]


def _parent_target(configs: list, env: Mapping[str, str]) -> tuple[str, str, str | None] | None:
    """(tracking URI, experiment, sweep name or None) of the parent run the array's tasks nest under,
    or None where there is none to make: nesting off (tracking.sweep=), a parent given, or entries that
    log to different stores or experiments (their tasks then find their parents themselves)."""
    targets = set()
    for cfg in configs:
        tc = cfg.tracking
        if tc.parent_run_id or env.get("LDOT_PARENT_RUN_ID") or tc.sweep == "":
            return None
        targets.add((tc.tracking_uri or job.tracking_uri(env), tc.experiment, tc.sweep or env.get("LDOT_SWEEP")))
    return targets.pop() if len(targets) == 1 else None


def cmd_submit(argv: list[str], env: Mapping[str, str]) -> int:
    from ldot.train.preflight import check_writable_dir

    i = next((k for k, a in enumerate(argv) if a.endswith(".sbatch")), None)
    if i is None:
        raise SlurmError("usage: slurm/submit [sbatch options] slurm/SCRIPT.sbatch [arguments]")
    opts, script, args = argv[:i], argv[i], argv[i + 1:]
    kind = Path(script).stem
    # sbatch runs where it was called; the job resolves its paths in the checkout, and so do the checks
    here = Path.cwd()
    os.chdir(env.get("LDOT_ROOT") or here)
    out_root = check_writable_dir("LDOT_OUTPUT_ROOT", job.output_root(env))
    logs = check_writable_dir("LDOT_LOG_ROOT", job.log_root(env))
    site = site_options(env, kind)
    array = any(_is_array_option(o) for o in opts)
    if kind == "sweep" and not array:
        if not args:
            raise SlurmError("sweep.sbatch needs a sweep file as its first argument")
        site.append(f"--array=1-{len(job.sweep_entries(args[0]))}")
        array = True
    site.append(f"--output={logs}/%x-%A_%a.out" if array else f"--output={logs}/%x-%j.out")

    configs = []
    if kind in TRAIN_KINDS or kind == "eval":
        configs = check_submission(kind, args, env, out_root, paths=env.get("LDOT_SUBMIT_CHECK", "1") != "0")
    target = _parent_target(configs, env) if array and configs else None

    sub_env, parent = dict(env), None
    if target:
        from ldot.slurm import runs

        uri, experiment, name = target
        try:
            parent = runs.create_parent(uri, experiment, name)
            sub_env["LDOT_PARENT_RUN_ID"] = parent
        except Exception as exc:  # a store away now: the tasks make the parent themselves, as under plain sbatch
            print(f"ldot-slurm: note: the array's parent run was not created ({type(exc).__name__}: {exc}); "
                  "its first task creates it", file=sys.stderr)

    proc = subprocess.Popen(["sbatch", *site, *opts, script, *args], cwd=here, env=sub_env, stdout=subprocess.PIPE,
                            text=True)
    job_id = None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        found = re.search(r"\d+", line)
        if parent and job_id is None and found:
            job_id = found.group(0)
            # named now that the array's id is known (a sweep name given beforehand stays)
            named = None if name else (job.sweep_name(args[0], job_id, env) if kind == "sweep"
                                       else f"slurm-array-{job_id}")
            _quietly(runs.name_parent, uri, parent, named, job_id)
    rc = proc.wait()
    if parent and job_id is None and not name:
        _quietly(runs.delete_parent, uri, parent)
    return rc


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # the name of a parent run is not worth failing a submission over
        print(f"ldot-slurm: note: the array's parent run was not updated ({type(exc).__name__}: {exc})",
              file=sys.stderr)


# -- entry ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_BAD_INPUT
    verb, argv = argv[0], argv[1:]
    env = dict(os.environ)
    if verb == "fail-run":
        return cmd_fail_run(argv)
    env_file = None
    if verb in ("env", "train", "eval", "decide"):
        if len(argv) < 2 or argv[0] != "--env-file":
            print(f"usage: python -m ldot.slurm {verb} --env-file FILE ...", file=sys.stderr)
            return EXIT_BAD_INPUT
        env_file, argv = argv[1], argv[2:]
    try:
        if verb == "submit":
            return cmd_submit(argv, env)
        if verb == "env":
            values, exports, log = cmd_env(env)
        elif verb == "train":
            if not argv:
                raise SlurmError(f"usage: python -m ldot.slurm train --env-file F {{{','.join(TRAIN_KINDS)}}} ARGS...")
            values, exports, log = cmd_train(argv[0], argv[1:], env)
        elif verb == "eval":
            values, exports, log = cmd_eval(argv, env)
        elif verb == "decide":
            values, exports, log = cmd_decide(argv, env)
        else:
            print(f"python -m ldot.slurm: unknown verb {verb!r}\n{__doc__}", file=sys.stderr)
            return EXIT_BAD_INPUT
    except LdotError as exc:
        message = " ".join(str(exc).split("\n"))
        if env_file:  # the script says it, in the .out file and in job.log
            write_env(env_file, {"LDOT_ERROR": message})
        else:
            print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_env(env_file, values, exports)
    for line in log:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
