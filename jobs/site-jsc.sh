# Site settings for JSC systems (JURECA-DC, JUWELS, JUSUF, JEDI, JUPITER), sourced by
# jobs/*.sbatch from the repository root. Outside JSC (no matching $SYSTEMNAME) it changes
# nothing, so the same job scripts run on any Slurm cluster; `export GALCF_SITE=jsc` forces it.
# Edit the module lines to the software stage you installed galcf-hpc with.
# shellcheck shell=bash

case "${GALCF_SITE:-${SYSTEMNAME:-}}" in
    jsc|jurecadc|jureca|juwels|juwelsbooster|jusuf|jedi|jupiter) ;;
    *) return 0 ;;
esac

# module --force purge
# module load Stages/2025 GCC OpenMPI Python PyTorch   # or a venv: source "$SLURM_SUBMIT_DIR/.venv/bin/activate"
# With the MPICH wheel instead of the site MPI (catalog job): export SLURM_MPI_TYPE=pmi2

# Node-to-node traffic over InfiniBand: NCCL and gloo bind to ib0, and the rendezvous host
# is the first node's InfiniBand name, which on JSC systems is its host name with an "i".
export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)i"
    export MASTER_ADDR
fi
# srun does not inherit --cpus-per-task from sbatch since Slurm 22.05
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
