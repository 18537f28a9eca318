#!/usr/bin/env bash
# Starts a Slurm cluster on this machine (munged, slurmctld, slurmd) for the tests and for trying the
# sbatch scripts without a real cluster. Needs root; installs Debian's slurm-wlm and munge with apt when
# they are missing. A second call stops the previous instance and starts afresh.
#
#   sudo slurm/local/start.sh          # prints the line to eval: export SLURM_CONF=...
#   eval "$(sudo slurm/local/start.sh | tail -n1)"; sbatch ...
#   sudo slurm/local/stop.sh
#
# One node by default: this machine itself (its short hostname, all its CPUs, 127.0.0.1).
# LDOT_SLURM_NODES=2 (or more, at most one per CPU) makes each node a "host" of its own: a network
# namespace with its own address on a bridge (interface `ldot0` inside, as a cluster's nodes share an
# interface name), a UTS namespace with its own hostname (<prefix>1, <prefix>2, ...), its own slurmd
# on its share of the CPUs and memory; slurmctld and munged, on this machine, serve them all. Inside
# the namespaces the node names resolve to their addresses through /etc/netns/<namespace>/hosts (bound
# over /etc/hosts for the node's slurmd and its jobs), so a job sees SLURM_JOB_NODELIST=<prefix>[1-2] and reaches
# every node by name over the bridge, never over loopback. stop.sh removes the namespaces, links,
# bridge and hosts files again.
#
# Settings (environment): LDOT_SLURM_LOCAL_DIR (state, logs, slurm.conf, its munged's socket; default
# /var/tmp/ldot-slurm), LDOT_SLURM_CTLD_PORT / LDOT_SLURM_SLURMD_PORT (default 6817 / 6818),
# LDOT_SLURM_INSTALL=0 (never apt); with several nodes LDOT_SLURM_NODE_PREFIX (node names, default
# ldot<ctld port>n) and LDOT_SLURM_SUBNET (the bridge's /24 as its first three octets, default
# 10.<ctld port / 256>.<ctld port % 256>; this machine is .1 on it, node i is .(i+1)). Clusters with
# their own directory and ports share nothing, munged included (each runs its own on a socket in its
# directory), and several-node clusters with other ports also use other namespaces, links and subnets,
# so several can run on one machine: the tests start one per session (tests/slurm/conftest.py). The
# directory must be one the munge user can reach (not under a root-only 0700 folder).
# Exit 77 means "cannot run here" (not root, no apt, packages missing, no network namespaces): the
# tests skip on it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${LDOT_SLURM_LOCAL_DIR:-/var/tmp/ldot-slurm}
CTLD_PORT=${LDOT_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LDOT_SLURM_SLURMD_PORT:-6818}
CONF=$STATE/etc/slurm.conf
NODES=${LDOT_SLURM_NODES:-1}

cannot() { echo "local slurm: cannot start: $*" >&2; exit 77; }
fail() { echo "local slurm: error: $*" >&2; exit 1; }
say() { echo "local slurm: $*" >&2; }

[[ $(id -u) == 0 ]] || cannot "needs root (installs slurm-wlm/munge and runs slurmd as root)"

# -- packages ------------------------------------------------------------------------------
have_all() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null
if ! have_all; then
    [[ ${LDOT_SLURM_INSTALL:-1} != 0 ]] || cannot "slurm-wlm/munge are not installed and LDOT_SLURM_INSTALL=0"
    command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and there is no apt-get"
    say "installing slurm-wlm and munge with apt (once)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } \
        >"${TMPDIR:-/tmp}/ldot-slurm-apt.log" 2>&1 \
        || cannot "apt-get install slurm-wlm munge failed (see ${TMPDIR:-/tmp}/ldot-slurm-apt.log)"
    have_all || cannot "slurm-wlm installed but slurmctld/slurmd/sbatch/munged are still missing"
fi

mkdir -p "$STATE"
# One start/stop at a time: two test sessions on one machine must not interleave their restarts.
exec 9>"$STATE/.startstop.lock"
flock -w 300 9 || fail "another start/stop holds $STATE/.startstop.lock"
# (Daemons start with fd 9 closed, or they would hold this lock for as long as they run.)

# -- a clean slate: the previous instance's daemons and jobs go ------------------------------
# The controller's saved state stays: it holds the job id counter, and job ids must not start
# again at 1, or a new job would reuse (and `--resume auto` continue) an old job's output directory.
LDOT_SLURM_LOCKED=1 "$here/stop.sh" --keep-munge
rm -rf "$STATE/run" "$STATE/etc"  # (spool stays: a new slurmd finds orphaned steps through it)
mkdir -p "$STATE/statesave" "$STATE/spool" "$STATE/run" "$STATE/log" "$STATE/etc"

# -- munge: this cluster's own daemon, on a socket in its directory (reused if it still answers) ------
MUNGE_DIR=$STATE/munge
SOCKET=$MUNGE_DIR/munge.socket
munge_ok() { munge -S "$SOCKET" -n 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1; }
if ! munge_ok; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile /etc/munge/munge.key >/dev/null 2>&1 \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    rm -f "$SOCKET" "$SOCKET.lock" "$MUNGE_DIR/munged.pid"
    runuser -u munge -- munged --socket="$SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" 9>&- \
        || fail "munged did not start (see $MUNGE_DIR/munged.log)"
    for _ in $(seq 50); do munge_ok && break; sleep 0.2; done
    munge_ok || fail "munged started but munge/unmunge fail (see $MUNGE_DIR/munged.log)"
fi

# -- the nodes: this machine, or one network + UTS namespace per node ----------------------------
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
if ((NODES == 1)); then
    ctld_addr=127.0.0.1
    node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    node_names=$host
    node_list=$host
    per_node="SlurmdPidFile=$STATE/run/slurmd.pid
SlurmdSpoolDir=$STATE/spool
SlurmdLogFile=$STATE/log/slurmd.log"
else
    # shellcheck source=slurm/local/netns.sh
    source "$here/netns.sh"
    ldot_nodes_plan || cannot "$LDOT_NODES_ERROR"
    ldot_nodes_up || fail "$LDOT_NODES_ERROR"
    ctld_addr=$LDOT_NET_HOST_ADDR
    cpus=$((cpus / NODES))
    mem_mb=$((mem_mb / NODES))
    node_lines=""
    for i in "${!LDOT_NODE_NAMES[@]}"; do
        node_lines+="NodeName=${LDOT_NODE_NAMES[$i]} NodeHostname=${LDOT_NODE_NAMES[$i]} NodeAddr=${LDOT_NODE_ADDRS[$i]} CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
        mkdir -p "$STATE/spool/${LDOT_NODE_NAMES[$i]}"
    done
    node_names=${LDOT_NODE_NAMES[*]}
    node_list=$LDOT_NODE_PREFIX[1-$NODES]
    # one slurmd per node on one machine: each its own pid file, spool directory and log (%n: node name);
    # the nodes' CPUs and memory are the configured shares, not what each slurmd finds on the machine;
    # messages go straight to each node, never forwarded through another one.
    per_node="SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmdSpoolDir=$STATE/spool/%n
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdParameters=config_overrides
TreeWidth=65533"
fi

# -- slurm.conf: the controller on this machine, the nodes above -----------------------------------
cat >"$CONF" <<CONF
# Generated by slurm/local/start.sh for a $NODES-node test cluster on $host; regenerated on every start.
ClusterName=ldot-local
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again: keep tests short.
AuthInfo=cred_expire=5,socket=$SOCKET
StateSaveLocation=$STATE/statesave
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
$per_node
# Containers rarely offer usable cgroups: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Look at pending jobs (a requeued one waiting out cred_expire) every 2 s instead of every 30-60 s.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to scontrol for 10 minutes: the tests read their final state.
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=120
# How long a node may not answer before it is declared down (the controller pings every third of it):
# longer than the tests cut a node's link for (tests/slurm/test_two_nodes.py), so they end as they choose.
SlurmdTimeout=300
$node_lines
PartitionName=local Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$CONF
start_ctld() {
    slurmctld -i -f "$CONF" 9>&- || return 1
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}
if ! start_ctld; then  # unreadable saved state (e.g. another Slurm version): start from nothing
    LDOT_SLURM_LOCKED=1 "$here/stop.sh" --keep-munge
    rm -rf "$STATE/statesave" && mkdir -p "$STATE/statesave" "$STATE/run"
    start_ctld || fail "slurmctld did not start (see $STATE/log/slurmctld.log)"
fi
if ((NODES == 1)); then
    slurmd -f "$CONF" 9>&- || fail "slurmd did not start (see $STATE/log/slurmd.log)"
else
    for i in "${!LDOT_NODE_NAMES[@]}"; do
        ldot_node_slurmd "$i" "$CONF" 9>&- || fail "slurmd of ${LDOT_NODE_NAMES[$i]} did not start (see $STATE/log/slurmd-${LDOT_NODE_NAMES[$i]}.log)"
    done
fi
node_states() { sinfo -h -N -n "$node_list" -o %T 2>/dev/null; }
all_are() { local want=$1 states; states=$(node_states); [[ -n $states ]] && ! grep -qvE "^($want)" <<<"$states"; }
for _ in $(seq 50); do all_are 'idle|mixed|allocated|completing' && break; sleep 0.2; done
# Jobs that an unclean stop left in the saved state must not run on here; slurmd is up, so their
# surviving processes (found through the spool directory) are ended too.
scancel --user=root >/dev/null 2>&1 || true

for _ in $(seq 150); do
    all_are idle && break
    if grep -qE '^(down|drain)' <<<"$(node_states)"; then  # e.g. left "down" by an unclean stop
        scontrol update nodename="$node_list" state=resume >/dev/null 2>&1 || true
    fi
    sleep 0.2
done
all_are idle || fail "nodes $node_list are '$(node_states | tr '\n' ' ')', not idle (see $STATE/log/slurmd*.log, $STATE/log/slurmctld.log)"
if ((NODES == 1)); then
    say "up: node $host, $cpus CPUs, ${mem_mb} MB, partition 'local'; state in $STATE"
else
    say "up: nodes $node_names ($(IFS=,; echo "${LDOT_NODE_ADDRS[*]}") on bridge $LDOT_NET_BRIDGE, interface" \
        "$LDOT_NET_IFNAME inside), $cpus CPUs and ${mem_mb} MB each, partition 'local'; state in $STATE"
fi
echo "export SLURM_CONF=$CONF"
