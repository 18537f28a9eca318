# Shared by slurm/*.sbatch (sourced, never run): reads the site settings, names the job's log and
# output directories, runs a command on the job's tasks through slurm/launch.sh, and turns the
# trainer's exit 75 (preempted, checkpoint written) into a requeue of the job.
#
# The sbatch scripts only find nodes and launch: every hyperparameter lives in train/configs/*.yaml
# and in the key=value overrides given on the command line (or in a sweep file).

LDOT_EXIT_BAD_INPUT=2   # bad config/data/site settings: fail, never requeue
LDOT_EXIT_PREEMPTED=75  # the trainer's "checkpoint written, run me again with --resume auto"

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
    if [[ -n ${LDOT_LOG_DIR:-} && -d $LDOT_LOG_DIR ]]; then echo "error: $*" >>"$LDOT_LOG_DIR/job.log"; fi
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

# Everything a job needs before its first step: site settings, modules, the Python environment,
# the job's tag (name-id, or name-arrayid_index) and its log directory.
ldot_setup() {
    cd "$LDOT_ROOT" || ldot_die $LDOT_EXIT_BAD_INPUT "cannot enter the checkout $LDOT_ROOT"
    ldot_load_site_env

    if [[ -n ${LDOT_MODULES:-} ]]; then
        type module >/dev/null 2>&1 || ldot_die $LDOT_EXIT_BAD_INPUT \
            "LDOT_MODULES='$LDOT_MODULES' is set but this node has no 'module' command"
        # shellcheck disable=SC2086
        module load $LDOT_MODULES || ldot_die $LDOT_EXIT_BAD_INPUT "module load $LDOT_MODULES failed"
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

    [[ -n ${LDOT_OUTPUT_ROOT:-} ]] || ldot_die $LDOT_EXIT_BAD_INPUT \
        "LDOT_OUTPUT_ROOT is not set: copy slurm/site.env.example to slurm/site.env and set it (or export it)"
    LDOT_OUTPUT_ROOT=$(realpath -m "$LDOT_OUTPUT_ROOT")
    LDOT_LOG_ROOT=$(realpath -m "${LDOT_LOG_ROOT:-$LDOT_OUTPUT_ROOT/logs}")
    export LDOT_OUTPUT_ROOT LDOT_LOG_ROOT
    # One store for all of the site's runs, so that a sweep's tasks land in one experiment.
    export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$LDOT_OUTPUT_ROOT/mlflow.db}

    local name=${SLURM_JOB_NAME:-ldot}
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
        LDOT_JOB_TAG=$name-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    else
        LDOT_JOB_TAG=$name-${SLURM_JOB_ID:?not inside a Slurm job: submit this script with sbatch}
    fi
    LDOT_LOG_DIR=$LDOT_LOG_ROOT/$LDOT_JOB_TAG
    mkdir -p "$LDOT_OUTPUT_ROOT" "$LDOT_LOG_DIR" || ldot_die $LDOT_EXIT_BAD_INPUT \
        "cannot create $LDOT_OUTPUT_ROOT or $LDOT_LOG_DIR"
    export LDOT_JOB_TAG LDOT_LOG_DIR
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

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
    # Once one task has ended the others get 120 s, then srun ends them: a crashed rank does not leave
    # the rest hanging in a collective, and a preempted rank 0 still finishes its checkpoint and
    # MLflow records (--kill-on-bad-exit would cut it short as soon as another rank exits 75).
    local -a opts=(--kill-on-bad-exit=0 --wait=120 --open-mode=append "--output=$LDOT_LOG_DIR/$name.%t.log")
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

# -- requeue -----------------------------------------------------------------------------------
# After exit 75 the job requeues itself; the requeued job (same id, same output directory,
# SLURM_RESTART_COUNT+1) trains with --resume auto. LDOT_MAX_REQUEUES (default 20) stops loops.
ldot_requeue_or_exit() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${LDOT_MAX_REQUEUES:-20}
    if [[ $LDOT_TERMINATING == 1 ]]; then
        ldot_log "not requeued by the script: the job was cancelled or Slurm requeues it itself"
        exit $LDOT_EXIT_PREEMPTED
    fi
    if ((restarts >= max)); then
        ldot_log "not requeued: restart $restarts reached LDOT_MAX_REQUEUES=$max" \
            "(the newest checkpoint stays in ${LDOT_RUN_DIR:-the output directory})"
        exit $LDOT_EXIT_PREEMPTED
    fi
    # Said first: Slurm ends this script as part of the requeue, possibly before the next line runs.
    ldot_log "requeueing (restart $((restarts + 1)) of at most $max); it continues with --resume auto"
    LDOT_REQUEUEING=1
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        ldot_log "scontrol requeue $SLURM_JOB_ID failed: resubmit the job to continue"
        exit $LDOT_EXIT_PREEMPTED
    fi
    exit 0
}

# -- training jobs -----------------------------------------------------------------------------
# ldot_expand ARG: ${LDOT_DATA_ROOT} and ${LDOT_OUTPUT_ROOT} in an override (or sweep line) become
# the site's roots, so one command line or sweep file serves every site.
ldot_expand() {
    local arg=$1 var
    for var in LDOT_DATA_ROOT LDOT_OUTPUT_ROOT; do
        if [[ $arg == *"\${$var}"* || $arg == *"\$$var"* ]]; then
            [[ -n ${!var:-} ]] || ldot_die $LDOT_EXIT_BAD_INPUT "'$arg' uses \$$var, which is not set (slurm/site.env)"
            arg=${arg//"\${$var}"/${!var}}
            arg=${arg//"\$$var"/${!var}}
        fi
    done
    printf '%s' "$arg"
}

# ldot_train_job DEFAULT_CONFIG [--eval DIR] [CONFIG] [key=value ...]
# Checks the config, trains on all tasks (resuming after a requeue), then evaluates recall on one task
# when an evaluation set is known (--eval DIR, else the config's data.val).
ldot_train_job() {
    local config=$1 eval_data=""
    shift
    while [[ $# -gt 0 && $1 == --* ]]; do
        case $1 in
            --eval) [[ $# -ge 2 ]] || ldot_die $LDOT_EXIT_BAD_INPUT "--eval needs a dataset directory"
                    eval_data=$(ldot_expand "$2"); shift 2 ;;
            --eval=*) eval_data=$(ldot_expand "${1#--eval=}"); shift ;;
            *) ldot_die $LDOT_EXIT_BAD_INPUT "unknown option $1 (options: --eval DIR; then CONFIG and key=value overrides)" ;;
        esac
    done
    if [[ $# -gt 0 && $1 != *=* ]]; then config=$1; shift; fi
    [[ -f $config ]] || ldot_die $LDOT_EXIT_BAD_INPUT "config not found: $config (paths are relative to the checkout $LDOT_ROOT)"

    # The job's own defaults come first, so that the user's overrides win over them.
    local -a overrides=("output_dir=$LDOT_OUTPUT_ROOT/$LDOT_JOB_TAG" "tracking.run_name=$LDOT_JOB_TAG")
    local arg
    for arg in "$@"; do overrides+=("$(ldot_expand "$arg")"); done

    local key value run_dir="" val=""
    local prep
    prep=$("$LDOT_PYTHON" "$LDOT_ROOT/slurm/prepare_run.py" --config "$config" "${overrides[@]}") \
        || ldot_die $LDOT_EXIT_BAD_INPUT "the job's configuration was rejected (message above); not requeued"
    while IFS='=' read -r key value; do
        case $key in
            output_dir) run_dir=$value ;;
            val) val=$value ;;
            *) ldot_log "$key: $value" ;;
        esac
    done <<<"$prep"
    LDOT_RUN_DIR=$run_dir
    export LDOT_RUN_DIR
    ldot_log "config $config; outputs in $run_dir"
    eval_data=${eval_data:-$val}

    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts > 0)) && [[ -f $run_dir/checkpoints/final/mlflow_run.json ]]; then
        ldot_log "restart $restarts: training had finished (checkpoints/final exists); not training again"
    else
        if [[ $LDOT_PREEMPT_REQUESTED == 1 ]]; then
            ldot_log "SIGUSR1 came before training started: requeueing without starting it"
            ldot_requeue_or_exit
        fi
        # `auto` is a fresh start in a new output directory and a resume after a requeue.
        LDOT_STEP_FORWARDS_USR1=1
        ldot_step train all "$LDOT_PYTHON" -m ldot.train --config "$config" "${overrides[@]}" --resume "${LDOT_RESUME:-auto}"
        LDOT_STEP_FORWARDS_USR1=0
        case $LDOT_STEP_RC in
            0) ;;
            "$LDOT_EXIT_PREEMPTED") ldot_requeue_or_exit ;;
            *)
                # A USR1 that lands before the trainer has installed its handler kills the task: the
                # job was still preempted, and the newest checkpoint (if any) is where it resumes.
                if [[ $LDOT_PREEMPT_REQUESTED == 1 && $LDOT_TERMINATING == 0 ]]; then
                    ldot_log "training ended with exit $LDOT_STEP_RC after SIGUSR1: treated as preempted"
                    ldot_requeue_or_exit
                fi
                ldot_log "training failed (exit $LDOT_STEP_RC): not requeued; see $LDOT_LOG_DIR/train.*.log"
                exit "$LDOT_STEP_RC" ;;
        esac
    fi

    if [[ -z $eval_data ]]; then
        ldot_log "no evaluation set (--eval DIR or data.val): done"
        return 0
    fi
    # every task encodes and searches a slice of the evaluation set; task 0 writes and records
    ldot_step eval all "$LDOT_PYTHON" -m ldot.eval recall --checkpoint "$run_dir/checkpoints/final" --data "$eval_data"
    [[ $LDOT_STEP_RC == 0 ]] || { ldot_log "evaluation failed (exit $LDOT_STEP_RC); see $LDOT_LOG_DIR/eval.0.log"; exit "$LDOT_STEP_RC"; }
    ldot_log "done: $run_dir/checkpoints/final (recall in recall.json there and in the MLflow run)"
}
