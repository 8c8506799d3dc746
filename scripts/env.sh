#!/usr/bin/env bash
# Create (first time) or reuse the project's virtual environment in .venv and activate it.
# Sourced by the other scripts; safe to source by hand: `source scripts/env.sh`.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JEPAT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV" || { echo "[env] could not create a venv with $PYTHON" >&2; return 1 2>/dev/null || exit 1; }
fi
STAMP="$VENV/.requirements.sha"
WANT="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[env] installing requirements.txt (first run: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # JEPAT_WHEELS=DIR: install from a folder of wheels, for a machine without network (fill it on
    # one with network: pip download -r requirements.txt -d DIR, on the same Python and platform)
    "$VENV/bin/python" -m pip install --quiet ${JEPAT_WHEELS:+--no-index --find-links "$JEPAT_WHEELS"} \
        -r "$ROOT/requirements.txt" \
        || { echo "[env] pip install failed. Without network: copy a .venv built on this platform to $VENV" \
                  "(JEPAT_VENV=PATH to use another), or set JEPAT_WHEELS to a folder filled by" \
                  "'pip download -r requirements.txt -d DIR'" >&2; return 1 2>/dev/null || exit 1; }
    echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# no weights are ever downloaded at run time
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT" || exit 1
