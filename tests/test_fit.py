"""A run that fits the machine: batch_size='auto' (fit.py), a step that runs out of memory redone in smaller
micro-batches, init_from='auto'. Out of memory is injected where the CPU has none to run out of (tests/spy.py)."""
import json
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import DDP_TRAIN, ROOT, TINY_TRAIN, final_weights, run, script_env, torchrun

from dataset import count_targets, load_meta, open_split, sample_windows
from fit import FitError, budget_bytes, fit_micro_batch, in_halves, micro_batch_for, regroup
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures('torch_threads_here')
TRAIN = [*TINY_TRAIN, '--dropout=0.1', '--eval_interval=100']  # dropout: a redone step must draw its masks again


def test_a_step_out_of_memory_is_redone_as_smaller_micro_batches_would_have_done_it(char_dataset, tmp_path):
    """Out of memory in the third step (its first micro-batch of 4 rows): the step is redone from its start in
    micro-batches of 2, and so is every later one. The reference: a run of 4-row micro-batches that stops after two
    steps, resumed (by init_from='auto', which starts afresh where no checkpoint is) with 2-row micro-batches."""
    common = [*TRAIN, f'--dataset={char_dataset}', '--max_iters=4']
    hit = tmp_path / 'hit'
    proc = run('tests/spy.py', 'train.py', *common, f'--out_dir={hit}', '--batch_size=4',
               '--gradient_accumulation_steps=2', env={'SPY_FAULTS': '5:oom'})
    assert 'spy 0: oom(5)' in proc.stderr
    assert ('out of memory at iteration 2: the step is redone, and the run goes on, in micro-batches of 2 rows, not 4 '
            '(4 per step)') in proc.stdout
    events = [json.loads(line) for line in (hit / 'metrics.jsonl').read_text().splitlines()]
    assert [(e['iter'], e['what']) for e in events if e['kind'] == 'event'] == [(2, 'out_of_memory')]
    ckpt, hit_weights = final_weights(hit)
    assert (ckpt['config']['batch_size'], ckpt['config']['gradient_accumulation_steps']) == (2, 4)  # a resume goes on so

    reference = tmp_path / 'reference'
    first = run('train.py', *common, f'--out_dir={reference}', '--batch_size=4', '--gradient_accumulation_steps=2',
                '--max_iters=2', '--init_from=auto')
    assert 'Initializing a new model from scratch' in first.stdout
    then = run('train.py', *common, f'--out_dir={reference}', '--batch_size=2', '--gradient_accumulation_steps=4',
               '--init_from=auto')
    assert 'Resuming training' in then.stdout
    _, reference_weights = final_weights(reference)
    # exact: one process, the same rows (numpy draws 4 rows as it draws 2 and 2) in the same micro-batches, the same
    # dropout masks, summed in the same order
    for name, tensor in reference_weights.items():
        assert torch.equal(hit_weights[name], tensor), name


def test_batch_size_auto_in_every_process_is_the_smallest_fit(char_dataset, tmp_path):
    """Two processes whose devices hold 5 and 3 rows (the spy's out of memory above that): both take the smallest
    fit, 3, and so 2-row micro-batches: the largest divisor of the step's 8 rows per process up to 3. The step stays
    the 16 rows asked (batch_size 8, the value before 'auto', x 2 accumulation steps); the log says why 2."""
    proc = torchrun(2, 'tests/spy.py', 'train.py', *DDP_TRAIN, f'--dataset={char_dataset}', f'--out_dir={tmp_path}',
                    '--batch_size=auto', '--max_iters=2', '--eval_interval=2', env={'SPY_OOM_ABOVE': '5,3'})
    assert ('batch_size=auto: 3 rows of 32 tokens fit per process (measured at 1-8 rows and extrapolated, 85% of the '
            'free memory, the smallest fit among the processes): micro-batch 2, 4 accumulation steps per process; '
            '2 rows per micro-batch, not 3: the largest that divides the step of 8 rows') in proc.stdout
    assert 'tokens per iteration will be: 512' in proc.stdout  # 16 rows x 32 tokens
    config = json.loads((tmp_path / 'checkpoint.json').read_text())['config']
    assert (config['batch_size'], config['gradient_accumulation_steps']) == (2, 8)


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=64, dropout=0.0))


def test_bisection_finds_the_largest_batch_a_device_holds(monkeypatch):
    """Where out of memory is an exception (CUDA), sizes are tried: doubling, then bisected. A device that holds
    37 rows gives 37; the step's own size caps it; a device that holds none is a one-line error."""
    model = tiny_model()
    forward = GPT.forward
    for holds, most, expected in ((37, 100, 37), (37, 20, 20), (1, 100, 1), (64, 64, 64)):
        tried = []

        def limited(self, idx, targets=None):
            tried.append(idx.shape[0])
            if idx.shape[0] > holds:
                raise torch.OutOfMemoryError('too many rows')
            return forward(self, idx, targets)
        monkeypatch.setattr(GPT, 'forward', limited)
        assert fit_micro_batch(model, nullcontext(), 'cpu', 16, most, 2**40, bisect=True) == expected
        assert len(tried) <= 2 * np.log2(most) + 2, tried  # a search, not every size

    def full(self, idx, targets=None):
        raise torch.OutOfMemoryError('no room at all')
    monkeypatch.setattr(GPT, 'forward', full)
    with pytest.raises(FitError, match='one row of 16 tokens does not fit'):
        fit_micro_batch(model, nullcontext(), 'cpu', 16, 8, 2**40, bisect=True)


# a fresh process, as a training run starts: a model of 0.8M parameters, then batch_size=auto's fit for a budget
# (FIT), or two training steps at a given size and their peak resident memory beyond the built model (TRAIN_AT)
FRESH = """
import os, sys, torch
from contextlib import nullcontext
sys.path.insert(0, {root!r})
from model import GPT, GPTConfig
from fit import fit_micro_batch
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=64, dropout=0.0))
"""
FIT = FRESH + "print(fit_micro_batch(model, nullcontext(), 'cpu', 128, 1000, {budget}, bisect=False))"
TRAIN_AT = FRESH + """
def resident():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
def peak():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
before = resident()
for _ in range(2):
    idx = torch.randint(64, ({rows}, 128))
    model(idx, idx)[1].backward()
    model.zero_grad(set_to_none=True)
print(peak() - before)
"""


def fresh(code, **values):
    proc = subprocess.run([sys.executable, '-c', code.format(root=str(ROOT), **values)], capture_output=True,
                          text=True, env=script_env(), check=True)
    return int(proc.stdout)


def test_a_fit_from_measured_memory_fits_a_fresh_process_and_is_not_far_below_its_limit():
    """On a CPU, batch_size=auto measures a few sizes and extrapolates to the budget. Checked against another fresh
    process training at the size found (its real peak memory beyond the built model: within the budget) and at
    twice that plus one row (beyond it: the fit is not wastefully small)."""
    budget = 160 * 2**20
    rows = fresh(FIT, budget=budget)
    assert rows >= 4
    assert fresh(TRAIN_AT, rows=rows) <= budget, rows
    assert fresh(TRAIN_AT, rows=2 * rows + 1) > budget, rows


def test_the_micro_batch_divides_the_step_where_it_can():
    """Against a brute-force search over every (fit, step) up to 40: the micro-batch is at most the fit; the step keeps
    its rows when a divisor of it reaches half the fit, is the largest such divisor, and otherwise grows the least."""
    for step in range(1, 41):
        divisors = [d for d in range(1, step + 1) if step % d == 0]
        for fit in range(1, 41):
            micro, steps, note = micro_batch_for(fit, step)
            best = max(d for d in divisors if d <= fit)
            if 2 * best >= min(fit, step):
                assert (micro, steps) == (best, step // best)
                assert bool(note) == (best != min(fit, step))
            else:
                assert micro == fit and steps == -(-step // fit) and 'grows' in note


def test_regrouped_windows_are_those_drawn_a_smaller_batch_at_a_time(char_dataset):
    """What makes a redone step the step a smaller micro-batch would have taken: 2 draws of 4 windows regrouped by
    2 are the 4 draws of 2 from the same generator state."""
    data = open_split(char_dataset, 'train', load_meta(char_dataset))
    drawn = [sample_windows(data, 32, 4, rng) for rng in [np.random.default_rng(3)] * 2]
    smaller = [sample_windows(data, 32, 2, rng) for rng in [np.random.default_rng(3)] * 4]
    assert all(np.array_equal(a, b) for a, b in zip(regroup(drawn, 2), smaller, strict=True))


def test_an_evaluation_out_of_memory_is_scored_in_halves():
    """A batch the device cannot score at once is scored in halves, weighted by their targets: the mean over all its
    targets, as one pass computes it (to float rounding: the sums run in another order)."""
    model = tiny_model().eval()
    rows = np.random.default_rng(0).integers(0, 64, size=(7, 17))
    targets = np.where(np.random.default_rng(1).random((7, 16)) < 0.3, -1, rows[:, 1:])  # a chat's uneven targets
    windows = (np.ascontiguousarray(rows[:, :-1]), targets)

    def score(w, most=None):
        if most and len(w[0]) > most:
            raise torch.OutOfMemoryError()
        return model(torch.from_numpy(w[0]), torch.from_numpy(w[1]))[1]
    with torch.no_grad():
        whole = score(windows)
        halved = in_halves(lambda w: score(w, most=2), windows)
    assert count_targets(windows) < 7 * 16
    torch.testing.assert_close(halved, whole, rtol=1e-6, atol=0)


def test_without_linux_proc_a_cpu_fit_asks_for_a_number(monkeypatch):
    """macOS and Windows have no /proc to measure a CPU's memory with: one line saying what to do, no traceback."""
    model = tiny_model()
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith('/proc/'):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr('builtins.open', no_proc)
    with pytest.raises(FitError, match='give --batch_size a number'):
        budget_bytes('cpu', 0, torch.optim.AdamW(model.parameters()))
    with pytest.raises(FitError, match='give --batch_size a number'):
        fit_micro_batch(model, nullcontext(), 'cpu', 16, 8, 2**30, bisect=False)
