"""
The memory figure of train.py --plan against measurement: for each configuration, the peak that --plan predicts
against the peak train.py measures in its training phase (a few iterations), on a CPU, where both are the whole
process's resident memory.

    python bench_plan.py              # the table in the README (~10 minutes on 2 cores)
    python bench_plan.py 6 7          # its rows 6 and 7

Each row is two fresh processes with the same settings on the shipped Tiny Shakespeare (prepared first if it is
not): `train.py ... --plan`, whose prediction includes the process's own baseline (its resident memory when the
plan is made, less the model's weights then held), and `train.py ... --max_iters=3`, whose peak resident memory in
the training phase (runtime.MemoryPhases) is the measurement. Rows with processes run under
`torchrun --nproc_per_node=2` (gloo), and the measurement is the larger of the two processes' peaks. As in
bench_memory.py, glibc is told to return large blocks to the system (MALLOC_MMAP_THRESHOLD_): otherwise it keeps
what tensors free, and the resident memory measures the allocator's history, not the tensors alive.
"""
import os
import re
import subprocess
import sys
import tempfile

import bench_memory
from configurator import fail

ROOT = os.path.dirname(os.path.abspath(__file__))
COMMON = ['--device=cpu', '--compile=False', '--dropout=0.0', '--bias=False',
          '--eval_iters=1', '--eval_interval=1000', '--log_interval=1', '--warmup_iters=0', '--plot=False',
          '--always_save_checkpoint=False']
NARROW = ['--n_layer=6', '--n_head=8', '--n_embd=256']  # activations dominate
WIDE = ['--n_layer=6', '--n_head=8', '--n_embd=512', '--block_size=32', '--batch_size=2']  # the training state does
# (name, processes, train.py settings): sizes, block sizes, checkpointing, optimizers, DDP and FSDP
CONFIGS = [
    ('6x256, context 256, batch 8', 1, [*NARROW, '--block_size=256', '--batch_size=8']),
    ('the same, checkpointing', 1, [*NARROW, '--block_size=256', '--batch_size=8', '--activation_checkpointing=True']),
    ('6x256, context 128, batch 16, Muon', 1, [*NARROW, '--block_size=128', '--batch_size=16', '--optimizer=muon']),
    ('6x512, context 32, batch 2', 1, WIDE),
    ('6x512, Muon', 1, [*WIDE, '--optimizer=muon']),
    ('6x512, 2 x DDP', 2, [*WIDE, '--parallel=ddp']),
    ('6x512, 2 x FSDP', 2, [*WIDE, '--parallel=fsdp']),
    ('4x256, context 512, 2 x FSDP, ckpt', 2, ['--n_layer=4', '--n_head=8', '--n_embd=256', '--block_size=512',
                                               '--batch_size=4', '--parallel=fsdp', '--activation_checkpointing=True']),
]
PREDICTED_RE = re.compile(r'^  predicted peak +([\d,.]+)', re.M)
# one process: train.py run as __main__, then its MemoryPhases read (train.py prints them under torchrun only)
ONE_PROCESS = ("import runpy, sys; sys.argv = sys.argv[1:]; g = runpy.run_path(sys.argv[0], run_name='__main__'); "
               "print(f\"peak memory by phase, MiB per process: training {g['memory'].peaks['training']:.1f}\")")


def run(nproc, args, out_dir):
    """train.py with args (in nproc processes under torchrun, when more than 1); its output, or stop the bench."""
    launcher = ['-c', ONE_PROCESS] if nproc == 1 else ['-m', 'torch.distributed.run', '--standalone',
                                                      f'--nproc_per_node={nproc}']
    cmd = [sys.executable, *launcher, os.path.join(ROOT, 'train.py'), *args, f'--out_dir={out_dir}']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        fail(f'train.py failed with exit code {proc.returncode}: {" ".join(args)}')
    return proc.stdout


def measure(nproc, args):
    """(predicted MiB, measured MiB, the --plan output) of one configuration."""
    with tempfile.TemporaryDirectory() as out:
        planned = run(nproc, [*args, '--plan'], out)
        trained = run(nproc, [*args, '--max_iters=3'], out)
    predicted = float(PREDICTED_RE.search(planned)[1].replace(',', ''))
    measured = max(bench_memory.peaks_by_phase(trained)['training'])
    return predicted, measured, planned


def main(argv):
    if not all(arg.isdigit() and 1 <= int(arg) <= len(CONFIGS) for arg in argv):
        fail(f'unknown arguments {" ".join(argv)}: give row numbers, 1 to {len(CONFIGS)}, or nothing for every row')
    os.environ.update(OMP_NUM_THREADS='1', MALLOC_MMAP_THRESHOLD_='65536')
    dataset = os.path.join(ROOT, 'data', 'shakespeare_char')
    if not os.path.exists(os.path.join(dataset, 'train.bin')):
        subprocess.run([sys.executable, os.path.join(dataset, 'prepare.py')], check=True, capture_output=True)
    configs = [CONFIGS[int(arg) - 1] for arg in argv] if argv else CONFIGS
    print(f'{"configuration":36}{"processes":>10}{"predicted MiB":>15}{"measured MiB":>14}{"ratio":>8}')
    worst = 0.0
    for name, nproc, args in configs:
        # one micro-step per process
        predicted, measured, _ = measure(nproc, [f'--dataset={dataset}', *COMMON, *args,
                                                 f'--gradient_accumulation_steps={nproc}'])
        worst = max(worst, abs(predicted / measured - 1))
        print(f'{name:36}{nproc:>10}{predicted:>15,.0f}{measured:>14,.0f}{predicted / measured:>8.2f}', flush=True)
    print(f'largest error: {worst:.1%} (train.py settings beside each row: bench_plan.py CONFIGS; common: {" ".join(COMMON)})')


if __name__ == '__main__':
    main(sys.argv[1:])
