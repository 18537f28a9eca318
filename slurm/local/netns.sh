# The "hosts" of a several-node local cluster (sourced by start.sh and stop.sh, never run): one network
# namespace and one UTS namespace per node, joined by a bridge on this machine.
#
#   this machine (root namespace)              node i (network namespace ldot<port>n<i>)
#   bridge ldb<port>, address S.1  ──veth──  ldv<port>n<i> | ldot0, address S.(i+1), hostname <prefix><i>
#
# S is LDOT_SLURM_SUBNET (default 10.<port / 256>.<port % 256>, from the controller's port, so clusters on
# other ports use other subnets and names). Node names resolve inside every namespace through
# /etc/netns/<namespace>/hosts, bound over /etc/hosts for the node's slurmd and so for every job step
# (as `ip netns exec NS` does for what it runs). Everything made here is listed in $STATE/nodes.env
# before it is made, so that stop.sh (ldot_nodes_down) removes it even after a start that failed halfway.
#
# Expects STATE, CTLD_PORT and NODES to be set.

LDOT_NET_IFNAME=ldot0  # the nodes' interface: the same name on every node, as on a cluster

# ldot_nodes_plan: the names and addresses of the nodes (LDOT_NODE_NAMES, LDOT_NODE_ADDRS, LDOT_NODE_NETNS,
# LDOT_NODE_VETHS, LDOT_NET_BRIDGE, LDOT_NET_HOST_ADDR); returns 1 with LDOT_NODES_ERROR when it cannot be done here.
ldot_nodes_plan() {
    local subnet=${LDOT_SLURM_SUBNET:-10.$((CTLD_PORT / 256)).$((CTLD_PORT % 256))} i
    LDOT_NODE_PREFIX=${LDOT_SLURM_NODE_PREFIX:-ldot${CTLD_PORT}n}
    LDOT_NET_BRIDGE=ldb$CTLD_PORT
    LDOT_NET_HOST_ADDR=$subnet.1
    LDOT_NODE_NAMES=() LDOT_NODE_ADDRS=() LDOT_NODE_NETNS=() LDOT_NODE_VETHS=()
    if ! [[ $NODES =~ ^[1-9][0-9]*$ ]] || ((NODES > $(nproc))); then
        LDOT_NODES_ERROR="LDOT_SLURM_NODES=$NODES: give 1 to $(nproc) nodes (one CPU each at least)"
        return 1
    fi
    if ! [[ $subnet =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        LDOT_NODES_ERROR="LDOT_SLURM_SUBNET=$subnet: give the first three octets of a /24, e.g. 10.78.32"
        return 1
    fi
    for ((i = 1; i <= NODES; i++)); do
        LDOT_NODE_NAMES+=("$LDOT_NODE_PREFIX$i")
        LDOT_NODE_ADDRS+=("$subnet.$((i + 1))")
        LDOT_NODE_NETNS+=("ldot${CTLD_PORT}n$i")
        LDOT_NODE_VETHS+=("ldv${CTLD_PORT}n$i")  # the host's end of node i's link (15 characters at most)
    done
    if ! command -v ip >/dev/null || ! command -v unshare >/dev/null; then
        LDOT_NODES_ERROR="several nodes need iproute2's ip and util-linux's unshare"
        return 1
    fi
    if ! ip netns list >/dev/null 2>&1; then
        LDOT_NODES_ERROR="several nodes need network namespaces: 'ip netns list' fails here"
        return 1
    fi
    if ip -4 -o addr show | grep -v " $LDOT_NET_BRIDGE " | grep -q " inet $subnet\."; then
        LDOT_NODES_ERROR="subnet $subnet.0/24 is in use on this machine: set LDOT_SLURM_SUBNET to a free one"
        return 1
    fi
}

# ldot_nodes_up: the bridge, each node's namespaces, link, address and hosts file (after ldot_nodes_plan).
ldot_nodes_up() {
    local i ns veth hosts plan
    # first the list of what is about to exist, for stop.sh; and whatever of it a previous instance on this
    # port left behind without its list (a removed state directory) goes first
    plan="LDOT_NET_BRIDGE=$LDOT_NET_BRIDGE
LDOT_NODE_NETNS=(${LDOT_NODE_NETNS[*]})
LDOT_NODE_VETHS=(${LDOT_NODE_VETHS[*]})
LDOT_NODE_NAMES=(${LDOT_NODE_NAMES[*]})"
    echo "$plan" >"$STATE/nodes.env"
    ldot_nodes_down
    echo "$plan" >"$STATE/nodes.env"
    hosts="127.0.0.1 localhost"$'\n'"::1 localhost ip6-localhost ip6-loopback"$'\n'"$LDOT_NET_HOST_ADDR $(hostname -s)"$'\n'
    for i in "${!LDOT_NODE_NAMES[@]}"; do hosts+="${LDOT_NODE_ADDRS[$i]} ${LDOT_NODE_NAMES[$i]}"$'\n'; done
    LDOT_NODES_ERROR="could not create bridge $LDOT_NET_BRIDGE ($LDOT_NET_HOST_ADDR/24)"
    ip link add "$LDOT_NET_BRIDGE" type bridge || return 1
    ip addr add "$LDOT_NET_HOST_ADDR/24" dev "$LDOT_NET_BRIDGE" || return 1
    ip link set "$LDOT_NET_BRIDGE" up || return 1
    for i in "${!LDOT_NODE_NAMES[@]}"; do
        ns=${LDOT_NODE_NETNS[$i]} veth=${LDOT_NODE_VETHS[$i]}
        LDOT_NODES_ERROR="could not set up node ${LDOT_NODE_NAMES[$i]}: namespace $ns, link $veth"
        ip netns add "$ns" || return 1
        ip link add "$veth" type veth peer name "$LDOT_NET_IFNAME" netns "$ns" || return 1
        ip link set "$veth" master "$LDOT_NET_BRIDGE" up || return 1
        ip -n "$ns" addr add "${LDOT_NODE_ADDRS[$i]}/24" dev "$LDOT_NET_IFNAME" || return 1
        ip -n "$ns" link set lo up || return 1
        ip -n "$ns" link set "$LDOT_NET_IFNAME" up || return 1
        ip -n "$ns" route add default via "$LDOT_NET_HOST_ADDR" || return 1
        mkdir -p "/etc/netns/$ns" && printf '%s' "$hosts" >"/etc/netns/$ns/hosts" || return 1
    done
    LDOT_NODES_ERROR=""
}

# ldot_node_slurmd I CONF: node I's slurmd in its namespaces (daemonizes, so it returns once it runs):
# the node's network namespace, a UTS namespace with the node's hostname, and a mount namespace in which
# the node's hosts file covers /etc/hosts (what `ip netns exec` does, without its remount of /sys, which
# would hide the cgroup file system slurmd reads).
ldot_node_slurmd() {
    local i=$1 conf=$2
    nsenter --net="/run/netns/${LDOT_NODE_NETNS[$i]}" -- unshare --uts --mount --propagation slave -- \
        sh -c 'mount --bind "$3" /etc/hosts && hostname "$1" && exec slurmd -f "$2" -N "$1"' \
        sh "${LDOT_NODE_NAMES[$i]}" "$conf" "/etc/netns/${LDOT_NODE_NETNS[$i]}/hosts"
}

# ldot_nodes_down: whatever $STATE/nodes.env lists goes: processes left in the namespaces (by pid), the
# namespaces, links, bridge and hosts files. Safe to run twice, or when nothing was made.
ldot_nodes_down() {
    local LDOT_NET_BRIDGE="" ns veth pid
    local -a LDOT_NODE_NETNS=() LDOT_NODE_VETHS=() LDOT_NODE_NAMES=()
    [[ -f $STATE/nodes.env ]] || return 0
    # shellcheck disable=SC1091
    source "$STATE/nodes.env"
    for ns in "${LDOT_NODE_NETNS[@]}"; do
        [[ -e /run/netns/$ns ]] || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    done
    for ns in "${LDOT_NODE_NETNS[@]}"; do
        [[ ! -e /run/netns/$ns ]] || ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/${ns:?}"
    done
    for veth in "${LDOT_NODE_VETHS[@]}"; do
        ! ip link show "$veth" >/dev/null 2>&1 || ip link del "$veth" 2>/dev/null || true
    done
    if [[ -n $LDOT_NET_BRIDGE ]] && ip link show "$LDOT_NET_BRIDGE" >/dev/null 2>&1; then
        ip link del "$LDOT_NET_BRIDGE" 2>/dev/null || true
    fi
    rm -f "$STATE/nodes.env"
}
