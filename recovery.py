"""
When a run diverges: a non-finite loss or gradient norm, a loss far above the best val loss (a step's loss or an
evaluation's val loss above divergence_factor times it: finite garbage, never saved as a checkpoint), or a loss
spike (a step's loss above spike_factor times the median of the last spike_window steps'). With
on_divergence='stop' (the default) the run stops and its last good checkpoint stays; with 'recover' it goes back to
that checkpoint (or to its first weights, before the first), draws other batches and dropout from there, scales the
learning rate down, and goes on, at most max_recoveries times. train.py:

    recovery = Recovery(on_divergence, spike_factor, spike_window, max_recoveries, recovery_lr_scale, model, saved,
                        divergence_factor)
    why = recovery.check(loss, finite, best_val_loss)     # after each step: None, or what went wrong
    why = recovery.check_evaluation(val_loss, best_val_loss)  # after each evaluation, before its save
    if why and recovery.can_go_back(): iter_num, what = recovery.go_back(why, iter_num, model, optimizer, restore)
"""
import math
import statistics
from collections import deque

import numpy as np
import torch

ON_DIVERGENCE = ('stop', 'recover')
NO_BEST = 1e9  # the best val loss of a run before its first evaluation


class DivergenceWatch:
    """Watches each step's loss (the same in every process: the step's mean over all of them) and each evaluation's
    val loss."""

    def __init__(self, spike_factor, spike_window, divergence_factor=0.0):
        self.spike_factor, self.divergence_factor = spike_factor, divergence_factor
        self.recent = deque(maxlen=spike_window)

    def check(self, loss, finite=True, best=NO_BEST):
        """What is wrong with a step of this loss (finite: its gradient norm was; best: the best val loss so far), or
        None. A spike needs a full window of steps before it, so warmup's falling losses are compared with their
        like."""
        if not (finite and math.isfinite(loss)):
            return f"the {'loss' if not math.isfinite(loss) else 'gradient norm'} is not finite"
        if self.spike_factor and len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:
                return f'the loss spiked to {loss:.4f}, {loss / median:.1f}x the median of the last {len(self.recent)} steps'
        far = self.far_above_best('loss', loss, best)
        if far:
            return far
        self.recent.append(loss)
        return None

    def far_above_best(self, what, loss, best):
        """Whether loss is more than divergence_factor times the best val loss: weights that far off are finite
        garbage (a too large learning rate), not a checkpoint to keep."""
        if self.divergence_factor and best < NO_BEST and loss > self.divergence_factor * best:
            return f'the {what} is {loss:.4g}, {loss / best:,.0f}x the best val loss ({best:.4f})'
        return None


class Recovery:
    """What on_divergence needs across a run: the watch, the recoveries made and the learning rate's scale (saved
    in checkpoints: a resumed run goes on at its lower rate), and the first weights to go back to before any
    checkpoint (this process's, its shards under FSDP, in host memory)."""

    def __init__(self, mode, spike_factor, spike_window, max_recoveries, lr_scale_factor, model, saved=None,
                 divergence_factor=0.0):
        self.mode, self.max_recoveries, self.lr_scale_factor = mode, max_recoveries, lr_scale_factor
        self.watch = DivergenceWatch(spike_factor if mode == 'recover' else 0, spike_window, divergence_factor)
        self.recoveries = (saved or {}).get('recoveries', 0)
        self.lr_scale = (saved or {}).get('lr_scale', 1.0)
        self.first = None
        if mode == 'recover' and saved is None:
            self.first = {name: _local(p).detach().to('cpu', copy=True) for name, p in model.named_parameters()}

    def state(self):
        return dict(recoveries=self.recoveries, lr_scale=self.lr_scale)

    def check(self, loss, finite=True, best=NO_BEST):
        return self.watch.check(loss, finite, best)

    def check_evaluation(self, val_loss, best):
        """What is wrong with an evaluation's val loss, or None: checked before the evaluation's save."""
        return self.watch.far_above_best('val loss', val_loss, best)

    def can_go_back(self):
        return self.mode == 'recover' and self.recoveries < self.max_recoveries

    @torch.no_grad()
    def go_back(self, why, iter_num, model, optimizer, restore=None):
        """Back to the last good state: restore() (the last checkpoint's, returning its checkpoint.json) or, where
        None, the first weights and a fresh optimizer. Returns the iteration gone back to, its best val loss (None:
        unchanged), and a line for the log."""
        self.recoveries += 1
        self.lr_scale *= self.lr_scale_factor
        self.watch.recent.clear()  # the steps undone are not the recent past of the run any more
        if restore is not None:
            ckpt = restore()
            back, best = ckpt['iter_num'], ckpt['best_val_loss']
        else:
            for name, p in model.named_parameters():
                _local(p).copy_(self.first[name])
            optimizer.state.clear()
            back, best = 0, None
        return back, best, (f'{why} at iteration {iter_num}: back to iteration {back}, on other batches, learning rate '
                            f'x{self.lr_scale:g} (recovery {self.recoveries} of {self.max_recoveries})')

    def seed(self, seed, rank, iter_num):
        """The seed of the batches and dropout after a recovery: others than those that led to the divergence, the
        same every time the run is repeated."""
        return int(np.random.SeedSequence([seed, rank, iter_num, 1000 + self.recoveries]).generate_state(1)[0])


def _local(p):
    return p.to_local() if hasattr(p, 'to_local') else p  # an FSDP shard
