#!/usr/bin/env bash
# From a fresh clone to Shakespeare samples in one command:
#   1. install.sh: the venv (.venv, or VENV=DIR) with the PyTorch build that fits this machine
#   2. prepare Tiny Shakespeare by character (the text ships in data/shakespeare_char/input.txt)
#   3. train: config/shakespeare_char.py on a CUDA GPU (minutes), else config/shakespeare_char_cpu.py (a minute)
#   4. sample two passages from the trained model
# Run it again and it reuses what is there: the venv and its PyTorch, the prepared data, and the checkpoint
# (training resumes, and a finished run ends at once), so a second run goes straight to sampling (the same
# seed, so the same samples: `sample.py --seed=N` draws others).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${VENV:-$ROOT/.venv}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac  # a relative VENV is relative to where the user stands
export VENV
PY=$VENV/bin/python
cd "$ROOT"

bash install.sh

data=data/shakespeare_char
# meta.json is written last, so the three files together mean a complete dataset
if [ -f $data/train.bin ] && [ -f $data/val.bin ] && [ -f $data/meta.json ]; then
    echo "==> $data is prepared already: skipping prepare"
else
    echo "==> preparing Tiny Shakespeare, by character"
    "$PY" $data/prepare.py
fi

if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" = True ]; then
    config=config/shakespeare_char.py out=out-shakespeare-char
    echo "==> a CUDA GPU: training the 10.7M-parameter baby GPT ($config, a few minutes)"
else
    config=config/shakespeare_char_cpu.py out=out-shakespeare-char-cpu
    echo "==> no CUDA GPU: training the small CPU model ($config, about a minute)"
fi
if [ -f $out/checkpoint.json ]; then
    echo "==> $out has a checkpoint: resuming it (a finished run stops at once)"
fi
"$PY" train.py $config --out_dir=$out --init_from=auto   # resumes a checkpoint in out_dir, else starts afresh

echo "==> sampling from $out"
"$PY" sample.py --out_dir=$out --start="ROMEO:" --num_samples=2 --max_new_tokens=300
echo "==> done. More samples: $PY sample.py --out_dir=$out --start=\"JULIET:\""
