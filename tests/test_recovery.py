"""on_divergence='recover' (recovery.py): a NaN and a loss spike injected at chosen steps (tests/spy.py). The run
goes back to its last good state, on other batches, at a lower learning rate, ends finite, and does it the same way
every time; after max_recoveries it stops as on_divergence='stop' does."""
import json
import math

import pytest
import torch
from conftest import TINY_TRAIN, assert_clean_error, final_weights, run

from recovery import NO_BEST, DivergenceWatch

# steps of one micro-batch: the spy's k-th training pass is a step's. Pass 3 (step 3) gets a NaN loss, before any
# checkpoint: back to the first weights. Counting on from there, pass 15 is step 12, 4 steps past the checkpoint of
# iteration 8: its loss x50 is a spike, back to iteration 8.
RECOVER = [*TINY_TRAIN, '--dropout=0.1', '--max_iters=16', '--eval_interval=8', '--warmup_iters=0',
           '--on_divergence=recover', '--spike_window=4', '--spike_factor=3', '--recovery_lr_scale=0.5']
FAULTS = {'SPY_FAULTS': '3:nan,15:spike'}


def test_a_nan_and_a_spike_are_recovered_from_the_same_way_every_time(char_dataset, tmp_path):
    runs = [run('tests/spy.py', 'train.py', *RECOVER, f'--dataset={char_dataset}', f'--out_dir={tmp_path / name}',
                env=FAULTS) for name in ('a', 'b')]
    out = runs[0].stdout
    assert ('divergence: the loss is not finite at iteration 3: back to iteration 0, on other batches, learning rate '
            'x0.5 (recovery 1 of 3)') in out
    assert 'divergence: the loss spiked to ' in out and ('the median of the last 4 steps at iteration 12: back to '
                                                          'iteration 8, on other batches, learning rate x0.25 (recovery 2 of 3)') in out
    ckpt, weights = final_weights(tmp_path / 'a')
    assert ckpt['iter_num'] == 16 and all(torch.isfinite(w).all() for w in weights.values())
    records = [json.loads(line) for line in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
    assert [(r['iter'], r['what']) for r in records if r['kind'] == 'event'] == [(0, 'divergence'), (8, 'divergence')]
    steps = [r['iter'] for r in records if r['kind'] == 'step']
    assert steps == list(range(1, 17))  # the steps undone left the curve
    last = next(r for r in records if r['kind'] == 'step' and r['iter'] == 16)
    assert math.isclose(last['lr'], 3e-3 * 0.25, rel_tol=1e-3)  # no warmup; the cosine has barely begun to fall
    # the same seed, the same faults: the same run (one process, the same arithmetic in the same order)
    _, again = final_weights(tmp_path / 'b')
    assert all(torch.equal(weights[name], again[name]) for name in weights)
    assert runs[1].stdout.count('divergence:') == 2


def test_after_max_recoveries_a_divergence_stops_the_run(char_dataset, tmp_path):
    proc = run('tests/spy.py', 'train.py', *RECOVER, f'--dataset={char_dataset}', f'--out_dir={tmp_path}',
               '--max_recoveries=1', env=FAULTS, check=False)
    proc.stderr = ''.join(line for line in proc.stderr.splitlines(True) if not line.startswith('spy 0:'))
    assert_clean_error(proc, 'training diverged at iteration 12: the loss spiked to', '(after 1 recoveries)',
                       'the checkpoint of iteration 8')
    assert json.loads((tmp_path / 'checkpoint.json').read_text())['iter_num'] == 8


@pytest.mark.parametrize('losses, verdicts', [
    ([2.0, 1.9, 1.8, 1.7, 9.0, 1.6], [None] * 4 + ['spike', None]),  # 9.0 > 3 x median(1.75); not added to the window
    ([5.0, 4.0, 3.0, 2.5, 2.2, 2.0], [None] * 6),                    # falling fast is no spike
    ([2.0, float('nan'), 2.0], [None, 'the loss is not finite', None]),
])
def test_a_spike_is_a_loss_above_a_multiple_of_the_recent_median(losses, verdicts):
    watch = DivergenceWatch(spike_factor=3, spike_window=4)
    seen = [watch.check(loss) for loss in losses]
    assert [('spike' if v and 'spiked' in v else v) for v in seen] == verdicts


@pytest.mark.parametrize('loss, best, verdict', [
    (35.0, 3.5, None),                                   # 10x the best: still a (bad) loss, not yet garbage
    (35.1, 3.5, 'the loss is 35.1, 10x the best val loss (3.5000)'),
    (2.3e10, 3.5, 'the loss is 2.3e+10, 6,571,428,571x the best val loss (3.5000)'),
    (5e8, NO_BEST, None),                                # no evaluation yet: nothing to compare with
])
def test_a_loss_far_above_the_best_val_loss_is_a_divergence(loss, best, verdict):
    assert DivergenceWatch(0, 4, divergence_factor=10).check(loss, best=best) == verdict
    assert DivergenceWatch(0, 4, divergence_factor=0).check(loss, best=best) is None  # 0: never
