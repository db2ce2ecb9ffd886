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

usage() {
    sed -n '6,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd=start
case "${1:-}" in
    start|stop|status) cmd=$1; shift ;;
    -h|--help) usage ;;
esac
[ $# -le 1 ] || usage
DIR=${1:-${GALCF_SLURM2_DIR:-/tmp/galcf-slurm2}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin
TIMEOUT=${GALCF_SLURM_TIMEOUT:-60}
BRIDGE=galcfbr0
NET=10.77.0
NODES=(n1 n2)
CTLD_HOST=$(hostname -s)

fail() {
    echo "slurm_multinode.sh: $*" >&2
    exit 1
}

ns() { echo "galcf-$1"; }            # network namespace of node n1 -> galcf-n1
addr() { echo "$NET.1${1#n}"; }      # n1 -> 10.77.0.11

running_pid() {
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop_daemon() {  # name pidfile
    local pid
    if pid=$(running_pid "$2"); then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        echo "stopped $1 (pid $pid)"
    fi
    rm -f "$2"
}

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
    [ -f "$CONF" ] || fail "no cluster configured in $DIR (run: $0 start $DIR)"
    sinfo -N -o '%N %P %T %c %m %G'
    squeue
    exit 0
fi

[ "$(id -u)" = 0 ] || fail "network namespaces and the daemons (SlurmUser=root) need root: run this script as root"
command -v ip >/dev/null || fail "no 'ip' command (install iproute2)"
{ command -v unshare && command -v nsenter; } >/dev/null || fail "no 'unshare'/'nsenter' command (util-linux)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "Slurm is not installed and there is no apt-get to install it with"
    echo "installing Slurm (slurmctld slurmd slurm-client) from the distribution"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client \
        >"$DIR/apt.log" 2>&1 || { DEBIAN_FRONTEND=noninteractive apt-get update >>"$DIR/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client \
            >>"$DIR/apt.log" 2>&1 || fail "apt-get install of Slurm failed; see $DIR/apt.log"; }
fi

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
for i in 0 1 2 3; do
    dev=$DIR/fakegpu$i
    if [ ! -c "$dev" ]; then
        rm -f "$dev"
        mknod "$dev" c 1 3 || fail "mknod $dev c 1 3 failed (a GPU GRES needs a device file)"
    fi
done
node_lines=
for node in "${NODES[@]}"; do
    node_lines="${node_lines}NodeName=$node NodeAddr=$(addr "$node") NodeHostname=$node Sockets=2 CoresPerSocket=64 ThreadsPerCore=1 RealMemory=512000 Gres=gpu:4 State=UNKNOWN
"
done
new_conf=$(cat <<EOF
# Written by scripts/slurm_multinode.sh: two nodes in network namespaces posing as JURECA-DC GPU nodes.
ClusterName=galcf-multi
SlurmctldHost=$CTLD_HOST($NET.1)
SlurmUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=${GALCF_SLURM2_CTLD_PORT:-6827}
SlurmdPort=${GALCF_SLURM2_SLURMD_PORT:-6828}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
JobRequeue=1
KillWait=2
MinJobAge=600
SchedulerParameters=sched_interval=2
${node_lines}PartitionName=dc-gpu Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=24:00:00 DefMemPerCPU=4000 State=UP
EOF
)
new_gres="NodeName=$(IFS=,; echo "${NODES[*]}") Name=gpu File=$DIR/fakegpu[0-3]"

changed=0
if [ "$new_conf" != "$(cat "$CONF" 2>/dev/null)" ]; then
    printf '%s\n' "$new_conf" >"$CONF"
    changed=1
fi
if [ "$new_gres" != "$(cat "$DIR/gres.conf" 2>/dev/null)" ]; then
    printf '%s\n' "$new_gres" >"$DIR/gres.conf"
    changed=1
fi
if [ "$changed" = 1 ]; then
    for node in "${NODES[@]}"; do stop_daemon "slurmd $node" "$DIR/slurmd-$node.pid" >/dev/null; done
    stop_daemon slurmctld "$DIR/slurmctld.pid" >/dev/null
fi

# --- daemons ---------------------------------------------------------------------------------
if ! running_pid "$DIR/slurmctld.pid" >/dev/null; then
    slurmctld -f "$CONF" >>"$DIR/log/slurmctld.stderr" 2>&1 \
        || fail "slurmctld did not start; see $DIR/log/slurmctld.log and $DIR/log/slurmctld.stderr"
fi
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

deadline=$((SECONDS + TIMEOUT))
while :; do
    idle=$(sinfo -h -N -p dc-gpu -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)' || true)
    [ "$idle" -ge "${#NODES[@]}" ] && break
    state=$(sinfo -h -N -o '%N:%T' 2>/dev/null | tr '\n' ' ' || true)
    if [ "$SECONDS" -ge "$deadline" ]; then
        fail "nodes ${NODES[*]} not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}'); see $DIR/log/slurmctld.log and $DIR/log/slurmd-n*.log"
    fi
    if [[ "$state" == *down* || "$state" == *drain* || "$state" == *inval* ]]; then
        scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
done
running_pid "$DIR/slurmctld.pid" >/dev/null \
    || fail "slurmctld exited after starting (port in use? set GALCF_SLURM2_CTLD_PORT); see $DIR/log/slurmctld.log"
for node in "${NODES[@]}"; do
    running_pid "$DIR/slurmd-$node.pid" >/dev/null \
        || fail "slurmd $node exited after starting; see $DIR/log/slurmd-$node.log"
done
echo "Slurm is up: nodes ${NODES[*]} ($(for n in "${NODES[@]}"; do printf '%s=%s ' "$n" "$(addr "$n")"; done| sed 's/ $//')) in partition dc-gpu; controller $CTLD_HOST at $NET.1; logs in $DIR/log"
echo "export SLURM_CONF=$CONF"
