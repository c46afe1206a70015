#!/usr/bin/env bash
# Train on one or several machines with torchrun (docs/distributed.md). Edit the variables, then run this
# script on every machine: NODE_RANK=0 on the first, 1, 2, ... on the others.
#
#   NNODES=1 GPUS=8 bash docs/launch/torchrun.sh                       # one machine, 8 GPUs
#   NNODES=2 NODE_RANK=0 MASTER=node0.internal bash docs/launch/torchrun.sh   # machine 0 of 2
#   NNODES=2 NODE_RANK=1 MASTER=node0.internal bash docs/launch/torchrun.sh   # machine 1 of 2
#
# Extra arguments go to run.py, e.g. `bash docs/launch/torchrun.sh trainer.strategy=fsdp`.
set -euo pipefail

NNODES=${NNODES:-1}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}   # processes per machine, one per GPU
NODE_RANK=${NODE_RANK:-0}
MASTER=${MASTER:-127.0.0.1}             # the address of machine 0, reachable from the others
PORT=${PORT:-29500}
# out_dir must be on a file system every machine shares (rank 0 writes it; every rank reads it to resume),
# and with several machines the tracking store must be one they all reach: an MLflow server.
OUT_DIR=${OUT_DIR:-outputs}

if [ "$NNODES" -eq 1 ]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER" --master_port "$PORT")
fi

cd "$(dirname "$0")/../.."
exec torchrun "${rendezvous[@]}" --nproc_per_node "$GPUS" run.py \
    model=blackmamba-1.5b \
    trainer.devices="$GPUS" trainer.num_nodes="$NNODES" trainer.strategy=ddp \
    moe.expert_parallel=1 \
    out_dir="$OUT_DIR" \
    "$@"
