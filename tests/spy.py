"""Run a repository script (the first argument; the rest are its own) with a few of the calls it makes watched:
what only shows on a GPU or across machines leaves its trace on the CPU here. Used by tests under torchrun too.
Each watched call prints `spy <rank>: <call>(<argument>)` to stderr.

    torch.cuda.manual_seed_all, torch.cuda.manual_seed, torch.mps.manual_seed   which seed each generator got
    torch.distributed.init_process_group, new_group                            their timeout, in seconds
    runtime.batch_to_device                                                    each batch moved to the device
    SPY_SAVE_DELAY=S   the master's checkpoint saves take S seconds longer (a slow filesystem)
    SPY_FAULTS=K:what,...   the K-th training forward pass (counted from 1, eval passes not counted) goes wrong, once:
                       oom (raises torch.OutOfMemoryError, as a GPU does), nan (its loss is NaN), spike (its loss x 50)
    SPY_OOM_ABOVE=N    every forward pass of more than N rows runs out of memory (a device that small); N0,N1,...: one
                       figure per process
"""
import functools
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed  # noqa: E402

import checkpoint  # noqa: E402
import runtime  # noqa: E402

RANK = os.environ.get('RANK', '0')


def say(what):
    # one write() of the whole line: pipe writes this short are atomic, so the lines of two processes sharing
    # stderr never interleave (print() writes the text and its newline separately)
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), f'spy {RANK}: {what}\n'.encode())


def watch(owner, name, describe):
    original = getattr(owner, name)

    @functools.wraps(original)
    def watched(*args, **kwargs):
        say(f'{name}({describe(*args, **kwargs)})')
        return original(*args, **kwargs)
    setattr(owner, name, watched)


def seconds(*args, timeout=None, **kwargs):
    return timeout.total_seconds() if timeout is not None else None


for owner in (torch.cuda, torch.mps):
    for name in ('manual_seed_all', 'manual_seed'):
        if hasattr(owner, name):
            watch(owner, name, lambda seed, *a, **k: int(seed))
watch(torch.distributed, 'init_process_group', seconds)
watch(torch.distributed, 'new_group', seconds)
watch(runtime, 'batch_to_device', lambda rows, device: '')

delay = float(os.environ.get('SPY_SAVE_DELAY', 0))
if delay:
    save = checkpoint.save_checkpoint

    @functools.wraps(save)
    def slow_save(*args, write=True, **kwargs):
        if write:
            time.sleep(delay)
        return save(*args, write=write, **kwargs)
    checkpoint.save_checkpoint = slow_save

faults = {int(k): what for k, what in (item.split(':') for item in os.environ.get('SPY_FAULTS', '').split(',') if item)}
oom_above = (os.environ.get('SPY_OOM_ABOVE') or '0').split(',')  # one figure, or one per process
oom_above = int(oom_above[int(RANK)] if len(oom_above) > 1 else oom_above[0])
if faults or oom_above:
    import model  # noqa: E402
    forward = model.GPT.forward
    passes = 0

    @functools.wraps(forward)
    def faulty_forward(self, idx, targets=None, *args, **kwargs):
        global passes
        if idx.is_meta:  # plan.py's estimate of a step (shapes only), not a pass of the run
            return forward(self, idx, targets, *args, **kwargs)
        if oom_above and idx.shape[0] > oom_above:
            raise torch.OutOfMemoryError(f'spy: {idx.shape[0]} rows do not fit')
        if not self.training or targets is None:
            return forward(self, idx, targets, *args, **kwargs)
        passes += 1
        fault = faults.pop(passes, None)
        if fault:
            say(f'{fault}({passes})')
        if fault == 'oom':
            raise torch.OutOfMemoryError('spy: out of memory')
        logits, loss = forward(self, idx, targets, *args, **kwargs)
        if fault == 'nan':
            loss = loss * float('nan')
        elif fault == 'spike':
            loss = loss * 50
        return logits, loss
    model.GPT.forward = faulty_forward

script = str(ROOT / sys.argv[1])
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name='__main__')
