#!/usr/bin/env bash
# Set up the Python environment: a venv holding PyTorch (the build that fits this machine) and requirements.txt.
#
#   bash install.sh          # PyTorch + requirements.txt
#   bash install.sh --dev    # PyTorch + requirements-dev.txt (adds pytest, and what the tests need)
#   bash install.sh --serve  # PyTorch + requirements-serve.txt (adds FastAPI and uvicorn, for serve.py)
#
# VENV=DIR      the venv to use or create (default: .venv in the repository root). Any existing environment
#               with bin/python works, e.g. VENV=$CONDA_PREFIX.
# PYTHON=EXE    the Python that creates a missing venv (default: python3; 3.10 or newer).
# TORCH_CUDA_OK=1  on a machine without an NVIDIA GPU, install the package index's default PyTorch (on Linux
#               the CUDA build, gigabytes of libraries) instead of insisting on the CPU build.
#
# A second run is quick: an existing venv is reused, a PyTorch that imports is kept, and pip only checks
# that the requirements are satisfied.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${VENV:-$ROOT/.venv}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac  # a relative VENV is relative to where the user stands
PY=$VENV/bin/python

CPU_INDEX=https://download.pytorch.org/whl/cpu
TORCH_PIN=torch==2.13.0  # the release our CI machines' package index serves as a CPU build

requirements=$ROOT/requirements.txt
case ${1:-} in
    '') ;;
    --dev) requirements=$ROOT/requirements-dev.txt ;;
    --serve) requirements=$ROOT/requirements-serve.txt ;;
    *) echo "usage: bash install.sh [--dev | --serve]" >&2; exit 2 ;;
esac

say() { echo "==> $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

# true when the python $1 is 3.10 or newer
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }

# --- the venv ---------------------------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
    base=${PYTHON:-python3}
    command -v "$base" >/dev/null 2>&1 || die "no '$base' found: install Python 3.10 or newer (or name one with PYTHON=...)"
    python_ok "$base" || die "$base is $("$base" --version 2>&1); this project needs Python 3.10 or newer (name one with PYTHON=..., e.g. PYTHON=python3.12)"
    say "creating the venv $VENV ($("$base" --version 2>&1))"
    "$base" -m venv "$VENV"
else
    say "using the venv $VENV"
fi
python_ok "$PY" || die "$PY is $("$PY" --version 2>&1); this project needs Python 3.10 or newer: remove $VENV (or point VENV elsewhere) and rerun"

pip_install() { "$PY" -m pip install "$@"; }

# --- PyTorch ----------------------------------------------------------------------------------------------
has_nvidia_gpu() { nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }  # a driver that works and sees a GPU

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tried=()  # one phrase per PyTorch source tried, for the message when none fits

# try_source WHAT TORCH_SPEC [PIP_ARGS...]: ask pip (dry run) what installing TORCH_SPEC would bring; if that
# is a CPU build (no nvidia-* or triton package among it), install that exact torch and succeed.
try_source() {
    local what=$1 spec=$2 report=$tmp/report.json verdict version origin cuda
    shift 2
    rm -f "$report"
    if ! pip_install --dry-run --quiet --report "$report" "$spec" "$@" >"$tmp/pip.log" 2>&1; then
        say "  $what: not available ($(grep -v '^WARNING' "$tmp/pip.log" | tail -n 1 | cut -c1-160))"
        tried+=("$what: not available")
        return 1
    fi
    # the report lists every distribution pip would install: torch's version and origin, and the CUDA ones
    verdict=$("$PY" - "$report" <<'EOF'
import json, sys
install = json.load(open(sys.argv[1], encoding='utf-8')).get('install', [])
torch = [item for item in install if item['metadata']['name'].lower() == 'torch']
names = [item['metadata']['name'] for item in install]
canonical = [name.lower().replace('_', '-').replace('.', '-') for name in names]
cuda = [name for name, c in zip(names, canonical) if c.startswith('nvidia-') or c == 'triton']
if torch:
    print(torch[0]['metadata']['version'], torch[0].get('download_info', {}).get('url', '?'), *cuda)
else:
    print('-')
EOF
) || die "cannot read pip's dry-run report for $what"
    read -r version origin cuda <<<"$verdict"
    if [ "$version" = - ]; then
        # pip thinks torch is installed, yet it did not import: reinstalling on top would not help
        die "pip says PyTorch is installed in $VENV, but it does not import ($PY -c 'import torch' shows why); remove $VENV and rerun"
    fi
    if [ -n "$cuda" ]; then
        local packages more=''
        read -r -a packages <<<"$cuda"
        [ ${#packages[@]} -gt 1 ] && more=" and $((${#packages[@]} - 1)) more"
        say "  $what: torch $version, a CUDA build (${packages[0]}$more): skipped"
        tried+=("$what: only torch $version with CUDA packages")
        return 1
    fi
    say "  $what: torch $version, a CPU build ($origin): installing it"
    # the exact release the dry run found, from the same sources; a failure here stops (no other source)
    pip_install "torch==$version" "$@" || die "installing torch $version from $what failed (pip's message is above)"
}

# the oldest PyTorch requirements.txt accepts: an older one in the venv is replaced like a missing one (left to
# requirements.txt, pip would upgrade it to the package index's default build: the CUDA one on Linux)
new_enough() { [[ $1 =~ ^([0-9]+)\.([0-9]+) ]] && (( BASH_REMATCH[1] > 2 || (BASH_REMATCH[1] == 2 && BASH_REMATCH[2] >= 6) )); }

version=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) || version=
if [ -n "$version" ] && ! new_enough "$version"; then
    say "PyTorch $version in the venv is older than 2.6, the oldest this project runs on: replacing it"
    "$PY" -m pip uninstall --quiet --yes torch
fi
if [ -n "$version" ] && new_enough "$version"; then
    say "PyTorch $version is in the venv already: keeping it"
elif has_nvidia_gpu || [ "$(uname -s)" = Darwin ]; then
    # PyPI's Linux build of PyTorch is the CUDA one, its macOS build has MPS: the package index's default fits
    say "installing PyTorch (an NVIDIA GPU or macOS: the package index's default build)"
    pip_install torch
elif [ "${TORCH_CUDA_OK:-}" = 1 ]; then
    say "installing PyTorch: no NVIDIA GPU, but TORCH_CUDA_OK=1 accepts the package index's default (CUDA) build"
    pip_install torch
else
    # A CPU-only Linux machine: the CUDA build works here too, but brings gigabytes of CUDA libraries it
    # cannot use. Look for a CPU build, checking each candidate with a dry run before installing anything.
    say "no NVIDIA GPU: looking for a CPU build of PyTorch"
    # pip learnt --dry-run --report in 22.2; an old venv's pip gets upgraded first
    if ! "$PY" -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (22, 2))' 2>/dev/null; then
        say "upgrading pip (22.2 or newer is needed)"
        pip_install --quiet --upgrade 'pip>=22.2'
    fi
    # the PyTorch CPU index, with a short network timeout (pip's default can be minutes: an offline machine
    # should move on fast); then the package index pip is configured with, where the pin may be a CPU build
    try_source "the CPU index $CPU_INDEX" torch --index-url "$CPU_INDEX" --timeout 10 --retries 1 ||
    try_source "$TORCH_PIN from the configured package index" "$TORCH_PIN" ||
    try_source "torch from the configured package index" torch || {
        {
            echo
            echo "install.sh: no CPU build of PyTorch found for this machine (no NVIDIA GPU seen by nvidia-smi)."
            printf '  tried %s\n' "${tried[@]}"
            echo "Nothing was installed. Either install a CPU build of torch into the venv yourself and rerun, e.g. when"
            echo "online: $PY -m pip install torch --index-url $CPU_INDEX (or a CPU wheel file you have);"
            echo "or accept the CUDA build (gigabytes of libraries; it runs on a CPU too): rerun with TORCH_CUDA_OK=1."
        } >&2
        exit 1
    }
fi

# --- the rest ---------------------------------------------------------------------------------------------
# requirements say torch>=2.6, so the PyTorch above stays; a second run is a quick no-op check
say "installing ${requirements#"$ROOT"/}"
pip_install --quiet -r "$requirements"
say "the environment is ready: $PY"
