import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from checkpoint import load_model, read_checkpoint
from conftest import TINY_TRAIN, assert_clean_error, run, torchrun, val_losses
from dataset import load_meta
from muon import configure_optimizers


def train(dataset, out_dir, *args, check=True):
    return run('train.py', f'--dataset={dataset}', f'--out_dir={out_dir}', *TINY_TRAIN, *args, check=check)


def final_weights(out_dir):
    return load_file(os.path.join(out_dir, read_checkpoint(out_dir)['model_file']))


def test_training_lowers_loss_and_writes_a_loadable_checkpoint(char_dataset, tmp_path):
    out = tmp_path / 'out'
    proc = train(char_dataset, out, '--max_iters=60', '--eval_interval=30')
    losses = val_losses(proc.stdout)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.8, proc.stdout
    assert 'tok/s' in proc.stdout
    ckpt = json.loads((out / 'checkpoint.json').read_text())
    assert ckpt['iter_num'] == 60 and ckpt['tokenizer'] == load_meta(char_dataset)['tokenizer']
    assert ckpt['config']['max_iters'] == 60 and ckpt['model_args']['n_layer'] == 2
    assert sorted(p.name for p in out.iterdir()) == [  # .lock: kept, it marks the folder while a run trains
        '.lock', 'best.json', 'checkpoint.json', 'loss.png', 'metrics.jsonl', 'model-0000060.safetensors',
        'optimizer-0000060.safetensors', 'report.html']
    model, _, _ = load_model(out)
    assert model.config.vocab_size == 64  # the tokenizer's 23 characters, padded to a multiple of 64


def test_resume_continues_exactly_like_the_uninterrupted_run(char_dataset, tmp_path):
    """A resume reaches the uninterrupted run's weights, with none of the run's settings repeated (no config file,
    not even --dataset): it goes on as the run was set up, and only what is given now (max_iters) changes, as the
    log says. (Before, every setting not repeated fell back to train.py's defaults: block_size 1024, openwebtext.)"""
    args = ['--eval_interval=12', '--dropout=0.1', '--gradient_accumulation_steps=2']
    train(char_dataset, tmp_path / 'whole', '--max_iters=24', *args)
    train(char_dataset, tmp_path / 'split', '--max_iters=12', *args)
    proc = run('train.py', f'--out_dir={tmp_path / "split"}', '--init_from=resume', '--max_iters=24')
    assert 'Resuming training' in proc.stdout and 'resuming with changed settings: max_iters 12 -> 24' in proc.stdout
    whole, split = final_weights(tmp_path / 'whole'), final_weights(tmp_path / 'split')
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.equal(whole[name], split[name]), name


def test_ddp_two_processes_on_cpu(char_dataset, tmp_path):
    out = tmp_path / 'ddp'
    proc = torchrun(2, 'train.py', f'--dataset={char_dataset}', f'--out_dir={out}', *TINY_TRAIN,
                    '--gradient_accumulation_steps=2', '--max_iters=40', '--eval_interval=20')
    # one process logs and writes checkpoints
    assert proc.stdout.count('iter 40:') == 1 and proc.stdout.count('step 40:') == 1
    assert 'tokens per iteration will be: 512' in proc.stdout  # 2 processes x 1 micro-step x 8 x 32
    losses = val_losses(proc.stdout)
    assert losses[-1] < losses[0] - 0.5, proc.stdout
    model, _, ckpt = load_model(out)
    assert ckpt['iter_num'] == 40


def test_bad_inputs_give_one_line(char_dataset, tmp_path):
    proc = run('train.py', '--dataset=no_such_corpus', *TINY_TRAIN, check=False)
    assert_clean_error(proc, 'no prepared dataset', 'prepare.py')
    proc = train(char_dataset, tmp_path / 'empty', '--init_from=resume', check=False)
    assert_clean_error(proc, 'does not exist', '--out_dir=')
    assert not (tmp_path / 'empty').exists()  # nothing created for a run that cannot start
    (tmp_path / 'empty').mkdir()
    assert_clean_error(train(char_dataset, tmp_path / 'empty', '--init_from=resume', check=False), 'no complete checkpoint')
    proc = train(char_dataset, tmp_path / 'x', '--block_size=4096', check=False)
    assert_clean_error(proc, 'too few for block_size=4096')
    proc = train(char_dataset, tmp_path / 'x', '--init_from=pretrained', check=False)
    assert_clean_error(proc, 'init_from')


def test_choices_in_any_case_and_settings_checked_before_anything_is_written(char_dataset, tmp_path):
    """--activation=ReLU2 is relu2; a model setting that cannot work, or a missing dataset, stops before out_dir
    is created."""
    out = tmp_path / 'relu2'
    train(char_dataset, out, '--max_iters=1', '--eval_interval=1', '--activation=ReLU2', '--optimizer=Muon')
    assert read_checkpoint(out)['model_args']['activation'] == 'relu2' and read_checkpoint(out)['config']['optimizer'] == 'muon'
    for args, fragment in ((['--n_head=3'], 'divisible by n_head=3'), (['--norm=rms'], "did you mean 'rmsnorm'")):
        assert_clean_error(train(char_dataset, tmp_path / 'x', *args, check=False), fragment)
    assert_clean_error(run('train.py', '--dataset=no_such_corpus', f'--out_dir={tmp_path / "x"}', *TINY_TRAIN, check=False),
                       'no prepared dataset')
    assert not (tmp_path / 'x').exists()


def test_resume_refuses_a_dataset_with_another_tokenizer(char_dataset, tmp_path):
    out = tmp_path / 'out'
    train(char_dataset, out, '--max_iters=5', '--eval_interval=5')
    other = tmp_path / 'other'
    shutil.copytree(char_dataset, other)
    meta = json.loads((other / 'meta.json').read_text())
    meta['tokenizer']['chars'] = meta['tokenizer']['chars'][::-1]
    (other / 'meta.json').write_text(json.dumps(meta))
    proc = train(other, out, '--init_from=resume', '--max_iters=10', check=False)
    assert_clean_error(proc, 'another tokenizer')


def test_init_from_a_checkpoint_folder_fine_tunes_its_weights(char_dataset, tmp_path):
    """init_from names another run's checkpoint folder: training starts from its weights (the first evaluation, on
    the same batches, gives the val loss the base run ended with) at iteration 0, in a new out_dir; the base's
    checkpoint is untouched and the refused cases give one line."""
    base, tuned = tmp_path / 'base', tmp_path / 'tuned'
    first = train(char_dataset, base, '--max_iters=10', '--eval_interval=10')
    saved = (base / 'checkpoint.json').read_text()
    proc = train(char_dataset, tuned, f'--init_from={base}', '--max_iters=4', '--eval_interval=4', '--learning_rate=1e-4')
    assert val_losses(proc.stdout)[0] == val_losses(first.stdout)[-1]  # the same weights, batches and arithmetic
    assert read_checkpoint(tuned)['iter_num'] == 4 and (base / 'checkpoint.json').read_text() == saved
    assert_clean_error(train(char_dataset, tmp_path / 'x', f'--init_from={base}', '--block_size=64', check=False),
                       'block_size=64 is larger than', '--block_size=32')
    # a fine-tune that never improves on its first val loss (learning rate 0), saving only improvements, still ends with
    # a checkpoint of its last state, and says which is which (before: none at all, exit code 0)
    still = tmp_path / 'still'
    proc = train(char_dataset, still, f'--init_from={base}', '--max_iters=4', '--eval_interval=2',
                 '--always_save_checkpoint=False', '--learning_rate=0', '--min_lr=0')
    assert len(set(val_losses(proc.stdout))) == 1 and read_checkpoint(still)['iter_num'] == 4
    assert not (still / 'best.json').exists() and 'no evaluation beat the first val loss' in proc.stdout
    assert load_model(still)[2]['iter_num'] == 4  # what sample.py and eval.py read


def test_the_fine_tune_command_prepare_chat_prints_works_as_printed(char_dataset, tmp_path):
    """prepare_chat.py prints the train.py command to run next; run as printed (no settings), the fine-tune takes the
    base run's training settings, not train.py's GPT-2-scale defaults (before: block_size=1024, 491,520 tokens per
    iteration, and 'train.bin holds ... tokens, too few for block_size=1024')."""
    import subprocess
    import sys
    from conftest import ROOT, script_env
    base = tmp_path / 'base'
    train(char_dataset, base, '--max_iters=4', '--eval_interval=4')
    chats = tmp_path / 'chats.jsonl'
    chats.write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': f'Shall I compare thee, {i}?'},
                                                      {'role': 'assistant', 'content': 'Thou art more lovely.'}]}) + '\n'
                             for i in range(20)), encoding='utf-8')
    printed = run('prepare_chat.py', f'--input={chats}', f'--tokenizer_from={base}', f'--out_dir={tmp_path / "chat"}').stdout
    command = printed.strip().splitlines()[-1].split(': ', 1)[1].split()
    assert command[:2] == ['python', 'train.py'], printed
    proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *command[2:]], cwd=tmp_path, env=script_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'tokens per iteration will be: 256' in proc.stdout  # TINY_TRAIN's batch of 8 x 32
    assert "block_size=32" in proc.stdout and (tmp_path / 'out-chat' / 'checkpoint.json').exists()


def test_eval_only_evaluates_a_resumed_checkpoint_without_training(char_dataset, tmp_path):
    out = tmp_path / 'out'
    train(char_dataset, out, '--max_iters=10', '--eval_interval=10')
    before = (out / 'checkpoint.json').read_text()
    proc = train(char_dataset, out, '--init_from=resume', '--eval_only=True', '--max_iters=20')
    [loss] = val_losses(proc.stdout)  # printed to 4 decimals: the same batches give the saved val loss
    assert abs(loss - json.loads(before)['best_val_loss']) < 1e-4 and 'iter 11' not in proc.stdout
    assert (out / 'checkpoint.json').read_text() == before


def test_every_model_field_is_a_training_setting(char_dataset, tmp_path):
    """A field added to GPTConfig is a train.py setting with nothing else to edit (the vocabulary comes from
    the tokenizer), and its value reaches the model: rope_base here."""
    import dataclasses
    from model import GPTConfig
    keys = {line.split()[0][2:] for line in run('train.py', '--help').stdout.splitlines() if line.startswith('  --')}
    missing = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in ('vocab_size', 'real_vocab_size') and f.name not in keys]
    assert not missing, missing
    out = tmp_path / 'out'
    train(char_dataset, out, '--max_iters=2', '--eval_interval=2', '--position=rotary', '--rope_base=500.0')
    model, _, ckpt = load_model(out)
    assert ckpt['model_args']['rope_base'] == model.config.rope_base == 500.0
    from model import rotary_tables
    cos, _ = rotary_tables(16, torch.arange(8), model.config.rope_base)  # head size 16
    torch.testing.assert_close(cos[3, 1], torch.cos(torch.tensor(3 / 500 ** (2 / 16))))


def test_resume_takes_the_optimizer_settings_of_the_command_line(char_dataset, tmp_path):
    """The optimizer's moments come from the checkpoint, its settings from this run, and the log names what
    changed. A learning rate of 1e-30 (far below float32's resolution at these weights' size) must then leave
    every weight exactly as saved; the saved learning rate would move them."""
    out = tmp_path / 'out'
    train(char_dataset, out, '--max_iters=6', '--eval_interval=6')
    saved = final_weights(out)
    proc = train(char_dataset, out, '--init_from=resume', '--max_iters=12', '--eval_interval=6',
                 '--learning_rate=1e-30', '--min_lr=1e-30', '--beta2=0.9')
    assert 'resuming with changed settings: ' in proc.stdout
    changed = proc.stdout.split('resuming with changed settings: ')[1].splitlines()[0]
    assert 'learning_rate 0.003 -> 1e-30' in changed and 'beta2 0.95 -> 0.9' in changed and 'max_iters 6 -> 12' in changed
    resumed = final_weights(out)
    assert read_checkpoint(out)['iter_num'] == 12
    for name in saved:
        assert torch.equal(saved[name], resumed[name]), name


@pytest.mark.parametrize('kind', ['adamw', 'muon'])
def test_optimizer_state_loads_without_its_saved_settings(tmp_path, kind):
    from checkpoint import load_training_state, save_checkpoint
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    old = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', kind, muon_lr=0.02, muon_momentum=0.95)
    model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))[1].backward()
    old.step()
    save_checkpoint(tmp_path, model, old, 1, 0.0, {}, {}, None)
    new = configure_optimizers(model, 0.0, 5e-4, (0.8, 0.99), 'cpu', kind, muon_lr=0.01, muon_momentum=0.9)
    expected = [{k: v for k, v in g.items() if k != 'params'} for g in new.param_groups]
    load_training_state(tmp_path, read_checkpoint(tmp_path), new)
    assert [{k: v for k, v in g.items() if k != 'params'} for g in new.param_groups] == expected
    assert len(old.state) == len(new.state) > 0
    for p, state in old.state.items():  # the moments did come back
        assert state.keys() == new.state[p].keys()
        assert all(torch.equal(torch.as_tensor(state[k]), torch.as_tensor(new.state[p][k])) for k in state)


def test_an_evaluation_does_not_count_in_the_next_step_s_time(char_dataset, tmp_path):
    """tokens/s and MFU come from each iteration's time: the evaluation (with its save and sample) before an
    iteration is not part of it. Here an evaluation of 2 x 300 batches takes far longer than a step."""
    out = tmp_path / 'out'
    proc = train(char_dataset, out, '--max_iters=8', '--eval_interval=5', '--eval_iters=300', '--log_interval=1')
    step_ms = {int(line.split()[1][:-1]): float(line.split('time ')[1].split('ms')[0])
               for line in proc.stdout.splitlines() if line.startswith('iter ')}
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    at = {(r['kind'], r['iter']): r['time'] for r in records}
    evaluation_s = at['eval', 5] - at['step', 5]
    assert evaluation_s > 0.2 and step_ms[6] / 1000 < evaluation_s / 4, (evaluation_s, step_ms)
