#!/usr/bin/env bash
# JEPA-T-H (1.44B trainable parameters), the published recipe: global batch 2048, FSDP2
# (parameters, gradients, optimizer state and EMA sharded; bf16 gathers, fp32 reductions) with
# activation checkpointing. Checkpoints are consolidated on rank 0, so main_sample.py reads them.
#   1 node:   GPUS_PER_NODE=8 CACHE_PATH=... bash scripts/jepat_huge.sh
#   4 nodes:  on node i: NNODES=4 NODE_RANK=i MASTER_ADDR=node0 bash scripts/jepat_huge.sh
# Variables: see scripts/torchrun_jepat.sh; the recipe is configs/imagenet-huge.yaml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
MODEL=huge
MAX_BATCH_PER_GPU="${MAX_BATCH_PER_GPU:-32}"
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_jepat.sh"
