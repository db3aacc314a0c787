"""
Peak memory per process, one process against DDP against FSDP: the same model, global batch and steps, phase by
phase (start, training, save, resume), side by side.

    python bench_memory.py                                    # CPU, 2 processes, a 152M-parameter GPT
    python bench_memory.py --nproc=8 --device=cuda --n_layer=24 --n_head=16 --n_embd=2048 --block_size=1024

Each mode is two `torchrun --nproc_per_node=N train.py --parallel=...` runs on the shipped Tiny Shakespeare
(prepared first if it is not): a few iterations ending with a checkpoint save, then a resume for one more
iteration. train.py reports every process's peak memory in each phase: on CUDA what PyTorch allocated, on a CPU
the peak resident memory of the whole process (Python and PyTorch themselves are ~0.3 GiB of it). The phases:
start (building the model, until the first step), training (steps and evaluations), save (gathering and writing
the checkpoint), resume (the second run's start: reading the checkpoint back). Rank 0 is shown apart: it writes
the checkpoint. Tokens per second are bench.py's: tokens per iteration over the median iteration time.

bench options (every other --key=value goes to train.py):
  --nproc=N     processes per run (default 2)
  --steps=N     iterations of the first run (default 3)
"""
import os
import re
import subprocess
import sys
import tempfile

import bench
from configurator import fail

ROOT = os.path.dirname(os.path.abspath(__file__))
DATASET = os.path.join(ROOT, 'data', 'shakespeare_char')
MODEL = ['--n_layer=12', '--n_head=16', '--n_embd=1024', '--block_size=64', '--batch_size=2', '--dropout=0.0']
PHASES = ('start', 'training', 'save', 'resume')
PEAKS_RE = re.compile(r'^peak memory per process: ([\d, ]+) MiB \((.*)\)$', re.M)
PHASES_RE = re.compile(r'^peak memory by phase, MiB per process: (.*)$', re.M)


def peaks_per_process(log):
    """The peak memory of each process, in MiB, and what kind it is, from a train.py log under torchrun."""
    m = PEAKS_RE.search(log)
    if not m:
        return None, None
    return [float(v.replace(',', '')) for v in m[1].split(', ')], m[2]


def peaks_by_phase(log):
    """{phase: [MiB of each process]} from a train.py log under torchrun."""
    m = PHASES_RE.search(log)
    if not m:
        return {}
    phases = {}
    for part in m[1].split('; '):
        name, _, values = part.partition(' ')
        phases[name] = [float(v.replace(',', '')) for v in values.split(', ')]
    return phases


def torchrun_train(nproc, args, out_dir):
    """bench.run_train under torchrun with nproc processes, writing to out_dir; stops the benchmark if the run
    fails."""
    run = bench.run_train(args, launcher=('-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'),
                          out_dir=out_dir)
    if run['returncode'] != 0:
        print('\n'.join(run['lines'][-40:]), file=sys.stderr)
        fail(f'train.py failed under torchrun with exit code {run["returncode"]}: {" ".join(args)}')
    return run


def measure(nproc, parallel, common, steps):
    """One mode: a run that trains and saves, then a resume. Returns ({phase: [MiB per process]}, tokens/s, the
    log of the first run)."""
    with tempfile.TemporaryDirectory() as out:
        first = torchrun_train(nproc, [*common, f'--parallel={parallel}', f'--max_iters={steps}'], out)
        again = torchrun_train(nproc, [*common, f'--parallel={parallel}', f'--max_iters={steps + 1}',
                                       '--init_from=resume'], out)
    log = '\n'.join(first['lines'])
    phases = peaks_by_phase(log)
    phases['resume'] = peaks_by_phase('\n'.join(again['lines'])).get('resume')
    if not all(phases.get(p) for p in PHASES):
        fail(f'train.py printed no peak memory for every phase ({parallel}, {nproc} processes): {phases}')
    return phases, bench.summarize(first)['tokens_per_sec'], log


def main(argv):
    options, train_args = dict(nproc=2, steps=3), []
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
    common = [f'--dataset={DATASET}', '--device=cpu', '--compile=False', *MODEL, f'--eval_interval={steps}',
              '--eval_iters=1', '--log_interval=1', '--always_save_checkpoint=True', '--warmup_iters=0', '--plot=False',
              f'--gradient_accumulation_steps={nproc}', *train_args]  # one global batch for all
    modes = [('1 process, whole model', 1, 'ddp'), (f'{nproc} x DDP', nproc, 'ddp'), (f'{nproc} x FSDP', nproc, 'fsdp')]
    rows = {}
    for name, n, parallel in modes[1:] if nproc == 1 else modes:
        rows[name] = measure(n, parallel, common, steps)
        print(f'{name}: {rows[name][0]}', file=sys.stderr, flush=True)
    log = rows[modes[-1][0]][2]
    params = next(line for line in log.splitlines() if 'parameters,' in line).split(' parameters')[0]
    kind = peaks_per_process(log)[1]
    print(f'\n{params} parameters, {" ".join(train_args) or "default settings"}; peak MiB per phase, rank 0 / the '
          f'other ranks\' largest ({kind})')
    print(f'{"":24}' + ''.join(f'{phase:>16}' for phase in PHASES) + f'{"tokens/s":>10}')
    for name, (phases, rate, _) in rows.items():
        cells = [f'{p[0]:,.0f}' + (f' / {max(p[1:]):,.0f}' if len(p) > 1 else '') for p in (phases[ph] for ph in PHASES)]
        print(f'{name:24}' + ''.join(f'{c:>16}' for c in cells) + f'{rate or 0:>10,.0f}')
    if nproc > 1:
        ddp, fsdp = rows[f'{nproc} x DDP'][0], rows[f'{nproc} x FSDP'][0]
        ratios = {phase: max(f / d for f, d in zip(fsdp[phase], ddp[phase])) for phase in PHASES}
        worst = max(ratios, key=ratios.get)
        print(f'FSDP / DDP, the same process and phase: at most {ratios[worst]:.2f} ({worst}); '
              + ', '.join(f'{phase} {r:.2f}' for phase, r in ratios.items()))


if __name__ == '__main__':
    main(sys.argv[1:])
