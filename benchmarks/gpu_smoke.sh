#!/usr/bin/env bash
# Every GPU-only path in one command (about 10 minutes on one GPU): bf16 base train steps with
# torch.compile off and on and fused AdamW, DDP over NCCL with one process, FSDP2 with one rank and
# a resume, base sampling, main_sample.py and the evaluation with the registered small extractor.
# Ends with a table (status, seconds, figure, share of the GPU's bf16 matmul rate); exit status 1
# when a check fails. Logs and runs: output/gpu_smoke/ (or --out DIR).
#
#   bash benchmarks/gpu_smoke.sh                    # on the GPU machine
#   bash benchmarks/gpu_smoke.sh --device cpu       # rehearsal at tiny sizes on the CPU (gloo, fp32)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
python benchmarks/gpu_smoke.py "$@"
