"""
The GPU acceptance run: one command on one CUDA GPU, about 8 minutes, one table of the figures the README
quotes for GPUs.

    python data/shakespeare_char/prepare.py     # once
    python bench_gpu.py

1. config/shakespeare_char.py against config/shakespeare_char_speedrun.py, each stopped at val loss 1.4697
   (nanoGPT's baby GPT's best): wall time and steps, side by side.
2. GPT-2 124M's shape as config/gpt2_124m_speedrun.py trains it (bfloat16, torch.compile): ms per iteration,
   tokens per second, MFU and peak memory over gpt2_steps steps, on random tokens (speed does not depend on
   the text, and OpenWebText takes hours to prepare).
3. Decoding (bench_sample.py on the GPU): the baby GPT's tokens per second against the bound the memory bandwidth
   sets, eager and compiled (CUDA graphs), against transformers' generate, with and without the cache, batch 1 to 64.
   With --batch_size=auto on the same shape: the micro-batch it fits and the peak memory it trains at.
4. One-GPU torchrun runs that save, resume and finish, under DDP and under FSDP (compiled, bfloat16), with and
   without training-time samples: the launcher paths multi-GPU users take, the recompilations a sample adds (0),
   and the peak memory of each phase (start, training, save, resume).

Every training figure comes from train.py's own log, read by bench.py. Without a CUDA GPU it says so and
exits 2; --tiny=True rehearses the whole script in a minute on any device, with tiny models (it checks the
script, it measures nothing).
"""
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

import bench
from configurator import configure, fail
from dataset import dataset_dir

# -----------------------------------------------------------------------------
device = 'cuda'  # the GPU to measure
dataset = 'shakespeare_char'  # for the two Shakespeare runs and the torchrun run: prepare it first
target = 1.4697  # the val loss both Shakespeare configs race to
gpt2_steps = 50  # optimizer steps of the GPT-2 124M throughput run (the first few, compiling, are not counted)
tiny = False  # rehearse with tiny models and step counts, on any device: checks the script, measures nothing
# -----------------------------------------------------------------------------
configure(globals())

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--warmup_iters=5',
              '--gradient_accumulation_steps=1', '--eval_iters=2', '--compile=False', '--dtype=float32']

if not tiny:
    import torch
    if not (device.startswith('cuda') and torch.cuda.is_available()):
        fail(f'bench_gpu.py measures a CUDA GPU and {device!r} is none here: run it on a GPU machine '
             f'(--tiny=True rehearses it anywhere)')
data_dir = dataset_dir(dataset)
if not os.path.exists(os.path.join(data_dir, 'meta.json')):
    fail(f'no prepared dataset in {data_dir}: run `python data/shakespeare_char/prepare.py` first')
common = [f'--device={device}', f'--dataset={dataset}'] + (TINY_MODEL if tiny else [])


def train_run(args, target=None, steps=None):
    """One train.py run through bench.py; its summary (a failed run ends this script, saying which)."""
    run = bench.run_train(args, target, steps)
    if run['returncode'] != 0:
        print('\n'.join(run['lines'][-15:]), file=sys.stderr)
        fail(f"python train.py {' '.join(args)} failed with exit code {run['returncode']}")
    return bench.summarize(run)


def random_token_dataset(folder, vocab_size=50257, tokens=20_000_000):
    """GPT-2-sized token ids at random, as a prepared dataset: what the throughput run reads."""
    rng = np.random.default_rng(0)
    for split, n in (('train', tokens), ('val', tokens // 10)):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    with open(os.path.join(folder, 'meta.json'), 'w', encoding='utf-8') as f:
        f.write(f'{{"tokenizer": {{"kind": "tiktoken", "name": "gpt2"}}, "vocab_size": {vocab_size}, "dtype": "uint16"}}')


def sampling_speed():
    """bench_sample.py's table (the baby GPT's decoding against the read bandwidth, eager and compiled, i.e. CUDA
    graphs, against transformers, with and without the cache, at batch 1 to 64), as (label, figures) rows."""
    args = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--max_new_tokens=100', '--batch_tokens=20', '--batches=1,4',
            '--compile=False'] if tiny else []
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench_sample.py'), f'--device={device}', '--threads=0',
                           *args], capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f'bench_sample.py failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}')
    table = proc.stdout[proc.stdout.index('== '):].splitlines()[1:]
    return [(f'decoding: {line[:44].strip()}', line[44:].strip()) for line in table if line.strip()]


def torchrun_smoke(out_dir, parallel):
    """train.py under torchrun with one process and --parallel=parallel: train, save, resume, finish, with a
    training-time sample at each evaluation (decoded eagerly beside the compiled model). Returns the seconds it
    took, how many recompilations the sampled run logged beyond the same run without samples, and the resumed
    run's peak memory by phase."""
    steps, evals = (6, ['--eval_interval=3']) if tiny else (20, ['--eval_interval=10', '--eval_iters=5'])
    base = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
            os.path.join(ROOT, 'train.py'), os.path.join(ROOT, 'config', 'shakespeare_char.py'), *common, *evals,
            '--log_interval=5', f'--parallel={parallel}']
    env = dict(os.environ, TORCH_LOGS='recompiles')
    t0 = time.perf_counter()
    recompiles = []
    for sampled in (False, True):
        folder = os.path.join(out_dir, 'sampled' if sampled else 'plain')
        for args in ([f'--max_iters={steps // 2}'], [f'--max_iters={steps}', '--init_from=resume']):
            more = [f'--sample_interval={steps // 2}'] if sampled else []
            proc = subprocess.run([*base, f'--out_dir={folder}', *args, *more], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                fail(f'the torchrun run ({parallel}, {" ".join(args)}) failed with exit code {proc.returncode}')
            if 'Resuming training' in proc.stdout:
                recompiles.append(proc.stderr.count('Recompiling function'))
        if 'Resuming training' not in proc.stdout or f'step {steps}:' not in proc.stdout:
            fail(f'the torchrun run ({parallel}) did not resume from its checkpoint and finish')
    phases = re.search(r'^peak memory by phase, MiB per process: (.*)$', proc.stdout, re.M)
    return time.perf_counter() - t0, recompiles[1] - recompiles[0], phases[1] if phases else '-'


rows = []
# 1. the two Shakespeare configs, to the same target
race_target = 4.5 if tiny else target
race_steps = 30 if tiny else None
race = {}
for name in ('shakespeare_char.py', 'shakespeare_char_speedrun.py'):
    race[name] = s = train_run([os.path.join(ROOT, 'config', name), *common, '--eval_interval=10' if tiny else '--log_interval=10'],
                               race_target, race_steps)
    reached = (f"val {s['target_val_loss']:.4f} at step {s['target_step']} after {s['time_to_target']:.1f} s"
               if s['time_to_target'] is not None else f"missed: last val {bench.fmt(s['last_val_loss'], '.4f')} ({s['wall']:.0f} s)")
    rows.append((f'config/{name} to val loss {race_target:g}', reached))
a, b = (race[n]['time_to_target'] for n in race)
rows.append(('speedrun / baseline wall time to the target', f'{b / a:.2f} ({a / b:.1f}x as fast)' if a and b else '-'))

# 2. GPT-2 124M throughput
with tempfile.TemporaryDirectory() as folder:
    random_token_dataset(folder, tokens=200_000 if tiny else 20_000_000)
    gpt2_args = [os.path.join(ROOT, 'config', 'gpt2_124m_speedrun.py'), f'--device={device}', f'--dataset={folder}',
                 '--eval_interval=100000', '--eval_iters=1', '--log_interval=1']
    s = train_run(gpt2_args + (TINY_MODEL if tiny else []), steps=5 if tiny else gpt2_steps)
    # batch_size=auto on the same shape: the micro-batch it fits (by trying sizes) and the peak memory it trains at
    fitted = bench.run_train(gpt2_args + (TINY_MODEL if tiny else []) + ['--batch_size=auto', '--max_iters=3'])
    fit_line = next((line for line in fitted['lines'] if line.startswith('batch_size=auto:')), None)
    if fitted['returncode'] != 0 or fit_line is None:
        print('\n'.join(fitted['lines'][-15:]), file=sys.stderr)
        fail('the batch_size=auto run failed')
    auto = bench.summarize(fitted)
rows.append(('GPT-2 124M, bf16, compiled: ms per step', bench.fmt(s['ms_per_iter'], '.1f')))
rows.append(('  tokens per second', bench.fmt(s['tokens_per_sec'], ',.0f')))
rows.append(('  MFU', bench.fmt(s['mfu'], '.1%')))
rows.append(('  peak memory (MiB)', bench.fmt(s['peak_memory_mib'], ',.0f')))
micro, steps = re.search(r'micro-batch (\d+), (\d+) accumulation', fit_line).groups()
rows.append(('  batch_size=auto: micro-batch, accumulation steps, peak MiB',
             f"{micro}, {steps}, {bench.fmt(auto['peak_memory_mib'], ',.0f')}"))

# 3. sampling
rows += sampling_speed()

# 4. torchrun
# (a rehearsal runs the FSDP one only: the suite's two-process tests already run DDP, and this is the same code)
for parallel in ('fsdp',) if tiny else ('ddp', 'fsdp'):
    with tempfile.TemporaryDirectory() as out:
        seconds, recompiles, phases = torchrun_smoke(out, parallel)
        rows.append((f'torchrun, 1 process, {parallel.upper()}: train, save, resume, finish, with samples',
                     f'ok in {seconds:.0f} s; recompilations for the samples: {recompiles}'))
        rows.append(('  resumed run, peak MiB by phase', phases))

import torch
print(f"\n{torch.cuda.get_device_name(device) if not tiny else 'rehearsal (--tiny=True): tiny models, the figures measure nothing'}, "
      f"PyTorch {torch.__version__}")
width = max(len(r[0]) for r in rows)
for what, figure in rows:
    print(f'{what:{width}}  {figure}')
