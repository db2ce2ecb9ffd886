#!/usr/bin/env bash
# A two-node Slurm cluster on one machine: slurmctld in the root network namespace, two
# slurmd "nodes" n1 and n2, each in its own network (and UTS) namespace, joined by a bridge.
# For testing real multi-node jobs (jobs/train.sbatch --nodes=2) where ranks talk over a
# network. Idempotent; run as root. Needs `ip` (iproute2), `unshare` and Slurm.
#
#   scripts/slurm_multinode.sh [start] [STATE_DIR]   configure network + Slurm, start, wait for idle
#   scripts/slurm_multinode.sh stop [STATE_DIR]      stop the daemons, remove the namespaces and bridge
#   scripts/slurm_multinode.sh status [STATE_DIR]    sinfo/squeue of that cluster
#
# STATE_DIR defaults to $GALCF_SLURM2_DIR, else /tmp/galcf-slurm2. Afterwards, in any shell:
#   export SLURM_CONF=STATE_DIR/slurm.conf
#
# Network: bridge galcfbr0 10.77.0.1/24 (the controller's address) in the root namespace;
# namespaces galcf-n1 (10.77.0.11, host name n1) and galcf-n2 (10.77.0.12, host name n2),
# each with a veth into the bridge and loopback up. Names resolve inside the namespaces
# through /etc/netns/galcf-nX/hosts (bind-mounted onto /etc/hosts in slurmd's mount namespace), so
# the global /etc/hosts is left alone: jobs/train.sbatch's MASTER_ADDR=n1 resolves to
# 10.77.0.11 on both nodes, and each node's own host name resolves to its veth address (not
# 127.0.0.1), so gloo advertises an address the other node can reach.
# The nodes look like JURECA-DC GPU nodes in partition dc-gpu (128 cores, 4 fake GPUs each,
# SlurmdParameters=config_overrides), like scripts/slurm_local.sh, on other ports (6827/6828,
# or GALCF_SLURM2_CTLD_PORT/GALCF_SLURM2_SLURMD_PORT), so both clusters can run at once.
set -euo pipefail
# shellcheck disable=SC2034  # read by slurm_common.sh
SCRIPT=slurm_multinode.sh
USAGE_LINES=7,9
DEFAULT_DIR=${GALCF_SLURM2_DIR:-/tmp/galcf-slurm2}
# shellcheck source=scripts/slurm_common.sh
source "$(dirname "$0")/slurm_common.sh"
slurm_args "$@"
BRIDGE=galcfbr0
NET=10.77.0
NODES=(n1 n2)
CTLD_HOST=$(hostname -s)

ns() { echo "galcf-$1"; }            # network namespace of node n1 -> galcf-n1
addr() { echo "$NET.1${1#n}"; }      # n1 -> 10.77.0.11

stop_all() {
    local node pids
    for node in "${NODES[@]}"; do
        stop_daemon "slurmd $node" "$DIR/slurmd-$node.pid"
    done
    stop_daemon slurmctld "$DIR/slurmctld.pid"
    for node in "${NODES[@]}"; do
        if ip netns list 2>/dev/null | grep -qw "$(ns "$node")"; then
            # leftovers of jobs on that node (slurmstepd, tasks): all were started by this cluster
            pids=$(ip netns pids "$(ns "$node")" 2>/dev/null || true)
            if [ -n "$pids" ]; then
                # shellcheck disable=SC2086
                kill -9 $pids 2>/dev/null || true
            fi
            ip netns del "$(ns "$node")" 2>/dev/null || true
            echo "removed network namespace $(ns "$node")"
        fi
        ip link del "galcf-v${node#n}" 2>/dev/null || true
        rm -rf "/etc/netns/$(ns "$node")"
        rmdir /etc/netns 2>/dev/null || true  # only if empty (ip netns may use it too)
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" && echo "removed bridge $BRIDGE"
    fi
}

if [ "$cmd" = stop ]; then
    [ "$(id -u)" = 0 ] || fail "stopping needs root"
    stop_all
    exit 0
fi
if [ "$cmd" = status ]; then
    show_status
    exit 0
fi

[ "$(id -u)" = 0 ] || fail "network namespaces and the daemons (SlurmUser=root) need root: run this script as root"
command -v ip >/dev/null || fail "no 'ip' command (install iproute2)"
{ command -v unshare && command -v nsenter; } >/dev/null || fail "no 'unshare'/'nsenter' command (util-linux)"
install_slurm

# --- network ---------------------------------------------------------------------------------
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge || fail "cannot create bridge $BRIDGE (no CAP_NET_ADMIN?)"
fi
ip addr replace "$NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
hosts="127.0.0.1 localhost
$NET.1 $CTLD_HOST galcfctl"
for node in "${NODES[@]}"; do
    hosts="$hosts
$(addr "$node") $node"
done
for node in "${NODES[@]}"; do
    n=$(ns "$node")
    veth=galcf-v${node#n}
    if ! ip netns list | grep -qw "$n"; then
        ip netns add "$n" || fail "cannot create network namespace $n"
    fi
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip netns exec "$n" ip link del eth0 2>/dev/null || true
        ip link add "$veth" type veth peer name eth0 netns "$n" || fail "cannot create veth pair $veth/$n:eth0"
    fi
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip netns exec "$n" ip addr replace "$(addr "$node")/24" dev eth0
    ip netns exec "$n" ip link set eth0 up
    ip netns exec "$n" ip link set lo up
    mkdir -p "/etc/netns/$n"
    printf '%s\n' "$hosts" >"/etc/netns/$n/hosts"
done

# --- configuration ---------------------------------------------------------------------------
mkdir -p "$DIR/state" "$DIR/log"
for node in "${NODES[@]}"; do mkdir -p "$DIR/spool-$node"; done
make_fake_gpus
node_lines=
for node in "${NODES[@]}"; do
    node_lines="${node_lines}NodeName=$node NodeAddr=$(addr "$node") NodeHostname=$node Sockets=2 CoresPerSocket=64 ThreadsPerCore=1 RealMemory=512000 Gres=gpu:4 State=UNKNOWN
"
done
ALL=$(IFS=,; echo "${NODES[*]}")
new_conf=$(cat <<EOF
# Written by scripts/slurm_multinode.sh: two nodes in network namespaces posing as JURECA-DC GPU nodes.
ClusterName=galcf-multi
SlurmctldHost=$CTLD_HOST($NET.1)
$(common_conf)
SlurmdSpoolDir=$DIR/spool-%n
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=${GALCF_SLURM2_CTLD_PORT:-6827}
SlurmdPort=${GALCF_SLURM2_SLURMD_PORT:-6828}
MpiDefault=none
${node_lines}PartitionName=dc-gpu Nodes=$ALL Default=YES MaxTime=24:00:00 DefMemPerCPU=4000 State=UP
EOF
)
if write_conf "$new_conf" "NodeName=$ALL Name=gpu File=$DIR/fakegpu[0-3]"; then
    for node in "${NODES[@]}"; do stop_daemon "slurmd $node" "$DIR/slurmd-$node.pid" >/dev/null; done
    stop_daemon slurmctld "$DIR/slurmctld.pid" >/dev/null
fi

# --- daemons ---------------------------------------------------------------------------------
start_slurmctld
for node in "${NODES[@]}"; do
    if ! running_pid "$DIR/slurmd-$node.pid" >/dev/null; then
        # own network namespace, host name and /etc/hosts (a private mount namespace). Not `ip
        # netns exec`: it remounts /sys, hiding /sys/fs/cgroup, and slurmd then fails to start.
        nsenter --net="/run/netns/$(ns "$node")" unshare --mount --uts sh -c \
            "mount --bind /etc/netns/$(ns "$node")/hosts /etc/hosts && hostname $node && exec slurmd -f '$CONF' -N $node" \
            >>"$DIR/log/slurmd-$node.stderr" 2>&1 \
            || fail "slurmd $node did not start; see $DIR/log/slurmd-$node.log and $DIR/log/slurmd-$node.stderr"
    fi
done
wait_idle "$ALL" "${#NODES[@]}" "$DIR/log/slurmctld.log and $DIR/log/slurmd-n*.log"
running_pid "$DIR/slurmctld.pid" >/dev/null \
    || fail "slurmctld exited after starting (port in use? set GALCF_SLURM2_CTLD_PORT); see $DIR/log/slurmctld.log"
for node in "${NODES[@]}"; do
    running_pid "$DIR/slurmd-$node.pid" >/dev/null \
        || fail "slurmd $node exited after starting; see $DIR/log/slurmd-$node.log"
done
echo "Slurm is up: nodes ${NODES[*]} ($(for n in "${NODES[@]}"; do printf '%s=%s ' "$n" "$(addr "$n")"; done| sed 's/ $//')) in partition dc-gpu; controller $CTLD_HOST at $NET.1; logs in $DIR/log"
echo "export SLURM_CONF=$CONF"
