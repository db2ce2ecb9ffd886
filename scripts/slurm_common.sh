# shellcheck shell=bash
# Shared by scripts/slurm_local.sh and scripts/slurm_multinode.sh (sourced, not run).
# The caller sets SCRIPT (its name, for messages), USAGE_LINES (the lines of its header
# comment that show its usage) and DEFAULT_DIR, then calls `slurm_args "$@"`.

fail() {
    echo "$SCRIPT: $*" >&2
    exit 1
}

usage() {
    sed -n "${USAGE_LINES}p" "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# sets cmd (start | stop | status), DIR, CONF, SLURM_CONF, TIMEOUT for the caller
# shellcheck disable=SC2034
slurm_args() {
    cmd=start
    case "${1:-}" in
        start|stop|status) cmd=$1; shift ;;
        -h|--help) usage ;;
    esac
    [ $# -le 1 ] || usage
    DIR=${1:-$DEFAULT_DIR}
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    CONF=$DIR/slurm.conf
    export SLURM_CONF=$CONF
    export PATH=$PATH:/usr/sbin:/sbin
    TIMEOUT=${GALCF_SLURM_TIMEOUT:-60}
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

show_status() {
    [ -f "$CONF" ] || fail "no cluster configured in $DIR (run: $0 start $DIR)"
    sinfo -N -o '%N %P %T %c %m %G'
    squeue
}

install_slurm() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
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
}

# four character devices with /dev/null's numbers: the files of the fake GPU GRES
make_fake_gpus() {
    local i dev
    for i in 0 1 2 3; do
        dev=$DIR/fakegpu$i
        if [ ! -c "$dev" ]; then
            rm -f "$dev"
            mknod "$dev" c 1 3 || fail "mknod $dev c 1 3 failed (a GPU GRES needs a device file)"
        fi
    done
}

# slurm.conf lines every local cluster shares (the rest is per script)
common_conf() {
    cat <<COMMON
SlurmUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
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
COMMON
}

# write slurm.conf and gres.conf; returns 0 when either changed (daemons must restart)
write_conf() {  # conf gres
    local changed=1
    if [ "$1" != "$(cat "$CONF" 2>/dev/null)" ]; then
        printf '%s\n' "$1" >"$CONF"
        changed=0
    fi
    if [ "$2" != "$(cat "$DIR/gres.conf" 2>/dev/null)" ]; then
        printf '%s\n' "$2" >"$DIR/gres.conf"
        changed=0
    fi
    return $changed
}

start_slurmctld() {
    if ! running_pid "$DIR/slurmctld.pid" >/dev/null; then
        slurmctld -f "$CONF" >>"$DIR/log/slurmctld.stderr" 2>&1 \
            || fail "slurmctld did not start; see $DIR/log/slurmctld.log and $DIR/log/slurmctld.stderr"
    fi
}

# wait until NODES (a comma list) are all usable; resume nodes that came up down/drained
wait_idle() {  # nodes count logs
    local deadline=$((SECONDS + TIMEOUT)) usable state
    while :; do
        usable=$(sinfo -h -N -n "$1" -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)' || true)
        [ "$usable" -ge "$2" ] && break
        state=$(sinfo -h -N -n "$1" -o '%N:%T' 2>/dev/null | tr '\n' ' ' || true)
        if [ "$SECONDS" -ge "$deadline" ]; then
            fail "node(s) $1 not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}'); see $3"
        fi
        if [[ "$state" == *down* || "$state" == *drain* || "$state" == *inval* ]]; then
            scontrol update NodeName="$1" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
}
