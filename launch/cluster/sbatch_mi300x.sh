#!/bin/bash
# ZAYA1 pretraining on MI300X nodes under SLURM: one task per node, each driving the node's 8 GPUs.
#
#   sbatch --nodes=16 launch/cluster/sbatch_mi300x.sh --config=zaya1_8b --workdir=/shared/runs/zaya1 \
#       --mesh=data:8 --dcn_mesh=data:16 --zero1 --set=step.grad_accum=8
#
# JAX reads SLURM_* itself (zaya_jax/parallel/distributed.py): the first node is the coordinator. Plan first:
#   python launch/plan.py --config=zaya1_8b --mesh=data:8 --dcn_mesh=data:16 --zero1
#SBATCH --job-name=zaya1
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@300  # the loop saves a checkpoint on SIGTERM; 5 minutes before the time limit

set -euo pipefail
cd "${SLURM_SUBMIT_DIR}"  # sbatch runs a spooled copy of this file: the repository is where it was submitted from
if [[ ! -f launch/cluster/rocm_env.sh ]]; then
  echo "error: submit from the zaya_jax repository root (sbatch was run in ${SLURM_SUBMIT_DIR})" >&2
  exit 1
fi
source launch/cluster/rocm_env.sh
# Every GPU the job gave the node, numbered as HIP sees them (SLURM's ROCR_VISIBLE_DEVICES may already narrow them).
export HIP_VISIBLE_DEVICES="${HIP_VISIBLE_DEVICES:-$(seq -s, 0 $((${SLURM_GPUS_ON_NODE:-8} - 1)))}"

# --kill-on-bad-exit: one failed host ends the job instead of leaving the others blocked in a collective.
# --cpus-per-task again: srun of Slurm 22.05-23.02 does not inherit it from #SBATCH (the data pipeline's threads).
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK}" python launch/train.py "$@"
