#!/usr/bin/env bash
# The built-in default, the `shapes` recipe (configs/shapes.yaml): train the tiny preset on the procedural
# `shapes` set (CPU is enough), then generate for seen and held-out color-shape prompts and judge
# every image. Output: output/shapes/{grid_seen.png, grid_heldout.png, manifest.jsonl, metrics.json, ...}
# Extra arguments go to main_jepat.py, e.g. `bash scripts/demo.sh --output_dir /tmp/run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python main_jepat.py "$@"
