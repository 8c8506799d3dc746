#!/usr/bin/env bash
# Cache VAE latents (image + horizontal flip) and caption embeddings for training, on every GPU of
# this machine (or one CPU process without GPUs). Extra arguments go to main_cache.py, e.g.
#   bash scripts/cache_vae.sh --config imagenet-base --dataset imagenet --data_path /data/imagenet \
#        --vae_path pretrained_models/vae/kl16.ckpt --cache_dir cache/in256-kl16 \
#        --text_encoder_path /models/clip-vit-b-32.bin
# (--config: the training recipe, which gives the tokenizer, resolution and text encoder of the cache)
#   NPROC=4 bash scripts/cache_vae.sh ...          # a given number of ranks
#   TORCHRUN_ARGS="--nnodes 2 --node_rank 0 --rdzv_endpoint host:29500" bash scripts/cache_vae.sh ...
# Rerun the same command after an interruption: it finishes what is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$NPROC" -le 1 ] && [ -z "${TORCHRUN_ARGS:-}" ]; then
    python main_cache.py "$@"
else
    # shellcheck disable=SC2086
    torchrun ${TORCHRUN_ARGS:---standalone} --nproc_per_node "$NPROC" main_cache.py "$@"
fi
