#!/usr/bin/env bash
# Run the test suite on the CPU (creates or reuses .venv). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q tests "$@"
