#!/usr/bin/env bash
# Set up the venv (install.sh --dev: PyTorch, requirements-dev.txt) and run the test suite; arguments go to
# pytest, e.g. `bash test.sh -k tokenizer` or `bash test.sh -x tests/test_model.py` (that file only).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${VENV:-$ROOT/.venv}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac  # a relative VENV is relative to where the user stands
export VENV
cd "$ROOT"

bash install.sh --dev
# the whole tests folder, unless an argument names test files or tests (tests/test_model.py::test_x) itself
target=tests
for arg in "$@"; do
    if [ -e "${arg%%::*}" ]; then target=; fi
done
echo "==> python -m pytest -q${target:+ $target} $*"
exec "$VENV/bin/python" -m pytest -q $target "$@"
