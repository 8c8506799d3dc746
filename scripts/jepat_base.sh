#!/usr/bin/env bash
# JEPA-T-B (216M trainable parameters), the published recipe: global batch 2048, DDP.
#   1 node:   GPUS_PER_NODE=8 CACHE_PATH=... bash scripts/jepat_base.sh
#   4 nodes:  on node i: NNODES=4 NODE_RANK=i MASTER_ADDR=node0 bash scripts/jepat_base.sh
# All variables (GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, CACHE_PATH, VAE_PATH,
# CLIP_PATH, OUTPUT_DIR, ACCUM_ITER) are described in scripts/torchrun_jepat.sh;
# the recipe is configs/imagenet-base.yaml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
MODEL=base
MAX_BATCH_PER_GPU="${MAX_BATCH_PER_GPU:-128}"   # a cap, not a measurement: no GPU has run this yet
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_jepat.sh"
