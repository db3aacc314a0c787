"""
Benchmark training runs, alone or two side by side:

    python bench.py config/shakespeare_char_cpu_speedrun.py --vs config/shakespeare_char_cpu.py
    python bench.py config/shakespeare_char.py --steps=100 --vs --optimizer=muon    # B = A's arguments + these
    python bench.py config/gpt2_124m_speedrun.py --steps=50

Each run is `python train.py <config files> <--key=value ...>` in a fresh process, timed from its launch,
so the wall time to the target val loss (taken when train.py prints that evaluation) counts everything a
user waits for: start-up, data, compilation, evaluations and checkpoints. Every run gets the target as
--target_val_loss, so it stops there. With --vs the two sides alternate (A, B, A, B, ...), so load from
elsewhere on a shared machine falls on both alike; the summary gives each figure's median over the runs
and the ratio B / A.

Figures: wall time to the target; ms per iteration and tokens per second (medians over the iterations,
each logged unless --log_interval is given, so evaluation pauses and compilation do not count); MFU
against the device's peak bf16 rate (GPU only); peak memory (GPU memory allocated, or on a CPU the
process's peak resident memory).

bench options (every other argument goes to train.py: before --vs to A, after it to B):
  --runs=N      runs of each side (default: 3 with --vs, else 1)
  --steps=N     train each run for N iterations (sets --max_iters=N)
  --target=L    target val loss (default: the first target_val_loss a run reports, e.g. its config's)
"""
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from configurator import fail
from runtime import mfu

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
BENCH_OPTIONS = ('runs', 'steps', 'target')

ITER_RE = re.compile(r'^iter (\d+): loss [\d.naninf-]+, time ([\d.]+)ms')
EVAL_RE = re.compile(r'^step (\d+): train loss ([\d.naninf]+), val loss ([\d.naninf]+)')
TOKENS_RE = re.compile(r'^tokens per iteration will be: ([\d,]+)')
FLOPS_RE = re.compile(r' ([\d,]+) training FLOPs per token(?:, device peak ([\d.]+) TFLOP/s)?')
TARGET_RE = re.compile(r'^reached target val loss ([\d.]+)')
MEMORY_RE = re.compile(r'^peak memory ([\d,]+) MiB')


def parse_args(argv):
    """Split the command line into bench options and the train.py arguments of side A and side B
    (None without --vs). After --vs, a side that names no config file starts from A's arguments."""
    options = dict(runs=None, steps=None, target=None)
    sides, current = [[]], 0
    for arg in argv:
        key, sep, value = arg[2:].partition('=')
        if arg == '--vs':
            if current == 1:
                fail('--vs appears twice: bench.py compares two sides, A --vs B')
            sides.append([])
            current = 1
        elif arg.startswith('--') and key in BENCH_OPTIONS:
            try:
                options[key] = float(value) if key == 'target' else int(value)
            except ValueError:
                fail(f'{arg}: --{key} needs a number, e.g. --{key}=' + ('1.47' if key == 'target' else '3'))
        else:
            sides[current].append(arg)
    a, b = sides[0], (sides[1] if len(sides) > 1 else None)
    if not a:
        fail('name a config to benchmark, e.g. python bench.py config/shakespeare_char.py')
    if b is not None and not any(not arg.startswith('--') for arg in b):
        b = a + b
    if options['runs'] is None:
        options['runs'] = 3 if b is not None else 1
    if options['runs'] < 1:
        fail(f"--runs={options['runs']}: give at least 1")
    if options['steps'] is not None and options['steps'] < 1:
        fail(f"--steps={options['steps']}: give at least 1")
    return options, a, b


def run_train(args, target=None, steps=None, python=sys.executable, launcher=(), out_dir=None):
    """Run train.py once with args; return its figures and log lines as a dict. With a target, the
    run stops at its first evaluation with val loss <= target; without one, at the target_val_loss its
    own config sets, if any (the run reports it). launcher: python's arguments before train.py, e.g. torchrun's
    ('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'). out_dir: where the run writes (kept,
    for a resume); by default a temporary folder, removed after the run."""
    keep = out_dir is not None
    out_dir = out_dir or tempfile.mkdtemp(prefix='bench-')
    cmd = [python, *launcher, TRAIN, *args, f'--out_dir={out_dir}']
    if not any(a.startswith('--log_interval=') for a in args):
        # a timing for every iteration; on a GPU also a sync per iteration, without which a logged
        # iteration's time would include the queued work of the unlogged ones before it
        cmd.append('--log_interval=1')
    if steps is not None:
        cmd.append(f'--max_iters={steps}')
    if target is not None:
        cmd.append(f'--target_val_loss={target}')
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    run = dict(args=args, iter_ms=[], evals=[], target=target, time_to_target=None,
               target_step=None, target_val_loss=None, tokens_per_iter=None, flops_per_token=None,
               peak_flops=None, peak_memory_mib=None, memory_kind=None, lines=[])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        now = time.perf_counter() - start
        line = line.rstrip('\n')
        run['lines'].append(line)
        if m := ITER_RE.match(line):
            run['iter_ms'].append(float(m[2]))
        elif m := EVAL_RE.match(line):
            step, val_loss = int(m[1]), float(m[3])
            run['evals'].append((step, val_loss, now))
        elif m := TOKENS_RE.match(line):
            run['tokens_per_iter'] = int(m[1].replace(',', ''))
        elif m := FLOPS_RE.search(line):
            run['flops_per_token'] = int(m[1].replace(',', ''))
            run['peak_flops'] = float(m[2]) * 1e12 if m[2] else None
        elif m := TARGET_RE.match(line):
            run['target'] = run['target'] or float(m[1])
        elif m := MEMORY_RE.match(line):
            run['peak_memory_mib'], run['memory_kind'] = float(m[1].replace(',', '')), 'GPU'
    returncode, max_rss_mib = wait_with_rusage(proc)
    run['wall'] = time.perf_counter() - start
    if run['memory_kind'] is None and max_rss_mib is not None:
        run['peak_memory_mib'], run['memory_kind'] = max_rss_mib, 'RSS'
    run['returncode'] = returncode
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    find_target(run, run['target'])  # a target_val_loss the run itself reports only when it stops
    return run


def find_target(run, target):
    """Record the first evaluation of run that reached target, if it has not been found yet."""
    if target and run['time_to_target'] is None:
        run['target'] = target
        hit = next(((s, v, t) for s, v, t in run['evals'] if v <= target), None)
        if hit:
            run['target_step'], run['target_val_loss'], run['time_to_target'] = hit


def wait_with_rusage(proc):
    """Wait for proc; return (exit code, its peak resident memory in MiB, or None where unknown)."""
    if not hasattr(os, 'wait4'):
        return proc.wait(), None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    kib = usage.ru_maxrss / 1024 if sys.platform == 'darwin' else usage.ru_maxrss  # bytes on macOS, KiB on Linux
    return proc.returncode, kib / 1024


def summarize(run):
    """Per-run figures from the raw log: medians over the logged iterations, after the first few
    (compilation and warm-up)."""
    times = run['iter_ms']
    steady = times[min(5, len(times) // 2):]
    ms = statistics.median(steady) if steady else None
    tokens_per_sec = run['tokens_per_iter'] / ms * 1000 if ms and run['tokens_per_iter'] else None
    utilisation = None
    if ms and run['flops_per_token'] and run['tokens_per_iter']:
        utilisation = mfu(run['flops_per_token'], run['tokens_per_iter'], ms / 1000, run['peak_flops'])
    last_val = run['evals'][-1][1] if run['evals'] else None
    return dict(ms_per_iter=ms, tokens_per_sec=tokens_per_sec, mfu=utilisation, peak_memory_mib=run['peak_memory_mib'],
                time_to_target=run['time_to_target'], target_step=run['target_step'],
                target_val_loss=run['target_val_loss'], last_val_loss=last_val, wall=run['wall'])


def median_of(summaries, key):
    values = [s[key] for s in summaries if s[key] is not None]
    return statistics.median(values) if values else None


def fmt(value, spec, unit=''):
    return '-' if value is None else f'{value:{spec}}{unit}'


def report(sides, target):
    """Print the medians of each side (and the ratios B / A with two sides); return the medians.
    sides: {'A': (train.py args, [runs]), 'B': ...}."""
    names, medians = list(sides), []
    for args, runs in sides.values():
        per_run = [summarize(r) for r in runs]
        m = {key: median_of(per_run, key) for key in per_run[0]}
        m['times'] = [x['time_to_target'] for x in per_run if x['time_to_target'] is not None]
        m['runs'] = len(per_run)
        medians.append(m)
    memory_kind = next((r['memory_kind'] for _, runs in sides.values() for r in runs if r['memory_kind']), '-')
    if target:
        rows = [(f'wall time to val loss <= {target:g} (s)', 'time_to_target', '.1f', True),
                ('val loss at that evaluation', 'target_val_loss', '.4f', False),
                ('step of that evaluation', 'target_step', '.0f', False)]
    else:
        rows = [('wall time, whole run (s)', 'wall', '.1f', True), ('last val loss', 'last_val_loss', '.4f', False)]
    rows += [('ms per iteration', 'ms_per_iter', '.2f', True), ('tokens per second', 'tokens_per_sec', ',.0f', True),
             ('MFU', 'mfu', '.1%', True), (f'peak memory, {memory_kind} (MiB)', 'peak_memory_mib', ',.0f', True)]
    for name, (args, _) in sides.items():
        print(f"{name}: python train.py {' '.join(args)}")
    two = len(names) == 2
    print(f"{'median of ' + str(medians[0]['runs']) + ' run(s)':38}" + ''.join(f'{n:>14}' for n in names)
          + (f"{'B / A':>10}" if two else ''))
    for label, key, spec, ratio in rows:
        line = f'{label:38}' + ''.join(f'{fmt(m[key], spec):>14}' for m in medians)
        if two and ratio:
            a, b = medians[0][key], medians[1][key]
            line += f"{fmt(b / a if a and b is not None else None, '.2f', 'x'):>10}"
        print(line)
    if target:
        for name, m in zip(names, medians):
            times = ', '.join(f'{t:.1f}' for t in m['times']) or '-'
            print(f"{name} reached val loss <= {target:g} in {len(m['times'])} of {m['runs']} run(s); times (s): {times}")
        if two and medians[0]['time_to_target'] and medians[1]['time_to_target']:
            a, b = medians[0]['time_to_target'], medians[1]['time_to_target']
            print(f'A reaches val loss <= {target:g} in {a / b:.2f} of the wall time B needs ({b / a:.2f}x as fast)')
    return medians


def main(argv):
    options, a, b = parse_args(argv)
    sides = {'A': (a, [])}
    if b is not None:
        sides['B'] = (b, [])
    target = options['target']
    for i in range(options['runs']):
        for name, (args, runs) in sides.items():  # alternate, so outside load falls on both sides alike
            run = run_train(args, target, options['steps'])
            if run['returncode'] != 0:
                last = run['lines'][-1] if run['lines'] else ''
                if not last.startswith('error: '):  # a crash: show its traceback
                    print('\n'.join(run['lines'][-15:]), file=sys.stderr)
                fail(f"{name} (python train.py {' '.join(args)}) failed with exit code {run['returncode']}"
                     + (f": {last[len('error: '):]}" if last.startswith('error: ') else ''))
            target = target or run['target']
            runs.append(run)
            s = summarize(run)
            result = (f"val loss {s['target_val_loss']:.4f} at step {s['target_step']} after {s['time_to_target']:.1f} s"
                      if s['time_to_target'] is not None else f"last val loss {fmt(s['last_val_loss'], '.4f')}")
            print(f"{name} run {i + 1}/{options['runs']}: {result}, {fmt(s['ms_per_iter'], '.2f')} ms/iter, "
                  f"whole run {s['wall']:.1f} s", flush=True)
    # a target first reported by a later run (the config of A sets it) applies to the earlier runs too
    for _, runs in sides.values():
        for run in runs:
            find_target(run, target)
    print()
    report(sides, target)


if __name__ == '__main__':
    main(sys.argv[1:])
