# Site settings for JSC systems (JURECA-DC, JUWELS, JUSUF, JEDI, JUPITER), sourced by
# jobs/*.sbatch from the repository root. Outside JSC (no matching $SYSTEMNAME) it changes
# nothing, so the same job scripts run on any Slurm cluster; `export GALCF_SITE=jsc` forces it.
# Edit the module lines to the software stage you installed galcf-hpc with.
# shellcheck shell=bash

case "${GALCF_SITE:-${SYSTEMNAME:-}}" in
    jsc|jurecadc|jureca|juwels|juwelsbooster|jusuf|jedi|jupiter) ;;
    *) return 0 ;;
esac

# The software a job runs with: the modules galcf-hpc was installed with (docs/jureca.md,
# section 1), then the repository's virtual environment. Override with
# `export GALCF_MODULES="..."` before sbatch; GALCF_MODULES=none leaves modules alone.
GALCF_MODULES=${GALCF_MODULES:-Stages/2025 GCC OpenMPI Python CUDA}
if [ "$GALCF_MODULES" != none ] && command -v module >/dev/null 2>&1; then
    module --force purge
    # shellcheck disable=SC2086  # a list of module names
    module load $GALCF_MODULES
fi
if [ -f "${SLURM_SUBMIT_DIR:-.}/.venv/bin/activate" ]; then
    # shellcheck source=/dev/null
    source "${SLURM_SUBMIT_DIR:-.}/.venv/bin/activate"
fi
# MPI: psslurm starts ranks with its own PMI (or `srun --mpi=pspmix`); SLURM_MPI_TYPE=pmi2,
# stock Slurm's setting for the pip MPICH wheel, does nothing there: use the module's MPI.

# Node-to-node traffic over InfiniBand: NCCL and gloo bind to ib0, and the rendezvous host
# is the first node's InfiniBand name, which on JSC systems is its host name with an "i".
export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)i"
    export MASTER_ADDR
fi
# srun does not inherit --cpus-per-task from sbatch since Slurm 22.05
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
