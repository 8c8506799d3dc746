#!/usr/bin/env bash
# Shared launcher of the published JEPA-T recipes (global batch 2048), sourced by jepat_base.sh,
# jepat_large.sh and jepat_huge.sh after they set MODEL and MAX_BATCH_PER_GPU. The recipe itself
# (model, loss, optimisation, sampling) is configs/imagenet-$MODEL.yaml; this file only adds
# where the data and weights are and how the cluster splits the batch. Run one copy per node (by
# hand, or under a scheduler); extra arguments go to main_jepat.py and override the recipe.
#
# Variables (environment):
#   GPUS_PER_NODE  processes (GPUs) per node                 default 8
#   NNODES         nodes                                      default 1
#   NODE_RANK      this node's index, 0 .. NNODES-1           default 0 (or SLURM_NODEID)
#   MASTER_ADDR    address of node 0 (rendezvous, env://)     default 127.0.0.1
#   MASTER_PORT    free TCP port on node 0                    default 29500
#   CACHE_PATH     cached VAE latents + caption embeddings    default cache/imagenet256
#                  (written by scripts/cache_vae.sh; see the README)
#   VAE_PATH       MAR's KL-16 checkpoint (decodes grids)     default pretrained_models/vae/kl16.ckpt
#   CLIP_PATH      local open_clip ViT-B-32 weights (or the tag "openai" with a hub cache)
#   OUTPUT_DIR     run folder (checkpoints, logs, grids)      default output/jepat_${MODEL}
#   SOCKET_IFNAME  network interface between the nodes        default: unset (NCCL's and gloo's choice);
#                  exported as NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (e.g. eth0, ib0)
#   MAX_RESTARTS   times torchrun restarts the workers after   default 0
#                  one dies (OOM, a lost GPU); they resume from checkpoint-last.pth by themselves
#   GLOBAL_BATCH   images per optimizer step                  default 2048 (the published recipe)
#   ACCUM_ITER     micro-batches per step                     default: the fewest that keep the
#                  per-GPU batch at or under MAX_BATCH_PER_GPU
# --resume auto: rank 0 looks for OUTPUT_DIR/checkpoint-last.pth and every rank of every node
# follows its decision (exactly: data position, RNG, optimizer, EMA), so the same command restarts a
# preempted job. OUTPUT_DIR must be on a file system every node mounts at the same path (checked at
# start-up). Multi-node: NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME name the network interface the
# nodes reach each other on (e.g. eth0, ib0); set them when the default route is not that one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
CACHE_PATH="${CACHE_PATH:-cache/imagenet256}"
CLIP_PATH="${CLIP_PATH:-openai}"
VAE_PATH="${VAE_PATH:-pretrained_models/vae/kl16.ckpt}"
OUTPUT_DIR="${OUTPUT_DIR:-output/jepat_${MODEL}}"
GLOBAL_BATCH="${GLOBAL_BATCH:-2048}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

if [ -n "${SOCKET_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME="$SOCKET_IFNAME" GLOO_SOCKET_IFNAME="$SOCKET_IFNAME"
fi

WORLD=$((GPUS_PER_NODE * NNODES))
if [ -z "${ACCUM_ITER:-}" ]; then
    ACCUM_ITER=1
    while [ $((GLOBAL_BATCH % (WORLD * ACCUM_ITER))) -ne 0 ] \
          || [ $((GLOBAL_BATCH / (WORLD * ACCUM_ITER))) -gt "$MAX_BATCH_PER_GPU" ]; do
        ACCUM_ITER=$((ACCUM_ITER + 1))
        if [ "$ACCUM_ITER" -gt "$GLOBAL_BATCH" ]; then
            echo "no accumulation splits a global batch of $GLOBAL_BATCH over $WORLD GPUs" >&2; exit 1
        fi
    done
fi
if [ $((GLOBAL_BATCH % (WORLD * ACCUM_ITER))) -ne 0 ]; then
    echo "GLOBAL_BATCH $GLOBAL_BATCH is not divisible by $WORLD GPUs x ACCUM_ITER $ACCUM_ITER" >&2; exit 1
fi
BATCH_PER_GPU=$((GLOBAL_BATCH / (WORLD * ACCUM_ITER)))
echo "[jepat_${MODEL}] ${NNODES} node(s) x ${GPUS_PER_NODE} GPUs x batch ${BATCH_PER_GPU} x accum ${ACCUM_ITER} = ${GLOBAL_BATCH}; node ${NODE_RANK}, master ${MASTER_ADDR}:${MASTER_PORT}"


exec torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts "$MAX_RESTARTS" \
    main_jepat.py --config "imagenet-${MODEL}" --device cuda \
    --data_path "$CACHE_PATH" --vae_path "$VAE_PATH" --text_encoder_path "$CLIP_PATH" \
    --batch_size "$BATCH_PER_GPU" --accum_iter "$ACCUM_ITER" --output_dir "$OUTPUT_DIR" \
    --resume auto "$@"
