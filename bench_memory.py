"""
Peak memory per process, DDP against FSDP: the same model, global batch and steps, side by side.

    python bench_memory.py                                    # CPU, 2 processes, a 25M-parameter GPT
    python bench_memory.py --nproc=8 --device=cuda --n_layer=24 --n_head=16 --n_embd=1024 --block_size=1024

Each row is `torchrun --nproc_per_node=N train.py --parallel=...` for a few iterations on the shipped Tiny
Shakespeare (prepared first if it is not), ending with one checkpoint save. train.py reports every process's
peak memory: on CUDA what PyTorch allocated, on a CPU the peak resident memory of the whole process (Python and
PyTorch themselves are ~0.3 GiB of it). Rank 0 is shown apart: it also gathers and writes the checkpoint, in
CPU memory. Tokens per second are bench.py's: tokens per iteration over the median iteration time after the
first few.

bench options (every other --key=value goes to train.py):
  --nproc=N     processes per run (default 2)
  --steps=N     iterations per run (default 8)
"""
import os
import re
import subprocess
import sys

import bench
from configurator import fail

ROOT = os.path.dirname(os.path.abspath(__file__))
DATASET = os.path.join(ROOT, 'data', 'shakespeare_char')
MODEL = ['--n_layer=8', '--n_head=8', '--n_embd=512', '--block_size=64', '--batch_size=2', '--dropout=0.0']
PEAKS_RE = re.compile(r'^peak memory per process: ([\d, ]+) MiB \((.*)\)$', re.M)


def peaks_per_process(log):
    """The peak memory of each process, in MiB, and what kind it is, from a train.py log under torchrun."""
    m = PEAKS_RE.search(log)
    if not m:
        return None, None
    return [float(v.replace(',', '')) for v in m[1].split(', ')], m[2]


def torchrun_train(nproc, args):
    """bench.run_train under torchrun with nproc processes; stops the benchmark if the run fails."""
    run = bench.run_train(args, launcher=('-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'))
    if run['returncode'] != 0:
        print('\n'.join(run['lines'][-40:]), file=sys.stderr)
        fail(f'train.py failed under torchrun with exit code {run["returncode"]}: {" ".join(args)}')
    return run


def main(argv):
    options, train_args = dict(nproc=2, steps=8), []
    for arg in argv:
        key, _, value = arg[2:].partition('=')
        if arg.startswith('--') and key in options:
            if not value.isdigit() or int(value) < 1:
                fail(f'--{key} needs a whole number of at least 1, not {value!r}')
            options[key] = int(value)
        else:
            train_args.append(arg)
    nproc, steps = options['nproc'], options['steps']
    # glibc otherwise serves large tensors from per-thread heaps after the first frees, and keeps what they
    # free: the resident memory then grows with every step and measures the allocator, not the tensors alive
    os.environ.update(OMP_NUM_THREADS='1', MALLOC_MMAP_THRESHOLD_='65536')
    if not os.path.exists(os.path.join(DATASET, 'train.bin')):
        subprocess.run([sys.executable, os.path.join(DATASET, 'prepare.py')], check=True, capture_output=True)
    common = [f'--dataset={DATASET}', '--device=cpu', '--compile=False', *MODEL, f'--max_iters={steps}',
              f'--eval_interval={steps}', '--eval_iters=1', '--log_interval=1', '--always_save_checkpoint=False',
              '--warmup_iters=0', f'--gradient_accumulation_steps={nproc}', *train_args]  # one global batch for all
    rows = []
    for name, n, parallel in (('1 process, whole model', 1, 'ddp'), (f'{nproc} x DDP', nproc, 'ddp'),
                              (f'{nproc} x FSDP', nproc, 'fsdp')):
        if n == 1 and nproc == 1:
            continue
        run = torchrun_train(n, [*common, f'--parallel={parallel}'])
        log = '\n'.join(run['lines'])
        peaks, kind = peaks_per_process(log)
        if peaks is None:
            fail(f'train.py printed no peak memory for {name}')
        rows.append((name, peaks[0], max(peaks[1:], default=None), bench.summarize(run)['tokens_per_sec'], kind))
        print(f'{name}: peak per process {", ".join(f"{p:,.0f}" for p in peaks)} MiB', file=sys.stderr, flush=True)
    params = next(line for line in log.splitlines() if 'parameters,' in line).split(' parameters')[0]
    print(f'\n{params} parameters, {" ".join(train_args) or "default settings"}; peak memory: {kind}')
    print(f'{"":24}  {"peak MiB, rank 0":>16}  {"other ranks":>11}  {"tokens/s":>9}')
    for name, first, others, rate, _ in rows:
        print(f'{name:24}  {first:>16,.0f}  {f"{others:,.0f}" if others else "-":>11}  {rate or 0:>9,.0f}')


if __name__ == '__main__':
    main(sys.argv[1:])
