"""What goes wrong in real runs, a few times each (faults.py tries each many times and prints a table): kill -9
at random moments and in every phase of a save, a diverging run, two runs in one folder, a full disk during a
save and during prepare, Ctrl-C and SIGTERM, damaged and crafted checkpoint files, and bad settings. Every
check is against something independent of the code under test: an uninterrupted run's weights, the files as
they were before, the one-line error contract."""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import ROOT, TINY_TEXT, assert_clean_error, run

import faults
from checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from generate import generate
from model import GPT, GPTConfig
from muon import configure_optimizers


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    return faults.Lab(str(tmp_path_factory.mktemp('faults')))


def test_kill_nine_mid_save_or_at_random_loses_nothing(lab):
    counts = faults.kill_trials(lab, 2, random.Random(3))
    assert counts['during_save'] == 1 and counts['corrupt'] == 0 and counts['temporaries_left'] == 0
    assert counts['resumed'] >= 1 and counts['resumed_exactly'] == counts['resumed'], counts


KILL_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from checkpoint import load_model, save_checkpoint
model, _, ckpt = load_model({out!r})
real_replace, calls = os.replace, [0]
def replace(src, dst):  # the save's renames: model file, optimizer file, checkpoint.json
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
save_checkpoint({out!r}, model, None, 99, 0.0, ckpt['model_args'], ckpt['config'], ckpt['tokenizer'])
"""


@pytest.mark.parametrize('rename', [1, 2, 3], ids=['before-model-rename', 'before-optimizer-rename', 'before-index-rename'])
def test_a_kill_in_each_phase_of_a_save_keeps_the_previous_checkpoint(lab, rename):
    """A save killed before each of its renames: the previous checkpoint loads with its own weights, and the
    next save removes what the killed one left (a temporary, or a weight file no checkpoint names)."""
    out = lab.out(f'phase-{rename}')
    code, _, err = faults.finish(lab.train(out, '--max_iters=4', '--eval_interval=4'))
    assert code == 0, err
    before = faults.weights(out)
    proc = subprocess.run([sys.executable, '-c', KILL_AT.format(root=str(ROOT), out=out, n=rename)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert len(os.listdir(out)) > 4  # the killed save left something behind
    model, _, ckpt = load_model(out)
    assert ckpt['iter_num'] == 4 and faults.same_weights(faults.weights(out)[1], before[1])
    code, _, err = faults.finish(lab.train(out, '--init_from=resume', '--max_iters=6', '--eval_interval=2'))
    assert code == 0, err
    assert sorted(os.listdir(out)) == ['.lock', 'best.json', 'checkpoint.json', 'loss.png', 'metrics.jsonl',
                                       'model-0000006.safetensors', 'optimizer-0000006.safetensors', 'report.html']


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(lab):
    result = faults.divergence_trial(lab)
    assert result['one_line'] and result['kept'], result['message']
    assert 'the checkpoint of iteration 4' in result['message'] and '--learning_rate' in result['message']


def test_a_run_diverging_to_finite_garbage_keeps_the_good_checkpoint(lab):
    """A learning rate that sends the loss to hundreds or billions without a NaN: the first step that far above the
    best val loss (divergence_factor) stops the run (with 'recover', after its recoveries), and the checkpoint of
    iteration 4 stays the one saved, loadable."""
    results = faults.garbage_trials(lab)
    assert all(said and kept for _, said, kept, _ in results), results
    assert all('x the best val loss' in message for *_, message in results), results


def test_a_second_run_in_an_out_dir_is_refused_and_a_dead_runs_lock_taken_over(lab):
    result = faults.concurrent_trial(lab)
    assert result['refused'] and result['taken_over'], result
    assert 'is in use by another training run' in result['message'] and '--out_dir' in result['message']


@pytest.mark.skipif(not hasattr(signal, 'SIGXFSZ'), reason='a full disk is imitated with POSIX file-size limits')
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(lab):
    result = faults.disk_full_save_trial(lab)
    assert result['one_line'] and result['intact'] and not result['temporaries_left'], result
    assert 'File too large' in result['message'] and 'previous checkpoint' in result['message']


@pytest.mark.skipif(not hasattr(signal, 'SIGXFSZ'), reason='a full disk is imitated with POSIX file-size limits')
def test_a_full_disk_outside_a_save_stops_in_one_line_and_leaves_nothing_partial(lab):
    results = faults.full_disk_outside_saves(lab)
    assert all(one_line and intact and clean for _, one_line, intact, clean, _ in results), results
    assert all('File too large' in message for *_, message in results), results


@pytest.mark.skipif(not hasattr(signal, 'SIGXFSZ'), reason='a full disk is imitated with POSIX file-size limits')
def test_a_full_disk_while_preparing_keeps_the_old_dataset(lab):
    result = faults.disk_full_prepare_trial(lab)
    assert result['one_line'] and result['intact'], result
    assert 'unchanged' in result['message']


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['ctrl-c', 'sigterm'])
def test_ctrl_c_or_sigterm_saves_that_iteration_and_resumes_exactly(lab, signum):
    result = faults.interrupt_trial(lab, signum, random.Random(int(signum)))
    assert result['stopped_and_saved'] and result['resumed_exactly'], result['message']


def test_a_second_ctrl_c_leaves_at_once(lab):
    """The first Ctrl-C arrives during a long first evaluation: the run would save after its next step. A second
    one, a second and a half later, ends the process there, without a checkpoint."""
    out = lab.out('twice')
    proc = lab.train(out, '--max_iters=100000', '--eval_interval=3', '--eval_iters=20000')
    for line in proc.stdout:
        if 'training FLOPs per token' in line:
            break  # printed just before the loop: the evaluation of iteration 0 (tens of seconds) begins
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    code, _, err = faults.finish(proc, timeout=60)
    assert code == 130 and 'interrupted again: exiting without saving' in err
    assert not os.path.exists(os.path.join(out, 'checkpoint.json'))


def good_checkpoint(lab):
    """A run of 2 iterations that saved at 2, trained once for the tests that damage or extend copies of it."""
    good = lab.out('good')
    if not os.path.exists(good):
        code, _, err = faults.finish(lab.train(good, '--max_iters=2', '--eval_interval=2'))
        assert code == 0, err
    return good


def damaged(lab, name):
    good = good_checkpoint(lab)
    return faults.damaged_copy(good, tempfile.mkdtemp(prefix='damaged-', dir=lab.folder),
                               {**faults.DAMAGE, **faults.RESUME_DAMAGE}[name])


@pytest.mark.parametrize('name,message', [
    ('model_file outside the folder', 'model_file must be a file name in its folder'),
    ('model_file absolute', 'model_file must be a file name in its folder'),
    ('model_file not a string', 'model_file must be a file name'),
    ('model_args a list', 'model_args must be an object'),
    ('model_args unknown field', "unexpected keyword argument 'n_layers'"),
    ('n_head a string', "n_head='2' must be int"),
    ('dropout out of range', 'dropout=5 must be in [0, 1)'),
    ('tokenizer a string', 'tokenizer must be an object'),
    ('no model_file', "lacks 'model_file'"),
    ('a JSON list', 'not a JSON object'),
    ('truncated JSON', 'cannot read'),
    ('weights not safetensors', 'not a readable safetensors file'),
    ('weights truncated', 'not a readable safetensors file'),
    ('a weight of the wrong shape', 'transformer.h.0.attn.c_attn.weight is (7, 3) in the file'),
    ('weights missing', 'is missing'),
    ('huge context', 'transformer.wpe.weight is (32, 32) in the file'),
    ('iter_num a string', "iter_num must be a whole number, not '10'"),
    ('config missing', "lacks 'config'"),
    ('best.json truncated', 'best.json'),
    ('nested 100,000 deep', 'cannot read'),
    ('a 5,000-digit integer', 'cannot read'),
    ('a flipped exponent bit', 'its SHA-256 differs from the one recorded when it was saved'),
    ('weights all NaN', 'holds NaN or inf'),
])
def test_a_damaged_checkpoint_is_refused_with_what_is_wrong(lab, name, message):
    with pytest.raises(CheckpointError) as error:
        load_model(damaged(lab, name))
    assert message in str(error.value)


@pytest.mark.parametrize('name,message', [
    ('random generators missing', "KeyError: 'rng.torch'"),
    ('process states not a list', 'do not load (ValueError'),
    ('optimizer groups missing', "KeyError: 'param_groups'"),
    ('optimizer file missing', 'is missing'),
    ('evals_since_best a string', "evals_since_best must be a whole number, not 'x'"),
    ('data_rng of another generator', 'do not load (ValueError'),
    ('a random generator of the wrong size', 'the torch generator state is a torch.uint8 tensor of shape (7,)'),
    ('a random generator of the wrong dtype', 'the torch generator state is a torch.float32 tensor'),
])
def test_damage_only_a_resume_meets_is_refused_with_what_is_wrong(lab, name, message):
    from checkpoint import load_training_state
    folder = damaged(lab, name)
    model, _, ckpt = load_model(folder)
    with pytest.raises(CheckpointError) as error:
        load_training_state(folder, ckpt, configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu'))
    assert message in str(error.value)


def test_a_damaged_checkpoint_stops_a_resume_in_one_line(lab):
    proc = lab.train(damaged(lab, 'process states not a list'), '--init_from=resume', '--max_iters=4')
    code, _, err = faults.finish(proc)
    assert faults.one_line_error(code, err) and 'sample from it, or train afresh' in err, err


def test_crafted_sizes_are_refused_at_once_and_in_one_line(lab):
    """A config asking for a million layers or a billion-token vocabulary is compared with the weight file's
    header before anything is built: sample.py answers in seconds, in one line (it used to allocate for ever)."""
    for name in ('huge n_layer', 'huge vocabulary'):
        t0 = time.time()
        proc = run('sample.py', f'--out_dir={damaged(lab, name)}', '--device=cpu', check=False, timeout=60)
        assert_clean_error(proc, 'does not fit its checkpoint.json')
        assert time.time() - t0 < 30


def test_a_rotary_model_of_a_huge_context_decodes_with_a_cache_sized_to_the_request():
    """block_size is no weight (rotary positions have none): a checkpoint may claim any. Nothing is allocated in
    proportion to it: the rotary angles are computed per position, the KV cache holds what the request can reach."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=10**9, vocab_size=32, position='rotary')).eval()
    prompt = torch.randint(0, 32, (1, 5))
    out = generate(model, prompt, 6, temperature=0)
    small = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32, position='rotary')).eval()
    small.load_state_dict(model.state_dict())
    # exactly: both caches hold the 11 positions the request reaches, so both decode with the same shapes
    assert torch.equal(out, generate(small, prompt, 6, temperature=0))


def test_a_reader_racing_a_save_takes_the_newer_checkpoint(lab, monkeypatch):
    """A reader that read checkpoint.json just before a run replaced the checkpoint finds its weight file gone:
    it reads checkpoint.json once more instead of calling the checkpoint incomplete."""
    import checkpoint
    out = lab.out('race')
    code, _, err = faults.finish(lab.train(out, '--max_iters=4', '--eval_interval=2'))
    assert code == 0, err
    stale = dict(read_checkpoint(out), model_file='model-0000002.safetensors')  # deleted by the save at 4
    reads = iter([stale])
    real = checkpoint.read_checkpoint
    monkeypatch.setattr(checkpoint, 'read_checkpoint', lambda folder, name: next(reads, None) or real(folder, name))
    model, _, ckpt = checkpoint.load_model(out, which='latest')
    assert ckpt['iter_num'] == 4


def test_a_save_spares_other_files_and_never_overwrites_the_current_checkpoint(tmp_path):
    """Saving the same iteration twice writes new files (the current ones stay valid until checkpoint.json
    moves on); files that are not this format's own survive every save."""
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    model = GPT(GPTConfig(**args))
    foreign = ['my-model.safetensors', 'model-best.safetensors', 'notes-2024.safetensors', 'model-0000005.safetensors.bak']
    for name in foreign:
        (tmp_path / name).write_bytes(b'mine')
    save_checkpoint(tmp_path, model, None, 5, 1.0, args, {}, None)
    first = read_checkpoint(tmp_path)['model_file']
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_checkpoint(tmp_path, model, None, 5, 1.0, args, {}, None)
    second = read_checkpoint(tmp_path)['model_file']
    assert (first, second) == ('model-0000005.safetensors', 'model-0000005-1.safetensors')
    loaded, _, _ = load_model(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert all((tmp_path / name).read_bytes() == b'mine' for name in foreign)
    assert sorted(os.listdir(tmp_path)) == sorted(foreign + ['checkpoint.json', second, 'optimizer-0000005-1.safetensors'])


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    model = GPT(GPTConfig(**args))
    save_checkpoint(tmp_path, model, None, 5, 1.0, args, {}, None)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float('nan')
    with pytest.raises(CheckpointError, match='transformer.h.0.mlp.c_fc.weight .* hold NaN or inf'):
        save_checkpoint(tmp_path, model, None, 6, 1.0, args, {}, None)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_sizes_beyond_the_memory_are_refused_before_allocating(lab):
    """Each HUGE_SIZES case: one line saying what it would need and what is free, in seconds, and without taking the
    memory (the process's peak, as the kernel counted it, stays under 1 GB)."""
    results = faults.huge_sizes(lab)
    failed = [(name, args, message) for name, args, ok, _, _, message in results if not ok]
    assert not failed, failed
    assert all(seconds < 30 and peak < 1024 for _, _, _, seconds, peak, _ in results), results


def test_bad_settings_give_one_line_and_exit_code_2(lab):
    failed = [(name, args, message) for name, args, ok, message in faults.bad_settings(lab) if not ok]
    assert not failed, failed


def test_settings_that_look_odd_but_mean_something_still_work(lab, char_dataset, tmp_path):
    """learning_rate=0 is legal (AdamW's weights stay put, decay included); a non-UTF-8 prompt file is refused
    with the fix in one line, and --encoding_errors=replace reads it; a config file's unknown data is refused."""
    out = tmp_path / 'frozen'
    proc = run('train.py', f'--dataset={char_dataset}', f'--out_dir={out}', *faults.TRAIN, '--dropout=0.0',
               '--max_iters=3', '--eval_interval=3', '--learning_rate=0', '--seed=4')
    ckpt, trained = faults.weights(str(out))
    initial = GPT(GPTConfig(**ckpt['model_args']))
    initial.init_weights(torch.Generator().manual_seed(4))  # train.py's initial weights for --seed=4
    initial = initial.state_dict()
    assert 'iter 3:' in proc.stdout and all(torch.equal(trained[k], initial[k]) for k in trained)

    prompt = tmp_path / 'prompt.txt'
    prompt.write_bytes('ROMEO: ol\u00e1'.encode('latin-1'))
    proc = run('sample.py', f'--out_dir={out}', '--device=cpu', f'--start=FILE:{prompt}', '--max_new_tokens=3', check=False)
    assert_clean_error(proc, 'is not UTF-8', '--encoding_errors=replace')
    proc = run('sample.py', f'--out_dir={out}', '--device=cpu', f'--start=FILE:{prompt}', '--max_new_tokens=3',
               '--encoding_errors=replace', '--drop_unknown=True', '--num_samples=1')
    assert proc.stdout.startswith('ROMEO: ol')

    config = tmp_path / 'odd.py'
    config.write_text('import math\nlayer_sizes = [64, 128]\n')
    proc = run('train.py', str(config), f'--dataset={char_dataset}', check=False)
    assert_clean_error(proc, "unknown config key 'layer_sizes'")


def test_ctrl_c_while_preparing_with_workers_says_one_line(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the workers stay quiet, the main process says what
    happened in one line, and nothing is left in the folder. The script starts with Ctrl-C's default action, as a
    terminal's foreground job does, even when the suite itself runs with SIGINT ignored (a shell's background job)."""
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n\n'.join(f'{i}: {TINY_TEXT[i % 500:]}' for i in range(600)), encoding='utf-8')
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, str(ROOT / 'prepare.py'), f'--input={corpus}', f'--out_dir={out}',
                             '--tokenizer=bpe', '--vocab_size=2000', '--num_proc=2', '--batch_mb=0.2'], cwd=ROOT,
                            env=faults.ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith('preparing')
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert_clean_error(subprocess.CompletedProcess(proc.args, proc.returncode, '', err), 'interrupted')
    assert not out.exists() or not os.listdir(out)


def test_a_full_disk_at_any_point_of_a_write_keeps_the_previous_dataset_and_checkpoint(tmp_path):
    """Ten places spread over re-writing a dataset, and ten over saving a checkpoint, where the disk runs out:
    each leaves the folder byte for byte as it was (before, a full disk while writing val.bin had already
    replaced train.bin and deleted meta.json)."""
    counts = faults.full_disk_sweep(str(tmp_path), 10)
    assert counts['trials'] == counts['failed'] == counts['intact'] == 20 and not counts['temporaries_left'], counts


def killed_save(folder, model, ckpt, rename):
    """A save of a new best (iteration 99, val loss 0.5) in a child process, killed (SIGKILL) just before its rename
    number `rename`: the model file's, the optimizer file's, then the two JSON pointers'. Forked: it holds the model
    already, and does nothing but tiny tensor copies and file writes."""
    pid = os.fork()
    if pid == 0:
        try:
            real_replace, calls = os.replace, [0]

            def replace(src, dst):
                calls[0] += 1
                if calls[0] == rename:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst)
            os.replace = replace
            save_checkpoint(folder, model, None, 99, 0.5, ckpt['model_args'], ckpt['config'], ckpt['tokenizer'], best=True)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='the killed save runs in a forked child')
@pytest.mark.parametrize('rename', [1, 2, 3, 4])
def test_a_kill_at_each_rename_of_a_new_best_never_loses_it(lab, tmp_path, rename):
    """A save of a new best killed before each of its four renames, then the next save (not a best): whichever
    pointer named the new best's weights after the kill, they survive and best.json names them once the run resumes.
    (checkpoint.json was renamed before best.json: a kill between the two left best.json naming the older weights, and
    the next save deleted the real best.)"""
    from checkpoint import resumed_best_val_loss
    folder = tmp_path / 'out'
    shutil.copytree(good_checkpoint(lab), folder)
    model, _, ckpt = load_model(folder, which='latest')
    killed_save(folder, model, ckpt, rename)
    named = {read_checkpoint(folder, name)['model_file'] for name in ('checkpoint.json', 'best.json')}
    new_best_named = 'model-0000099.safetensors' in named
    assert new_best_named == (rename == 4)  # only the last kill comes after a pointer names the new weights
    latest = read_checkpoint(folder)
    # what train.py's resume does: go on from the lower best val loss, then save again (no new best)
    best_val_loss = resumed_best_val_loss(folder, latest)
    save_checkpoint(folder, model, None, 100, best_val_loss, latest['model_args'], latest['config'], latest['tokenizer'])
    best = read_checkpoint(folder, 'best.json')
    assert (best['model_file'] == 'model-0000099.safetensors') == new_best_named, best
    assert (best_val_loss == 0.5) == new_best_named
    load_model(folder)  # the best loads: its weights are there


def test_readers_keep_up_with_a_run_that_saves_all_the_time(tmp_path, monkeypatch):
    """sample.py and eval.py reading a run that saves every iteration: each read takes whichever checkpoint is there
    when it opens the weights (it failed 20 times in 20 for `latest`, 13 for `best`, on a run saving twice a second,
    the one re-read of checkpoint.json being too few when loading takes a while). A thread saves as fast as it can;
    building the model is slowed to what a larger model takes."""
    import threading
    import checkpoint
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    model = GPT(GPTConfig(**args))
    save_checkpoint(tmp_path, model, None, 0, 1.0, args, {}, None, best=True)
    stop, saves = threading.Event(), [0]

    def run_that_saves():  # 20 saves a second: 40x the run of the report; a read that takes longer than the files
        while not stop.wait(0.05):  # it read last are kept cannot be helped by retrying
            saves[0] += 1
            save_checkpoint(tmp_path, model, None, saves[0], 1.0 / saves[0], args, {}, None, best=saves[0] % 2 == 0)
    build = checkpoint.checkpoint_model

    def slow_build(*a, **kw):
        time.sleep(0.02)
        return build(*a, **kw)
    monkeypatch.setattr(checkpoint, 'checkpoint_model', slow_build)
    saver = threading.Thread(target=run_that_saves)
    saver.start()
    failures, seen = [], 0
    try:
        for i in range(20):
            while saves[0] == seen:  # every read races at least one save, however slow the machine
                time.sleep(0.001)
            seen = saves[0]
            try:
                load_model(tmp_path, which=('latest', 'best')[i % 2])
            except CheckpointError as e:
                failures.append(str(e))
    finally:
        stop.set()
        saver.join()
    assert saves[0] >= 20 and not failures, (saves[0], failures[:2])
