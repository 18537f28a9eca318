#!/usr/bin/env bash
# srun's per-task entry: turns Slurm's task layout into torch.distributed's variables, then runs the
# command in place of this shell (so signals reach it directly). One task per GPU, no ssh or pdsh:
#
#   srun [--nodes N --ntasks-per-node G --gpus-per-node G] slurm/launch.sh ldot train --config ...
#
#   RANK        <- SLURM_PROCID        WORLD_SIZE  <- SLURM_NTASKS
#   LOCAL_RANK  <- SLURM_LOCALID       (0 when Slurm bound the task to a single GPU)
#   MASTER_ADDR <- first host of the step's node list (scontrol show hostnames)
#   MASTER_PORT <- LDOT_MASTER_PORT_BASE (10000) + job id % LDOT_MASTER_PORT_SPAN (20000): fixed for a
#                  job and its requeues, distinct across the jobs sharing a node, and below the
#                  kernel's ephemeral port range. Two Slurm clusters on one machine (the tests') give
#                  each its own base and span so that their job ids cannot meet on one port.
# LDOT_MASTER_ADDR / LDOT_MASTER_PORT override the last two (e.g. a host name on the fast network).
# Works on CPU-only partitions (the trainer then uses gloo) and across nodes.
#
# This is the only place where Slurm's layout becomes torch's: Python (ldot.distributed) reads RANK,
# LOCAL_RANK and WORLD_SIZE as it does under torchrun, and refuses an srun task that came without
# them. Here, because the wrapper serves every command a job runs (training, the sharded recall and
# mining, anything else), needs scontrol for MASTER_ADDR, and sees the task's GPU binding before the
# command starts.
set -euo pipefail

# shellcheck source=slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # LDOT_EXIT_BAD_INPUT
die() { echo "launch.sh: error: $*" >&2; exit "$LDOT_EXIT_BAD_INPUT"; }
[[ $# -gt 0 ]] || die "usage: srun slurm/launch.sh COMMAND [ARGS...]"
[[ -n ${SLURM_PROCID:-} && -n ${SLURM_NTASKS:-} ]] || die "not an srun task (SLURM_PROCID/SLURM_NTASKS are not set)"

export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=${SLURM_LOCALID:-0}
# With --gpus-per-task=1 (or gres binding) each task sees exactly one GPU, which is its device 0.
if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != *,* && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
    export LOCAL_RANK=0
fi

nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
if [[ -n ${LDOT_MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$LDOT_MASTER_ADDR
else
    [[ -n $nodes ]] || die "no node list (SLURM_STEP_NODELIST/SLURM_JOB_NODELIST) to pick MASTER_ADDR from"
    MASTER_ADDR=$(scontrol show hostnames "$nodes" | head -n 1)
    [[ -n $MASTER_ADDR ]] || die "scontrol show hostnames '$nodes' gave no host"
fi
job=${SLURM_JOB_ID:?SLURM_JOB_ID is not set}
export MASTER_ADDR
base=${LDOT_MASTER_PORT_BASE:-10000}
span=${LDOT_MASTER_PORT_SPAN:-20000}
[[ $base =~ ^[0-9]+$ && $span =~ ^[1-9][0-9]*$ ]] || die "LDOT_MASTER_PORT_BASE=$base / LDOT_MASTER_PORT_SPAN=$span: not port numbers"
export MASTER_PORT=${LDOT_MASTER_PORT:-$((base + job % span))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# One header per run in the (appended) per-task log, so requeued runs are easy to tell apart.
echo "[$(date '+%F %T')] launch: rank $RANK/$WORLD_SIZE local $LOCAL_RANK on $(hostname)," \
    "master $MASTER_ADDR:$MASTER_PORT, job $job${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID)}," \
    "restart ${SLURM_RESTART_COUNT:-0}: $*"
exec "$@"
