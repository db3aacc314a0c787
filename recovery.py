"""
When a run diverges: a non-finite loss or gradient norm, or a loss spike (a step's loss above spike_factor times
the median of the last spike_window steps'). With on_divergence='stop' (the default) the run stops and its last
good checkpoint stays; with 'recover' train.py goes back to that checkpoint (or to the initial weights, before the
first), draws other batches from there on, scales the learning rate down, and goes on, at most max_recoveries times.

    watch = DivergenceWatch(spike_factor, spike_window)
    why = watch.check(loss, finite)        # None, or what went wrong, after each step
    first = first_weights(model)           # before training: where a recovery before any checkpoint goes back to
    go_back_to_first(model, optimizer, first)   # after one, checkpoint.restore puts the run back in its state
"""
import math
import statistics
from collections import deque

import torch

ON_DIVERGENCE = ('stop', 'recover')


class DivergenceWatch:
    """Watches each step's loss (the same in every process: the step's mean over all of them)."""

    def __init__(self, spike_factor, spike_window):
        self.spike_factor = spike_factor
        self.recent = deque(maxlen=spike_window)

    def check(self, loss, finite=True):
        """What is wrong with a step of this loss (finite: its gradient norm was), or None. A spike needs a full
        window of steps before it, so warmup's falling losses are compared with their like."""
        if not (finite and math.isfinite(loss)):
            return f"the {'loss' if not math.isfinite(loss) else 'gradient norm'} is not finite"
        if self.spike_factor and len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:
                return f'the loss spiked to {loss:.4f}, {loss / median:.1f}x the median of the last {len(self.recent)} steps'
        self.recent.append(loss)
        return None

    def forget(self):
        """After going back: the steps undone are not the recent past of the run any more."""
        self.recent.clear()


def recovery_seed(seed, rank, iter_num, recoveries):
    """The seed of the batches and dropout after a recovery: others than those that led to the divergence, the
    same every time the run is repeated."""
    return [seed, rank, iter_num, 1000 + recoveries]


def first_weights(model):
    """This process's weights (its shards, under FSDP), copied to host memory: where a recovery goes back to
    before the run has saved a checkpoint."""
    return {name: (p.to_local() if hasattr(p, 'to_local') else p).detach().to('cpu', copy=True)
            for name, p in model.named_parameters()}


@torch.no_grad()
def go_back_to_first(model, optimizer, first):
    """Put model back to its first weights (first_weights') and the optimizer to its first, empty, state."""
    for name, p in model.named_parameters():
        (p.to_local() if hasattr(p, 'to_local') else p).copy_(first[name])
    optimizer.state.clear()
