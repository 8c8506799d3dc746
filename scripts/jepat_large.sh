#!/usr/bin/env bash
# JEPA-T-L (695M trainable parameters), the published recipe: global batch 2048, DDP with
# activation checkpointing.
#   1 node:   GPUS_PER_NODE=8 CACHE_PATH=... bash scripts/jepat_large.sh
#   4 nodes:  on node i: NNODES=4 NODE_RANK=i MASTER_ADDR=node0 bash scripts/jepat_large.sh
# Variables: see scripts/torchrun_jepat.sh; the recipe is configs/imagenet-large.yaml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
MODEL=large
MAX_BATCH_PER_GPU="${MAX_BATCH_PER_GPU:-64}"
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_jepat.sh"
