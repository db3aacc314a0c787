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
# two worker processes by default (TEST_WORKERS=0 runs the tests in this one, TEST_WORKERS=4 in four), each taking
# whole test files, so a file's fixtures are built once. Most of a test is starting the scripts it checks and
# waiting on their files, which two workers overlap: on 2 cores the suite takes ~7 minutes instead of ~11.5
workers=(-n "${TEST_WORKERS:-2}" --dist loadfile)
# -rs: a skipped test prints its reason, one line (a test skips only where the machine lacks something, e.g. chromium)
echo "==> python -m pytest -q -rs ${workers[*]}${target:+ $target} $*"
exec "$VENV/bin/python" -m pytest -q -rs "${workers[@]}" $target "$@"
