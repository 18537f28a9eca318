#!/usr/bin/env bash
# Stops the local cluster started by slurm/local/start.sh: cancels its jobs, stops every slurmd,
# slurmctld and the cluster's own munged (--keep-munge leaves it running); a several-node cluster's
# namespaces, links, bridge and hosts files go too (slurm/local/netns.sh). Safe to run twice, and after
# a start that failed halfway.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

STATE=${LDOT_SLURM_LOCAL_DIR:-/var/tmp/ldot-slurm}
CONF=$STATE/etc/slurm.conf
keep_munge=0
[[ ${1:-} == --keep-munge ]] && keep_munge=1
[[ -d $STATE ]] || exit 0

if [[ -z ${LDOT_SLURM_LOCKED:-} ]]; then
    exec 9>"$STATE/.startstop.lock"
    flock -w 300 9 || { echo "local slurm: another start/stop holds $STATE/.startstop.lock" >&2; exit 1; }
fi

# stop_pidfile FILE NAME: stop the process in FILE if it still is NAME (pids get reused).
stop_pidfile() {
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

if [[ -f $CONF ]] && SLURM_CONF=$CONF timeout 10 scontrol ping >/dev/null 2>&1; then
    # Jobs first, so that no task outlives its slurmd.
    SLURM_CONF=$CONF scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true
    for _ in $(seq 50); do
        [[ -z $(SLURM_CONF=$CONF squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
        sleep 0.2
    done
fi
for pidfile in "$STATE"/run/slurmd.pid "$STATE"/run/slurmd-*.pid; do
    if [[ -e $pidfile ]]; then stop_pidfile "$pidfile" slurmd; fi
done
# shellcheck source=slurm/local/netns.sh
source "$here/netns.sh"
ldot_nodes_down  # the nodes' namespaces, links and bridge, when this cluster had several
stop_pidfile "$STATE/run/slurmctld.pid" slurmctld
[[ $keep_munge == 1 ]] || stop_pidfile "$STATE/munge/munged.pid" munged  # this cluster's own (start.sh)
exit 0
