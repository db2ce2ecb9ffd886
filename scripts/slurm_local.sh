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
# shellcheck disable=SC2034  # read by slurm_common.sh
SCRIPT=slurm_local.sh
USAGE_LINES=5,7
DEFAULT_DIR=${GALCF_SLURM_DIR:-/tmp/galcf-slurm}
# shellcheck source=scripts/slurm_common.sh
source "$(dirname "$0")/slurm_common.sh"
slurm_args "$@"

if [ "$cmd" = stop ]; then
    stop_daemon slurmd "$DIR/slurmd.pid"
    stop_daemon slurmctld "$DIR/slurmctld.pid"
    exit 0
fi
if [ "$cmd" = status ]; then
    show_status
    exit 0
fi

install_slurm
[ "$(id -u)" = 0 ] || fail "the daemons run as SlurmUser=root: run this script as root"

# --- configuration ---------------------------------------------------------------------------
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
make_fake_gpus
new_conf=$(cat <<EOF
# Written by scripts/slurm_local.sh: one machine posing as a JURECA-DC GPU node.
ClusterName=galcf-local
SlurmctldHost=localhost
$(common_conf)
SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${GALCF_SLURMCTLD_PORT:-6817}
SlurmdPort=${GALCF_SLURMD_PORT:-6818}
MpiDefault=pmi2
NodeName=localhost Sockets=2 CoresPerSocket=64 ThreadsPerCore=1 RealMemory=512000 Gres=gpu:4 State=UNKNOWN
PartitionName=dc-gpu Nodes=localhost Default=YES MaxTime=24:00:00 DefMemPerCPU=4000 State=UP
PartitionName=dc-gpu-devel Nodes=localhost MaxTime=02:00:00 DefMemPerCPU=4000 State=UP
EOF
)
if write_conf "$new_conf" "NodeName=localhost Name=gpu File=$DIR/fakegpu[0-3]"; then
    # daemons from an older configuration: restart them
    stop_daemon slurmd "$DIR/slurmd.pid" >/dev/null
    stop_daemon slurmctld "$DIR/slurmctld.pid" >/dev/null
fi

# --- daemons ---------------------------------------------------------------------------------
start_slurmctld
if ! running_pid "$DIR/slurmd.pid" >/dev/null; then
    slurmd -f "$CONF" -N localhost >>"$DIR/log/slurmd.stderr" 2>&1 \
        || fail "slurmd did not start; see $DIR/log/slurmd.log and $DIR/log/slurmd.stderr"
fi
wait_idle localhost 1 "$DIR/log/slurmctld.log and $DIR/log/slurmd.log"
# another cluster on the same ports would answer sinfo while our daemons died
for daemon in slurmctld slurmd; do
    running_pid "$DIR/$daemon.pid" >/dev/null \
        || fail "$daemon exited after starting (ports in use by another Slurm? set GALCF_SLURMCTLD_PORT/GALCF_SLURMD_PORT); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
done
echo "Slurm is up: node localhost ($(sinfo -h -n localhost -o '%T' | sort -u | tr '\n' ' ' | sed 's/ $//')) in partitions dc-gpu (default), dc-gpu-devel; logs in $DIR/log"
echo "export SLURM_CONF=$CONF"
