"""
The micro-batch that fits the device. batch_size='auto' finds it before training, from real forward and backward
passes; a step that runs out of memory in the middle of a run is redone in smaller micro-batches. train.py calls:

    rows = fit_micro_batch(model, ctx, device, block_size, step_rows, budget_bytes(device, memory_limit, ...))
    micro, steps, note = micro_batch_for(rows, step_rows)   # a divisor of the step's rows: the step stays the same
    windows = regroup(windows, micro)                # a step's windows, in micro-batches of another size
    micro, steps, what = halved(micro, steps)        # after running out of memory mid-run

Two ways to find the fit. Where out of memory is an exception that leaves the device usable (CUDA, one process
or DDP: the passes run on the unwrapped model, no collective involved), batch sizes are tried, doubling, then
bisected between the last that fit and the first that did not. Elsewhere (CPU and MPS, where running out of memory
means swapping or being killed; FSDP, whose passes are collectives that one process cannot leave alone) the
memory of 1, 2, 4 and 8 rows is measured and extrapolated to the budget (on a CPU, from Linux's /proc).
"""
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch

from dataset import count_targets
from runtime import free_memory

HEADROOM = 0.85  # the share of the free memory the fit may use: evaluation, samples and fragmentation need the rest


class FitError(Exception):
    """Not even one row fits, or the memory cannot be measured."""


_NO_PROC = "a CPU's memory is measured through Linux's /proc, which this system lacks: give --batch_size a number"


def optimizer_state_bytes(optimizer):
    """The bytes an optimizer that has not stepped yet will allocate for its state: AdamW keeps two moments per
    parameter, Muon one momentum per matrix (muon.py); zero once it has its state (a resumed run)."""
    if optimizer.state:
        return 0
    total = 0
    for group in optimizer.param_groups:
        moments = 1 if group.get('use_muon') else 2
        for p in group['params']:
            local = p.to_local() if hasattr(p, 'to_local') else p  # an FSDP shard
            total += moments * local.numel() * local.element_size()
    return total


def available_bytes(device):
    """Memory this process may still take (runtime.free_memory); FitError where it cannot be known."""
    free = free_memory(device)
    if free is None:
        raise FitError(_NO_PROC)
    return free


def used_bytes(device):
    """What this process holds now, as used_bytes measures the limit: PyTorch's allocations on a GPU, the whole
    process's resident memory on a CPU."""
    if device.startswith('cuda'):
        return torch.cuda.memory_allocated(device)
    if device.startswith('mps'):
        return torch.mps.driver_allocated_memory()
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        raise FitError(_NO_PROC) from None


def reset_peak(device):
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats(device)
    elif not device.startswith('mps'):
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # VmHWM back to the resident memory of now
        except OSError:
            raise FitError(_NO_PROC) from None


def peak_bytes(device):
    """The peak since reset_peak (on MPS, the memory held now: Metal keeps no peak, and holds what it freed)."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated(device)
    if device.startswith('mps'):
        return torch.mps.driver_allocated_memory()
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


def budget_bytes(device, memory_limit_gib, optimizer):
    """The bytes one micro-batch's forward and backward may take: the device's free memory (or what remains of
    memory_limit_gib, when given, under it), less headroom, less the optimizer state still to be allocated."""
    free = available_bytes(device)
    if memory_limit_gib:
        free = min(free, int(memory_limit_gib * 2**30) - used_bytes(device))
    return int(HEADROOM * free) - optimizer_state_bytes(optimizer)


def measure(model, ctx, device, block_size, rows, since=None):
    """The memory one training forward and backward pass of rows random windows takes beyond what is held before
    it, or since `since` bytes were (the gradients it leaves are freed again). Draws from no global generator:
    dropout's is restored."""
    vocab = model.config.real_vocab_size or model.config.vocab_size
    idx = torch.randint(vocab, (rows, block_size), generator=torch.Generator().manual_seed(rows)).to(device)
    devices = [torch.device(device).index or 0] if device.startswith(('cuda', 'mps')) else []
    with torch.random.fork_rng(devices=devices, device_type=torch.device(device).type):
        before = used_bytes(device) if since is None else since
        reset_peak(device)
        # a compiled model would recompile for each size; where nothing is compiled, dynamo is not even imported
        # (it would page in tens of MiB that this measure would count as the rows')
        eager = torch.compiler.set_stance('force_eager') if 'torch._dynamo' in sys.modules else nullcontext()
        with eager, ctx:
            _, loss = model(idx, idx)
        loss.backward()
        peak = peak_bytes(device)
    model.zero_grad(set_to_none=True)
    del idx, loss
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    return max(0, peak - before)


def fit_micro_batch(model, ctx, device, block_size, most, budget, bisect):
    """The largest number of rows, at most `most`, whose forward and backward pass fits budget bytes. bisect:
    find it by trying sizes (out of memory is an exception that leaves the device usable), else by extrapolating
    from the measured memory of a few rows."""
    if budget <= 0:
        raise FitError(f'no memory left for a micro-batch ({budget / 2**20:,.0f} MiB after headroom and the '
                       f'optimizer state)')

    def fits(rows):
        try:
            return measure(model, ctx, device, block_size, rows) <= budget
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            if device.startswith('cuda'):
                torch.cuda.empty_cache()
            return False

    if bisect:
        good, bad, rows = 0, None, 1
        while bad is None and good < most:  # doubling, up to the first size that does not fit
            if fits(rows):
                good, rows = rows, min(2 * rows, most)
            else:
                bad = rows
        while bad is not None and bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if fits(middle) else (good, middle)
        if good == 0:
            raise FitError(f'one row of {block_size} tokens does not fit the memory left ({budget / 2**20:,.0f} MiB)')
        return good
    # extrapolated: 1, 2, 4 and 8 rows (as far as they fit), and a line through the last two. Each costs what the
    # process holds at its peak beyond what it held before the first: memory freed on a CPU stays resident, and
    # the next pass reuses it, so that is what training at that size will hold too
    since = used_bytes(device) if not device.startswith('cuda') else None

    def cost(rows):  # None: out of memory
        try:
            return measure(model, ctx, device, block_size, rows, since)
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            return None

    sizes, costs = [0], [0]
    for rows in (1, 2, 4, 8):
        if rows > most or costs[-1] > budget:
            break
        measured = cost(rows)
        if measured is None:
            most = rows - 1
            break
        sizes.append(rows)
        costs.append(measured)
    per_row = max((costs[-1] - costs[-2]) / (sizes[-1] - sizes[-2]), 1) if len(sizes) > 1 else 1
    fixed = max(costs[-1] - per_row * sizes[-1], 0)
    rows = min(int((budget - fixed) // per_row), most)
    if rows > sizes[-1]:  # checked at that size: a line through small sizes can fall short at large ones
        measured = cost(rows)
        if measured is None or measured > budget:
            rows = sizes[-1] if measured is None else int(rows * budget / measured)
    if rows < 1:
        raise FitError(f'one row of {block_size} tokens needs about {(fixed + per_row) / 2**20:,.0f} MiB, more than '
                       f'the {budget / 2**20:,.0f} MiB left')
    return rows


def micro_batch_for(fit, step_rows):
    """The micro-batch and accumulation for a step of step_rows rows (per process) when fit rows fit: the largest
    divisor of step_rows up to fit, so the step keeps its size. Where the divisors are poor (less than half the fit),
    the fit itself, and the step grows to the next multiple of it. Returns (micro, steps, note): note says why the
    micro-batch or the step differs from what was asked, or is ''."""
    divisor = max(d for d in range(1, min(fit, step_rows) + 1) if step_rows % d == 0)
    if 2 * divisor >= min(fit, step_rows):
        note = '' if divisor == min(fit, step_rows) else (
            f'{divisor} rows per micro-batch, not {fit}: the largest that divides the step of {step_rows} rows')
        return divisor, step_rows // divisor, note
    steps = -(-step_rows // fit)
    return fit, steps, (f'the step grows from {step_rows} to {fit * steps} rows per process: {step_rows} has no '
                        f'divisor near the {fit} rows that fit')


def regroup(windows, micro):
    """A step's windows (a list of micro-batches from dataset.sample_windows) in micro-batches of micro rows: the
    same rows in the same order, as if drawn micro rows at a time."""
    if isinstance(windows[0], tuple):  # a chat dataset's (inputs, targets)
        inputs, targets = (np.concatenate(part) for part in zip(*windows))
        return [(inputs[i:i + micro], targets[i:i + micro]) for i in range(0, len(inputs), micro)]
    rows = np.concatenate(windows)
    return [rows[i:i + micro] for i in range(0, len(rows), micro)]


def halved(micro, steps, alone=True):
    """After running out of memory in micro-batches of micro rows, steps of them per step: the largest divisor of
    the step's rows up to half of micro, the steps that makes, and what changes, for the log. Raises FitError where
    one row did not fit, or the process is not alone (under torchrun a step cannot be redone by one process)."""
    rows = micro * steps
    if micro <= 1 or not alone:
        raise FitError(f'in micro-batches of {micro} row{"s" if micro > 1 else ""}'
                       + ('' if alone else ', which one process of several cannot redo alone')
                       + ': use --batch_size=auto, a smaller --batch_size or --block_size, or --activation_checkpointing=True')
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    smaller = max(d for d in range(1, micro // 2 + 1) if rows % d == 0)
    return smaller, rows // smaller, (f'redone, and the run goes on, in micro-batches of {smaller} rows, not {micro} '
                                      f'({rows // smaller} per step)')


def auto_micro_batch(model, optimizer, ctx, device, block_size, step_rows, memory_limit_gib, processes, sharded):
    """batch_size='auto': the micro-batch and the accumulation steps per process for a step of step_rows rows per
    process, and a line for the log. Every process fits its own device; all take the smallest fit. model: the
    unwrapped model, under FSDP sharded (its passes then run in every process together, extrapolated). Raises
    FitError, the same in every process."""
    bisect = device.startswith('cuda') and not sharded
    error = None
    try:
        budget = budget_bytes(device, memory_limit_gib, optimizer)
        rows = fit_micro_batch(model, ctx, device, block_size, step_rows, budget, bisect)
    except FitError as e:
        rows, error = 0, str(e)
    fits = processes.gather((rows, error))
    rows, error = min(fits, key=lambda f: f[0])
    if error:
        raise FitError(f'batch_size=auto: {error}: use a smaller --block_size or model, --activation_checkpointing=True, '
                       f'or --parallel=fsdp under torchrun')
    micro, steps, note = micro_batch_for(rows, step_rows)
    how = 'tried' if bisect else 'measured at 1-8 rows and extrapolated'
    line = (f'batch_size=auto: {rows} rows of {block_size} tokens fit per process ({how}, {HEADROOM:.0%} of the free '
            f'memory{", the smallest fit among the processes" if len(fits) > 1 else ""}): micro-batch {micro}, '
            f'{steps} accumulation step{"s" if steps > 1 else ""} per process' + (f'; {note}' if note else ''))
    return micro, steps, line


def in_halves(score, windows):
    """score(windows), the mean loss over a batch's targets; where the device runs out of memory, the mean over the
    batch's two halves, weighted by their targets (each halved again as needed). Raises OutOfMemoryError when one
    row does not fit."""
    try:
        return score(windows)
    except torch.OutOfMemoryError:
        rows = len(windows[0]) if isinstance(windows, tuple) else len(windows)
        if rows == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        halves = regroup([windows], (rows + 1) // 2)
        counts = [count_targets(half) for half in halves]
        return sum(in_halves(score, half) * count for half, count in zip(halves, counts)) / sum(counts)
