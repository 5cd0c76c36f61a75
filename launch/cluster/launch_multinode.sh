#!/bin/bash
# ZAYA1 pretraining on MI300X nodes without a scheduler: run this once on every node.
#
#   NODE_RANK=0 NUM_NODES=2 COORDINATOR=10.0.0.1:12355 launch/cluster/launch_multinode.sh \
#       --config=zaya1_8b --workdir=/shared/runs/zaya1 --mesh=data:8 --dcn_mesh=data:2 --zero1 \
#       --set=step.grad_accum=64
#
# COORDINATOR is node 0's address and a free port; every node must reach it. The workdir must be on a file system
# that all nodes share (Orbax writes one checkpoint from all processes).
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1)}"
: "${NUM_NODES:?set NUM_NODES}"
: "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
# No cd: relative --data, --workdir and --tokenizer paths stay relative to where this is run.
repo="$(cd "$(dirname "$0")/../.." && pwd)"
source "$repo/launch/cluster/rocm_env.sh"
export HIP_VISIBLE_DEVICES="${HIP_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}"
# Read by zaya_jax.parallel.distributed.initialize.
export ZAYA_COORDINATOR_ADDRESS="$COORDINATOR" ZAYA_NUM_PROCESSES="$NUM_NODES" ZAYA_PROCESS_ID="$NODE_RANK"
exec python "$repo/launch/train.py" "$@"
