"""What a run leaves behind to look at (metrics.py, plot.py) and what train.py does for a run left alone: the
metrics log against train.py's own printed figures, across a resume; the plot as an image that follows the curve;
autosaves between evaluations; samples at evaluations that leave training untouched."""
import json
import struct

import pytest
import torch

from checkpoint import read_checkpoint
from conftest import TINY_TRAIN, assert_clean_error, final_weights, run, val_losses
from metrics import KINDS, MetricsLog, plot_runs, read_metrics


def train(dataset, out, *args, check=True):
    return run('train.py', f'--dataset={dataset}', f'--out_dir={out}', *TINY_TRAIN, *args, check=check)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, read here without an image library."""
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    return struct.unpack('>II', data[16:24])


def test_metrics_log_records_what_train_printed_and_a_resume_continues_the_curve(char_dataset, tmp_path):
    out = tmp_path / 'out'
    first = train(char_dataset, out, '--max_iters=8', '--eval_interval=4', '--log_interval=2')
    (out / 'metrics.jsonl').open('a').write('{"kind": "step", "iter": 9, "ti')  # a kill mid-line, past the checkpoint
    resumed = train(char_dataset, out, '--init_from=resume', '--max_iters=12', '--eval_interval=4', '--log_interval=2')
    records = read_metrics(out)
    evals = [r for r in records if r['kind'] == 'eval']
    assert [r['iter'] for r in evals] == [0, 4, 8, 12]
    assert [round(r['val_loss'], 4) for r in evals] == val_losses(first.stdout) + val_losses(resumed.stdout)
    steps = [r for r in records if r['kind'] == 'step']
    assert [r['iter'] for r in steps] == [2, 4, 6, 8, 10, 12]
    printed = {int(l.split()[1][:-1]): float(l.split()[3][:-1]) for l in (first.stdout + resumed.stdout).splitlines()
               if l.startswith('iter ')}
    assert all(round(r['train_loss'], 4) == printed[r['iter']] for r in steps)
    # the log shows the learning rate of each step: warmup over 5 steps to 3e-3 (TINY_TRAIN), iteration n taking step
    # n - 1's, (n - 1 + 1) / 6 of it; then the cosine, over lr_decay_iters=600,000, has barely begun
    lrs = {int(l.split()[1][:-1]): float(l.split('lr ')[1]) for l in first.stdout.splitlines() if l.startswith('iter ')}
    assert lrs == pytest.approx({2: 1e-3, 4: 2e-3, 6: 3e-3, 8: 3e-3}, rel=1e-3)
    assert all(r['lr'] == pytest.approx(lrs[r['iter']], rel=1e-3) for r in steps if r['iter'] in lrs)
    times = [r['time'] for r in records]
    assert times == sorted(times) and all(r['lr'] > 0 and r['tokens_per_sec'] > 0 for r in steps)
    assert all(r['val_bits_per_byte'] > 0 for r in evals)
    assert png_size(out / 'loss.png') == (1200, 450)  # redrawn by train.py at each evaluation


def test_the_plot_follows_the_curve_and_plot_py_compares_runs(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    for folder, slope in ((a, 0.1), (b, 0.2)):
        folder.mkdir()
        log = MetricsLog(folder)
        for i in range(0, 50, 5):
            log.log('step', i, i * 0.1, train_loss=4 - slope * i ** 0.5, lr=1e-3, tokens_per_sec=1000, mfu=None)
            log.log('eval', i, i * 0.1 + 0.01, train_loss=4 - slope * i ** 0.5, val_loss=4.1 - slope * i ** 0.5,
                    val_bits_per_byte=None)
    assert plot_runs([a], str(tmp_path / 'one.png')) == 1
    run('plot.py', str(a), str(b), f'--out={tmp_path / "two.png"}')
    assert png_size(tmp_path / 'one.png') == png_size(tmp_path / 'two.png') == (1200, 450)
    assert (tmp_path / 'one.png').read_bytes() != (tmp_path / 'two.png').read_bytes()
    with open(a / 'metrics.jsonl', 'a') as f:  # one more evaluation: another picture
        f.write(json.dumps(dict(kind='eval', iter=55, time=6.0, train_loss=1.0, val_loss=1.0)) + '\n')
    plot_runs([a], str(tmp_path / 'one-more.png'))
    assert (tmp_path / 'one.png').read_bytes() != (tmp_path / 'one-more.png').read_bytes()
    assert_clean_error(run('plot.py', str(tmp_path / 'nothing'), check=False), 'has no metrics.jsonl')
    # lines that are not records (hand edits, another tool) are left out, never a crash of the run that plots them
    with open(a / 'metrics.jsonl', 'a') as f:
        f.write('[1, 2]\n{"kind": "step", "iter": "7"}\n{"kind": "eval", "iter": 60, "time": "late", "val_loss": 1}\n')
    assert len(read_metrics(a)) == 22 and plot_runs([a], str(tmp_path / 'junk.png')) == 1  # the last one: no time to plot at


def test_a_rewind_drops_the_steps_undone_and_an_event_is_drawn(tmp_path):
    """A recovery from divergence rewinds the log to where it went back to and logs an event there, which the plot
    marks: the same curve with and without the event are two pictures."""
    plain, marked = tmp_path / 'plain', tmp_path / 'marked'
    for folder in (plain, marked):
        folder.mkdir()
        log = MetricsLog(folder)
        for i in range(1, 10):
            log.log('step', i, i * 0.1, train_loss=3 - 0.1 * i)
        log.rewind(5)
        if folder == marked:
            log.log('event', 5, 1.0, what='divergence', detail='the loss is not finite at iteration 9: back to 5')
        log.log('step', 6, 1.1, train_loss=2.5)
    assert [(r['kind'], r['iter']) for r in read_metrics(marked, KINDS)] == [('step', i) for i in range(1, 6)] + [
        ('event', 5), ('step', 6)]
    plot_runs([plain], str(tmp_path / 'plain.png'))
    plot_runs([marked], str(tmp_path / 'marked.png'))
    assert (tmp_path / 'plain.png').read_bytes() != (tmp_path / 'marked.png').read_bytes()


def test_autosave_between_evaluations(char_dataset, tmp_path):
    """save_interval saves on its own schedule: with learning_rate 0 the last evaluation finds no better val loss and,
    with always_save_checkpoint off, saves nothing; the run's last state is then saved at the end (before #21, the
    checkpoint left was the autosave's of iteration 6)."""
    out = tmp_path / 'out'
    proc = train(char_dataset, out, '--max_iters=7', '--eval_interval=1000', '--save_interval=3', '--learning_rate=0',
                 '--always_save_checkpoint=False')
    assert [l for l in proc.stdout.splitlines() if l.startswith('saving')] == [
        f'saving checkpoint to {out} (iteration {i})' for i in (3, 6, 7)]
    assert read_checkpoint(out)['iter_num'] == 7


def test_samples_at_evaluations_leave_training_untouched(char_dataset, tmp_path):
    args = ['--max_iters=12', '--eval_interval=6', '--dropout=0.1']
    quiet = train(char_dataset, tmp_path / 'quiet', *args)
    talking = train(char_dataset, tmp_path / 'talking', *args, '--sample_interval=6', '--sample_start=ROMEO:')
    samples = [l for l in talking.stdout.splitlines() if l.startswith('sample at step')]
    assert [s.split(':')[0] for s in samples] == ['sample at step 0', 'sample at step 6', 'sample at step 12']
    assert all(s.split(': ', 1)[1][1:].startswith('ROMEO:') for s in samples) and samples[0] != samples[-1]  # a repr
    assert val_losses(quiet.stdout) == val_losses(talking.stdout)
    (_, a), (_, b) = final_weights(tmp_path / 'quiet'), final_weights(tmp_path / 'talking')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_best_and_latest_checkpoints(tmp_path):
    """A save that is not the best leaves best.json naming the best one's weights, which stay; sample.py and eval.py
    read the best by default (--checkpoint=latest the other); a new best replaces it and its file goes."""
    from checkpoint import load_model, save_checkpoint
    from model import GPT, GPTConfig
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    models = []
    for i, best in ((1, True), (2, False)):
        torch.manual_seed(i)
        models.append(GPT(GPTConfig(**args)))
        save_checkpoint(tmp_path, models[-1], None, i, 0.0, args, {}, None, best=best)
    assert read_checkpoint(tmp_path)['iter_num'] == 2 and read_checkpoint(tmp_path, 'best.json')['iter_num'] == 1
    for which, expected in (('best', models[0]), ('latest', models[1])):
        loaded = load_model(tmp_path, which=which).model
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))
    assert sorted(p.name for p in tmp_path.glob('model-*')) == ['model-0000001.safetensors', 'model-0000002.safetensors']
    save_checkpoint(tmp_path, models[1], None, 3, 0.0, args, {}, None, best=True)
    assert read_checkpoint(tmp_path, 'best.json')['iter_num'] == 3
    assert sorted(p.name for p in tmp_path.glob('model-*')) == ['model-0000003.safetensors']


def test_early_stopping_patience_and_overfitting(char_dataset, tmp_path):
    """patience: with learning_rate 0 no evaluation finds a better val loss; the run stops after `patience` of them.
    max_overfit_gap: a val split unlike the train split (other characters' order) opens a gap fast."""
    proc = train(char_dataset, tmp_path / 'patient', '--learning_rate=0', '--patience=2', '--eval_interval=2',
                 '--max_iters=100')
    assert 'early stop at step 4: no new best val loss in 2 evaluations' in proc.stdout and 'iter 5:' not in proc.stdout
    # the latest checkpoint is the stop's; no evaluation after step 0 was better, so there is no best.json
    assert read_checkpoint(tmp_path / 'patient')['iter_num'] == 4 and not (tmp_path / 'patient' / 'best.json').exists()
    import numpy as np
    from dataset import load_meta, write_dataset
    from tokenizer import load_tokenizer
    tok = load_tokenizer(load_meta(char_dataset)['tokenizer'])
    train_ids = np.fromfile(char_dataset / 'train.bin', dtype=np.uint16)
    shuffled = np.random.default_rng(0).permutation(train_ids[:4000])  # same characters, no structure to learn
    (tmp_path / 'mismatch').mkdir()
    write_dataset(tmp_path / 'mismatch', tok, {'train': train_ids, 'val': shuffled})
    proc = train(tmp_path / 'mismatch', tmp_path / 'overfit', '--max_overfit_gap=0.3', '--eval_interval=5',
                 '--max_iters=200', '--learning_rate=1e-2')
    [line] = [l for l in proc.stdout.splitlines() if l.startswith('early stop')]
    step = int(line.split()[4][:-1])
    train_loss, val_loss = [(float(l.split()[4][:-1]), float(l.split()[7][:-1])) for l in proc.stdout.splitlines()
                            if l.startswith(f'step {step}:')][0]
    assert val_loss - train_loss > 0.3 and step < 200 and 'max_overfit_gap=0.3' in line
    assert read_checkpoint(tmp_path / 'overfit')['iter_num'] == step  # saved at the evaluation that stopped it


def test_a_progress_bar_on_a_terminal_and_plain_lines_otherwise(char_dataset, tmp_path):
    """On a terminal: one bar (iterations, time left, loss, tokens/s) with the evaluations' lines above it and no
    line per iteration; into a pipe or a file (as everywhere else in these tests): the greppable lines."""
    from conftest import run_in_terminal
    code, text = run_in_terminal('train.py', f'--dataset={char_dataset}', f'--out_dir={tmp_path / "tty"}', *TINY_TRAIN,
                                 '--max_iters=8', '--eval_interval=4')
    assert code == 0, text
    assert '8/8' in text and ('it/s' in text or 's/it' in text)
    assert 'loss ' in text and 'tok/s' in text and 'step 4: train loss' in text and 'step 8: train loss' in text
    assert '\niter 5: loss' not in text.replace('\r', '\n')
    piped = train(char_dataset, tmp_path / 'pipe', '--max_iters=8', '--eval_interval=4')
    assert 'iter 5: loss' in piped.stdout and 'it/s' not in piped.stdout
