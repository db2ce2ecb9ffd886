#!/bin/bash
# Submit a scaling study: one jobs/scaling.sbatch job per node count, all appending to the same
# results file. Slurm fixes the node count per job, so this is a loop of sbatch calls, not a
# job array. The jobs share a job name and run one after the other (--dependency=singleton):
# no two points of the study compete for the file system or the network, and the budget is not
# blocked by a queued 64-node job while the small ones wait. GALCF_SWEEP_PARALLEL=1 drops that.
#
#   jobs/scaling_sweep.sh [sbatch options] CONFIG "1 2 4 8" [MODE [ENGINE [LOADER]]] [-- run args]
#   e.g. jobs/scaling_sweep.sh --account=<budget> configs/galaxy10_decals.yaml "1 2 4 8 16" weak ddp dali
#        jobs/scaling_sweep.sh configs/galaxy10_decals.yaml "1 2 4 8" strong ddp dali -- --set train.global_batch=512
#
# MODE weak|strong (default weak), ENGINE ddp|deepspeed (ddp), LOADER dali|torch|synthetic (dali).
# Options before CONFIG go to every sbatch (--account=..., --time=..., --partition=dc-gpu-devel);
# or export SBATCH_ACCOUNT=<budget>. Results: $GALCF_SCALING_OUT (default
# runs/scaling/results.jsonl). SBATCH=<command> replaces sbatch (e.g. SBATCH=echo for a dry run).
set -euo pipefail

usage() {
    sed -n '8,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

SBATCH_OPTS=()
while [ $# -gt 0 ] && [[ $1 == -* ]]; do
    [ "$1" = "-h" ] || [ "$1" = "--help" ] && usage
    SBATCH_OPTS+=("$1")
    shift
done
[ $# -ge 2 ] || usage
CONFIG=$1
NODES=$2
shift 2
MODE=weak ENGINE=ddp LOADER=dali
[ $# -gt 0 ] && [ "$1" != "--" ] && { MODE=$1; shift; }
[ $# -gt 0 ] && [ "$1" != "--" ] && { ENGINE=$1; shift; }
[ $# -gt 0 ] && [ "$1" != "--" ] && { LOADER=$1; shift; }
[ $# -gt 0 ] && [ "$1" = "--" ] && shift
case $MODE in weak|strong) ;; *) echo "scaling_sweep.sh: MODE must be weak or strong, got '$MODE'" >&2; exit 2 ;; esac
case $ENGINE in ddp|deepspeed) ;; *) echo "scaling_sweep.sh: ENGINE must be ddp or deepspeed, got '$ENGINE'" >&2; exit 2 ;; esac
case $LOADER in dali|torch|synthetic) ;; *) echo "scaling_sweep.sh: LOADER must be dali, torch or synthetic, got '$LOADER'" >&2; exit 2 ;; esac
if [ ! -f "$CONFIG" ]; then
    echo "scaling_sweep.sh: config file '$CONFIG' not found" >&2
    exit 2
fi
for n in $NODES; do
    if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
        echo "scaling_sweep.sh: node count '$n' is not a positive integer (NODES=\"$NODES\")" >&2
        exit 2
    fi
done
OUT=${GALCF_SCALING_OUT:-runs/scaling/results.jsonl}
DEP=(--dependency=singleton)
[ "${GALCF_SWEEP_PARALLEL:-0}" = "1" ] && DEP=()
mkdir -p runs "$(dirname "$OUT")"
for n in $NODES; do
    ${SBATCH:-sbatch} "${SBATCH_OPTS[@]}" "${DEP[@]}" --nodes="$n" --job-name="galcf-scaling-$MODE-$ENGINE-$LOADER" \
        jobs/scaling.sbatch "$CONFIG" --mode "$MODE" --engine "$ENGINE" --loader "$LOADER" --out "$OUT" "$@"
done
echo "submitted ${NODES// /, } node(s): $MODE $ENGINE/$LOADER -> $OUT; then" \
     "galcf-hpc scaling analyze $OUT --out $(dirname "$OUT")" >&2
