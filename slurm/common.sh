# Shared by slurm/*.sbatch and slurm/submit (sourced, never run). Only what must run in the batch
# shell lives here: the site file, modules and the Python environment, the signal traps, srun and
# `scontrol requeue`. What a job decides (its arguments, ${LDOT_DATA_ROOT}, the checks, its names and
# directories, whether to requeue) is Python, tested on its own: slurm/job.py, called as
# `$LDOT_PYTHON -m ldot.slurm VERB` (slurm/__main__.py) through ldot_py below.
#
# The sbatch scripts only find nodes and launch: every hyperparameter lives in train/configs/*.yaml
# and in the key=value overrides given on the command line (or in a sweep file).

# The exit codes of ldot.errors (EXIT_BAD_INPUT, EXIT_REQUEUE); tests/slurm/test_job.py checks that
# they agree. Bash keeps a copy because it must exit 2 before any Python is found.
LDOT_EXIT_BAD_INPUT=2   # bad config/data/site settings: fail, never requeue
LDOT_EXIT_REQUEUE=75    # the trainer's "checkpoint written, run me again with --resume auto"

ldot_log() {
    local line
    line="[$(date '+%F %T')] ldot-slurm: $*"
    echo "$line"
    if [[ -n ${LDOT_LOG_DIR:-} && -d $LDOT_LOG_DIR ]]; then echo "$line" >>"$LDOT_LOG_DIR/job.log"; fi
}

ldot_die() {  # ldot_die CODE MESSAGE
    local code=$1
    shift
    echo "ldot-slurm: error: $*" >&2
    if [[ -n ${LDOT_LOG_DIR:-} && -d $LDOT_LOG_DIR ]]; then echo "[$(date '+%F %T')] error: $*" >>"$LDOT_LOG_DIR/job.log"; fi
    exit "$code"
}

# Site settings: $LDOT_SITE_ENV (default slurm/site.env) is sourced with every assignment exported;
# a variable already set in the environment keeps its value, so `LDOT_OUTPUT_ROOT=... sbatch ...` wins.
ldot_load_site_env() {
    local file=${LDOT_SITE_ENV:-$LDOT_ROOT/slurm/site.env} name
    local -A keep=()
    if [[ ! -e $file ]]; then
        [[ -z ${LDOT_SITE_ENV:-} ]] || ldot_die $LDOT_EXIT_BAD_INPUT "LDOT_SITE_ENV=$LDOT_SITE_ENV: no such file"
        return 0
    fi
    for name in $(sed -nE 's/^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=.*/\2/p' "$file"); do
        if [[ -n ${!name:-} ]]; then keep[$name]=${!name}; fi
    done
    set -a
    # shellcheck disable=SC1090
    source "$file" || ldot_die $LDOT_EXIT_BAD_INPUT "$file: could not be sourced"
    set +a
    for name in "${!keep[@]}"; do export "$name=${keep[$name]}"; done
}

# ldot_python_env [--modules-if-any]: LDOT_MODULES loaded, LDOT_ACTIVATE run, LDOT_PYTHON found and
# exported. slurm/submit passes --modules-if-any: a login node without `module` may still submit.
ldot_python_env() {
    if [[ -n ${LDOT_MODULES:-} ]]; then
        if type module >/dev/null 2>&1; then
            # shellcheck disable=SC2086
            module load $LDOT_MODULES || ldot_die $LDOT_EXIT_BAD_INPUT "module load $LDOT_MODULES failed"
        elif [[ ${1:-} != --modules-if-any ]]; then
            ldot_die $LDOT_EXIT_BAD_INPUT "LDOT_MODULES='$LDOT_MODULES' is set but this node has no 'module' command"
        fi
    fi
    if [[ -n ${LDOT_ACTIVATE:-} ]]; then
        eval "$LDOT_ACTIVATE" || ldot_die $LDOT_EXIT_BAD_INPUT "LDOT_ACTIVATE failed: $LDOT_ACTIVATE"
    fi
    if [[ -z ${LDOT_PYTHON:-} ]]; then
        if [[ -z ${LDOT_ACTIVATE:-} && -x $LDOT_ROOT/.venv/bin/python ]]; then
            LDOT_PYTHON=$LDOT_ROOT/.venv/bin/python  # what `make setup` builds
        else
            LDOT_PYTHON=python
        fi
    fi
    command -v "$LDOT_PYTHON" >/dev/null || ldot_die $LDOT_EXIT_BAD_INPUT \
        "no Python '$LDOT_PYTHON' on $(hostname): set LDOT_PYTHON or LDOT_ACTIVATE in slurm/site.env"
    export LDOT_PYTHON
}

# ldot_py VERB [ARGS...]: runs `$LDOT_PYTHON -m ldot.slurm VERB --env-file F ARGS` and sources F, so
# the verb's answers become shell variables (values quoted by Python's shlex.quote). Its stdout lines
# go to job.log; a refusal ends the job with the verb's one-line message, in job.log too.
ldot_py() {
    local verb=$1 out rc=0 line
    shift
    : >"$LDOT_ENV_FILE"
    out=$("$LDOT_PYTHON" -m ldot.slurm "$verb" --env-file "$LDOT_ENV_FILE" "$@") || rc=$?
    LDOT_ERROR=""
    # shellcheck disable=SC1090
    source "$LDOT_ENV_FILE"
    while IFS= read -r line; do [[ -z $line ]] || ldot_log "$line"; done <<<"$out"
    ((rc == 0)) || ldot_die "$rc" "${LDOT_ERROR:-python -m ldot.slurm $verb failed (exit $rc), see the .out file of the job}"
}

# Everything a job needs before its first step: site settings, modules, the Python environment, then
# (ldot.slurm env) its tag (name-id, or name-arrayid_index), output and log directories, the store.
ldot_setup() {
    cd "$LDOT_ROOT" || ldot_die $LDOT_EXIT_BAD_INPUT "cannot enter the checkout $LDOT_ROOT"
    ldot_load_site_env
    ldot_python_env
    LDOT_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/ldot-slurm-env.XXXXXX") || ldot_die $LDOT_EXIT_BAD_INPUT \
        "cannot create a temporary file in ${TMPDIR:-/tmp}"
    trap 'rm -f "$LDOT_ENV_FILE"' EXIT
    # exports LDOT_OUTPUT_ROOT LDOT_LOG_ROOT LDOT_JOB_TAG LDOT_LOG_DIR MLFLOW_TRACKING_URI OMP_NUM_THREADS
    ldot_py env

    trap _ldot_on_usr1 USR1
    trap _ldot_on_term TERM
    ldot_log "job $SLURM_JOB_ID ($LDOT_JOB_TAG) on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-1} task(s)," \
        "restart ${SLURM_RESTART_COUNT:-0}; logs in $LDOT_LOG_DIR"
}

# -- signals -----------------------------------------------------------------------------------
# --signal=B:USR1@N reaches this shell only; the tasks hear of it from the trap below, through srun,
# which passes SIGUSR1 on to every task on every node. SIGTERM means the job is being cancelled
# (scancel, time limit, Slurm's own preemption): Slurm signals the tasks itself and requeues itself
# if it preempts, so the script only notes it and does not requeue.
LDOT_PREEMPT_REQUESTED=0
LDOT_TERMINATING=0
LDOT_REQUEUEING=0
LDOT_STEP_PID=""
LDOT_STEP_FORWARDS_USR1=0

_ldot_on_usr1() {
    LDOT_PREEMPT_REQUESTED=1
    if [[ -n $LDOT_STEP_PID && $LDOT_STEP_FORWARDS_USR1 == 1 ]]; then
        ldot_log "SIGUSR1: asking the tasks to checkpoint and stop"
        kill -USR1 "$LDOT_STEP_PID" 2>/dev/null || true
    else
        ldot_log "SIGUSR1: noted (no training step is running)"
    fi
}

_ldot_on_term() {
    [[ $LDOT_REQUEUEING == 1 ]] && return  # our own requeue ending this run
    LDOT_TERMINATING=1
    ldot_log "SIGTERM: the job is ending (cancelled, out of time or preempted by Slurm)"
}

# ldot_step NAME TASKS CMD...: runs CMD through launch.sh on all of the job's tasks (TASKS=all) or on
# one (TASKS=1); per-task output goes to $LDOT_LOG_DIR/NAME.<task>.log. Sets LDOT_STEP_RC.
ldot_step() {
    local name=$1 tasks=$2
    shift 2
    # Once one task has ended the others get LDOT_STEP_WAIT_S (120 s), then srun ends them: a crashed
    # rank does not leave the rest hanging in a collective, and a preempted rank 0 still finishes its
    # checkpoint and MLflow records (--kill-on-bad-exit would cut it short as soon as another rank exits
    # 75). A rank that hangs without exiting is ended by the process group timeout (LDOT_DIST_TIMEOUT_S).
    local -a opts=(--kill-on-bad-exit=0 "--wait=${LDOT_STEP_WAIT_S:-120}" --open-mode=append
                   "--output=$LDOT_LOG_DIR/$name.%t.log")
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the batch job: pass it on, or
    # each task gets a single CPU for its data workers.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then opts+=("--cpus-per-task=$SLURM_CPUS_PER_TASK"); fi
    if [[ $tasks == 1 ]]; then opts+=(--nodes=1 --ntasks=1); fi
    ldot_log "step $name: $*"
    srun "${opts[@]}" "$LDOT_ROOT/slurm/launch.sh" "$@" &
    LDOT_STEP_PID=$!
    local rc
    while :; do
        rc=0
        wait "$LDOT_STEP_PID" || rc=$?
        # A trapped signal interrupts `wait` with 128+n while srun runs on: wait again.
        kill -0 "$LDOT_STEP_PID" 2>/dev/null || break
    done
    LDOT_STEP_PID=""
    LDOT_STEP_RC=$rc
    ldot_log "step $name: exit $rc"
}

# -- training jobs -----------------------------------------------------------------------------

# ldot_after_training EXIT_CODE|none: carries out job.decide's answer. A requeued job (same id, same
# output directory, SLURM_RESTART_COUNT+1) trains with --resume auto.
ldot_after_training() {
    ldot_py decide --exit-code "$1" --usr1 "$LDOT_PREEMPT_REQUESTED" --term "$LDOT_TERMINATING"
    case $LDOT_DECISION in
        continue) return 0 ;;
        requeue)
            # (the decision's line is in job.log already: Slurm ends this script as part of the requeue)
            LDOT_REQUEUEING=1
            if ! scontrol requeue "$SLURM_JOB_ID"; then
                ldot_log "scontrol requeue $SLURM_JOB_ID failed: resubmit the job to continue"
                exit $LDOT_EXIT_REQUEUE
            fi
            exit 0 ;;
        *)
            if [[ $LDOT_DECISION_CODE != "$LDOT_EXIT_REQUEUE" ]]; then
                ldot_log "see $LDOT_LOG_DIR/train.*.log"
                ldot_fail_run
            fi
            exit "$LDOT_DECISION_CODE" ;;
    esac
}

# The job failed after its run started: its MLflow run says FAILED, not FINISHED or RUNNING.
ldot_fail_run() {
    local out
    out=$("$LDOT_PYTHON" -m ldot.slurm fail-run "$LDOT_RUN_DIR") || true
    [[ -z $out ]] || ldot_log "$out"
}

# ldot_train_job KIND [SWEEP_FILE] [--eval DIR] [CONFIG] [key=value ...] (KIND: pretrain, finetune,
# sweep): checks every path the job needs before any task starts, trains on all tasks (resuming after
# a requeue), then evaluates recall on all tasks when an evaluation set is known (--eval DIR, else
# the config's data.val).
ldot_train_job() {
    # sets LDOT_RUN_DIR, LDOT_EVAL_DATA, LDOT_TRAINED, LDOT_TRAIN_ARGS (and for a sweep LDOT_SWEEP)
    ldot_py train "$@"
    if [[ $LDOT_TRAINED == 1 ]]; then
        ldot_log "restart ${SLURM_RESTART_COUNT:-0}: training had finished (checkpoints/final exists); not training again"
    elif [[ $LDOT_PREEMPT_REQUESTED == 1 ]]; then
        ldot_after_training none
    else
        LDOT_STEP_FORWARDS_USR1=1
        ldot_step train all "$LDOT_PYTHON" -m ldot.train "${LDOT_TRAIN_ARGS[@]}"
        LDOT_STEP_FORWARDS_USR1=0
        ldot_after_training "$LDOT_STEP_RC"
    fi

    if [[ -z $LDOT_EVAL_DATA ]]; then
        ldot_log "no evaluation set (--eval DIR or data.val): done"
        return 0
    fi
    # every task encodes and searches a slice of the evaluation set; task 0 writes and records
    ldot_step eval all "$LDOT_PYTHON" -m ldot.eval recall --checkpoint "$LDOT_RUN_DIR/checkpoints/final" \
        --data "$LDOT_EVAL_DATA"
    if [[ $LDOT_STEP_RC != 0 ]]; then
        ldot_log "evaluation failed (exit $LDOT_STEP_RC); see $LDOT_LOG_DIR/eval.0.log"
        ldot_fail_run
        exit "$LDOT_STEP_RC"
    fi
    ldot_log "done: $LDOT_RUN_DIR/checkpoints/final (recall in recall.json there and in the MLflow run)"
}
