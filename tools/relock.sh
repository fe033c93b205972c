#!/usr/bin/env bash
# Re-lock the project's dependencies: build a throw-away venv from pyproject.toml alone (the newest
# releases its bounds allow), run the whole test suite in it, and only if it passes write
# requirements/constraints.txt from that venv. Review the diff before committing it.
#
#     bash tools/relock.sh            # re-lock
#     KEEP_VENV=1 bash tools/relock.sh  # keep the venv (path printed) for a closer look
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false
export PIP_DISABLE_PIP_VERSION_CHECK=1
EXTRAS="$(grep -o 'EXTRAS=.*' .ci/run | head -1 | cut -d'"' -f2)"
VENV="$(mktemp -d)/venv"
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[${EXTRAS}]"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider
{
  sed -n '/^#/p' requirements/constraints.txt
  "$VENV/bin/python" -m pip freeze --exclude-editable
} > requirements/constraints.txt.new
mv requirements/constraints.txt.new requirements/constraints.txt
echo "requirements/constraints.txt re-locked from $VENV"
[ "${KEEP_VENV:-0}" = "1" ] || rm -rf "$(dirname "$VENV")"
