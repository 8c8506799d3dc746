#!/usr/bin/env bash
# Every GPU-only path in one command (about 10 minutes on one GPU): bf16 base train steps at the
# recipe's batch with torch.compile off and on (recompiles, graph breaks, host syncs, peak memory),
# training from a latent cache with a caption table, 2 workers, accumulation and compile, DDP over
# NCCL with one process, FSDP2 with one rank and a resume, huge under FSDP2 with a timed checkpoint
# save, base sampling, main_sample.py and the evaluation with the registered small extractor.
# Ends with a table (status, seconds, figure, share of the GPU's bf16 matmul rate); exit status 1
# when a check fails. Logs and runs: output/gpu_smoke/ (or --out DIR).
#
#   bash benchmarks/gpu_smoke.sh                    # on the GPU machine
#   bash benchmarks/gpu_smoke.sh --device cpu       # rehearsal at tiny sizes on the CPU (gloo, fp32)
#
# A GPU node without network reuses a prebuilt environment: the .venv of this checkout (built on
# the same platform by `bash scripts/test.sh` or `source scripts/env.sh` where there is network),
# another one named by JEPAT_VENV=PATH, or one installed from a wheel folder with
# JEPAT_WHEELS=DIR (fill it with `pip download -r requirements.txt -d DIR`). No weights are needed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
python benchmarks/gpu_smoke.py "$@"
