#!/usr/bin/env bash
# Shared launcher of the published JEPA-T recipe (global batch 2048), sourced by jepat_base.sh,
# jepat_large.sh and jepat_huge.sh after they set MODEL, MAX_BATCH_PER_GPU and STRATEGY_ARGS.
# Run one copy per node (by hand, or under a scheduler); extra arguments go to main_jepat.py.
#
# Variables (environment):
#   GPUS_PER_NODE  processes (GPUs) per node                 default 8
#   NNODES         nodes                                      default 1
#   NODE_RANK      this node's index, 0 .. NNODES-1           default 0 (or SLURM_NODEID)
#   MASTER_ADDR    address of node 0 (rendezvous, env://)     default 127.0.0.1
#   MASTER_PORT    free TCP port on node 0                    default 29500
#   DATA_PATH      ImageNet train folder (read by cache_vae.sh) default data/imagenet/train
#   VAE_PATH       MAR's KL-16 checkpoint                     default pretrained_models/vae/kl16.ckpt
#   CACHE_PATH     cached VAE latents + caption embeddings    default cache/imagenet256
#   CLIP_PATH      local open_clip ViT-L-14 weights (or the tag "openai" with a hub cache)
#   OUTPUT_DIR     run folder (checkpoints, logs, grids)      default output/jepat_${MODEL}
#   GLOBAL_BATCH   images per optimizer step                  default 2048 (the published recipe)
#   ACCUM_ITER     micro-batches per step                     default: the fewest that keep the
#                  per-GPU batch at or under MAX_BATCH_PER_GPU
# A run that finds OUTPUT_DIR/checkpoint-last.pth resumes from it (exactly: data position, RNG,
# optimizer, EMA), so the same command restarts a preempted job.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
DATA_PATH="${DATA_PATH:-data/imagenet/train}"
CACHE_PATH="${CACHE_PATH:-cache/imagenet256}"
CLIP_PATH="${CLIP_PATH:-openai}"
VAE_PATH="${VAE_PATH:-pretrained_models/vae/kl16.ckpt}"
OUTPUT_DIR="${OUTPUT_DIR:-output/jepat_${MODEL}}"
GLOBAL_BATCH="${GLOBAL_BATCH:-2048}"

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

RESUME_ARGS=()
if [ -f "$OUTPUT_DIR/checkpoint-last.pth" ]; then
    RESUME_ARGS=(--resume "$OUTPUT_DIR/checkpoint-last.pth")
fi

# The published recipe (MAR / D-JEPA conventions): KL-16 latents at 256 px (patch 1: 256 tokens),
# velocity flow head of the preset with uniform flow times, diffusion_batch_mul 4, mask ratio N(1, 0.25) on [0.7, 1],
# 64 buffer tokens, condition drop 0.1, blr 1e-4 (lr = blr x 2048 / 256 = 8e-4), 100 warmup
# epochs then constant lr, 400 epochs, wd 0.02, grad clip 3.0, EMA 0.9999, flow and JEPA
# losses weighted 1 : 1, bf16 autocast, CLIP ViT-L-14 caption tokens.
RECIPE=(
    --model "$MODEL" --img_size 256 --patch_size 1 --buffer_size 64
    --mask_ratio_min 0.7 --mask_ratio_std 0.25 --cond_drop_prob 0.1 --diffusion_batch_mul 4
    --flow_prediction v --t_logit_mean none --flow_weight 1.0 --jepa_weight 1.0
    --text_encoder clip --clip_model ViT-L-14 --text_encoder_path "$CLIP_PATH" --text_max_length 0
    --batch_size "$BATCH_PER_GPU" --accum_iter "$ACCUM_ITER" --epochs 400 --warmup_epochs 100
    --blr 1e-4 --lr_schedule constant --weight_decay 0.02 --grad_clip 3.0
    --ema_rate 0.9999 --ema_rate_start 0.9999
    --num_iter 64 --temperature 0.95 --cfg 3.0 --cfg_schedule linear
    --precision bf16 --device cuda --num_workers 8 --log_freq 100 --save_every_steps 1000 --grid_freq 10
    --no_eval --output_dir "$OUTPUT_DIR"
)
# Training reads the latent cache (and its caption embeddings) written beforehand by
#   bash scripts/cache_vae.sh --dataset imagenet --data_path "$DATA_PATH" --img_size 256 \
#       --tokenizer kl16 --vae_path "$VAE_PATH" --cache_dir "$CACHE_PATH" --text_encoder clip ...
# The VAE itself is only used to decode sample grids.
DATA=(--dataset cached --data_path "$CACHE_PATH" --tokenizer kl16 --vae_path "$VAE_PATH")

exec torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    main_jepat.py "${RECIPE[@]}" "${DATA[@]}" "${STRATEGY_ARGS[@]}" "${RESUME_ARGS[@]}" "$@"
