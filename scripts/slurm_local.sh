#!/usr/bin/env bash
# A one-machine Slurm cluster that looks like a JURECA-DC GPU node, for testing the real
# jobs/*.sbatch scripts (CI, laptops with root). Idempotent; run as root.
#
#   scripts/slurm_local.sh [start] [STATE_DIR]   install if needed, configure, start, wait for idle
#   scripts/slurm_local.sh stop [STATE_DIR]      stop the daemons started from STATE_DIR
#   scripts/slurm_local.sh status [STATE_DIR]    sinfo/squeue of that cluster
#
# STATE_DIR defaults to $GALCF_SLURM_DIR, else /tmp/galcf-slurm. It holds slurm.conf,
# gres.conf, state, spool, pid and log files. Afterwards, in any shell:
#   export SLURM_CONF=STATE_DIR/slurm.conf
#
# The node claims 128 cores, 512 GB and four GPUs whatever the hardware has
# (SlurmdParameters=config_overrides): jobs with JURECA's --cpus-per-task=32 and --gres=gpu:4
# are accepted unchanged. The "GPUs" are four character devices (/dev/null's numbers), so
# each task sees CUDA_VISIBLE_DEVICES=0,1,2,3 and the code still finds no GPU: it falls back
# to CPU. No munge (auth/none), no slurmdbd (any --account is accepted; no sacct).
set -euo pipefail

usage() {
    sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd=start
case "${1:-}" in
    start|stop|status) cmd=$1; shift ;;
    -h|--help) usage ;;
esac
[ $# -le 1 ] || usage
DIR=${1:-${GALCF_SLURM_DIR:-/tmp/galcf-slurm}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin
TIMEOUT=${GALCF_SLURM_TIMEOUT:-60}

fail() {
    echo "slurm_local.sh: $*" >&2
    exit 1
}

# pid from a pid file, if that process is alive
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

if [ "$cmd" = stop ]; then
    stop_daemon slurmd "$DIR/slurmd.pid"
    stop_daemon slurmctld "$DIR/slurmctld.pid"
    exit 0
fi
if [ "$cmd" = status ]; then
    [ -f "$CONF" ] || fail "no cluster configured in $DIR (run: $0 start $DIR)"
    sinfo -N -o '%N %P %T %c %m %G'
    squeue
    exit 0
fi

# --- install ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    [ "$(id -u)" = 0 ] || fail "Slurm is not installed and installing it needs root (apt-get install slurmctld slurmd slurm-client)"
    command -v apt-get >/dev/null || fail "Slurm is not installed and there is no apt-get to install it with"
    echo "installing Slurm (slurmctld slurmd slurm-client) from the distribution"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client \
            >"$DIR/apt.log" 2>&1; then
        # a fresh machine may have no package lists yet
        DEBIAN_FRONTEND=noninteractive apt-get update >>"$DIR/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client \
            >>"$DIR/apt.log" 2>&1 || fail "apt-get install of Slurm failed; see $DIR/apt.log"
    fi
fi
[ "$(id -u)" = 0 ] || fail "the daemons run as SlurmUser=root: run this script as root"

# --- configuration ---------------------------------------------------------------------------
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
for i in 0 1 2 3; do
    dev=$DIR/fakegpu$i
    if [ ! -c "$dev" ]; then
        rm -f "$dev"
        mknod "$dev" c 1 3 || fail "mknod $dev c 1 3 failed (a GPU GRES needs a device file)"
    fi
done

new_conf=$(cat <<EOF
# Written by scripts/slurm_local.sh: one machine posing as a JURECA-DC GPU node.
ClusterName=galcf-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${GALCF_SLURMCTLD_PORT:-6817}
SlurmdPort=${GALCF_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=pmi2
ReturnToService=2
# the node may claim more than the hardware has
SlurmdParameters=config_overrides
GresTypes=gpu
# batch jobs are requeueable (scontrol requeue from the job's USR1 handler)
JobRequeue=1
KillWait=2
# finished jobs stay visible to scontrol show job (no sacct here)
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=localhost Sockets=2 CoresPerSocket=64 ThreadsPerCore=1 RealMemory=512000 Gres=gpu:4 State=UNKNOWN
PartitionName=dc-gpu Nodes=localhost Default=YES MaxTime=24:00:00 DefMemPerCPU=4000 State=UP
PartitionName=dc-gpu-devel Nodes=localhost MaxTime=02:00:00 DefMemPerCPU=4000 State=UP
EOF
)
new_gres="NodeName=localhost Name=gpu File=$DIR/fakegpu[0-3]"

changed=0
if [ "$new_conf" != "$(cat "$CONF" 2>/dev/null)" ]; then
    printf '%s\n' "$new_conf" >"$CONF"
    changed=1
fi
if [ "$new_gres" != "$(cat "$DIR/gres.conf" 2>/dev/null)" ]; then
    printf '%s\n' "$new_gres" >"$DIR/gres.conf"
    changed=1
fi
if [ "$changed" = 1 ]; then  # daemons from an older configuration: restart them
    stop_daemon slurmd "$DIR/slurmd.pid" >/dev/null
    stop_daemon slurmctld "$DIR/slurmctld.pid" >/dev/null
fi

# --- daemons ---------------------------------------------------------------------------------
if ! running_pid "$DIR/slurmctld.pid" >/dev/null; then
    slurmctld -f "$CONF" >>"$DIR/log/slurmctld.stderr" 2>&1 \
        || fail "slurmctld did not start; see $DIR/log/slurmctld.log and $DIR/log/slurmctld.stderr"
fi
if ! running_pid "$DIR/slurmd.pid" >/dev/null; then
    slurmd -f "$CONF" -N localhost >>"$DIR/log/slurmd.stderr" 2>&1 \
        || fail "slurmd did not start; see $DIR/log/slurmd.log and $DIR/log/slurmd.stderr"
fi

deadline=$((SECONDS + TIMEOUT))
state=
while :; do
    state=$(sinfo -h -n localhost -o '%T' 2>/dev/null | sort -u | tr '\n' ' ') || true
    case "$state" in
        *idle*|*mixed*|*allocated*) break ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        fail "node localhost not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}'); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
    fi
    if [[ "$state" == *down* || "$state" == *drain* || "$state" == *inval* ]]; then
        scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
done
# another cluster on the same ports would answer sinfo while our daemons died
for daemon in slurmctld slurmd; do
    running_pid "$DIR/$daemon.pid" >/dev/null \
        || fail "$daemon exited after starting (ports in use by another Slurm? set GALCF_SLURMCTLD_PORT/GALCF_SLURMD_PORT); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
done
state=${state% }
echo "Slurm is up: node localhost ($state) in partitions dc-gpu (default), dc-gpu-devel; logs in $DIR/log"
echo "export SLURM_CONF=$CONF"
