#!/usr/bin/env bash
# Run the test suite on the CPU (creates or reuses .venv). Extra arguments go to pytest.
# Two pytest workers (JEPAT_TEST_WORKERS to change), each test file on one of them so that a
# file's shared fixtures (a trained run, a cache) are built once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q -n "${JEPAT_TEST_WORKERS:-2}" --dist loadfile tests "$@"
