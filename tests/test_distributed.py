"""Training in several processes (torchrun on the CPU, gloo backend), checked against what one uninterrupted
run gives: resume restores every process's own batch sampler and random numbers, under DDP or FSDP and from
one to the other, fine-tuning trains every process in train mode, and a resume with another number of
processes says so and stays reproducible."""
import json
import shutil

import torch
from conftest import TINY_TRAIN, run, torchrun
from safetensors.torch import load_file

import bench_memory

# dropout draws from each process's torch generator, so a wrong generator after resume shows in the weights
DDP_TRAIN = [*TINY_TRAIN, '--gradient_accumulation_steps=2', '--dropout=0.1', '--eval_interval=4', '--eval_iters=2']


def weights(out_dir):
    ckpt = json.loads((out_dir / 'checkpoint.json').read_text())
    return ckpt, load_file(out_dir / ckpt['model_file'])


def assert_same_weights(a, b):
    (ckpt_a, wa), (ckpt_b, wb) = weights(a), weights(b)
    assert ckpt_a['iter_num'] == ckpt_b['iter_num'] and wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_ddp_resume_continues_every_process_exactly(char_dataset, tmp_path):
    data = f'--dataset={char_dataset}'
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    torchrun(2, 'train.py', *DDP_TRAIN, data, f'--out_dir={whole}', '--max_iters=8')
    torchrun(2, 'train.py', *DDP_TRAIN, data, f'--out_dir={split}', '--max_iters=4')
    shutil.copytree(split, tmp_path / 'at4')
    torchrun(2, 'train.py', *DDP_TRAIN, data, f'--out_dir={split}', '--max_iters=8', '--init_from=resume')
    assert_same_weights(whole, split)
    # each process has its own batch sampler, saved and restored: they draw different batches
    ranks = json.loads((split / 'checkpoint.json').read_text())['training_state']['ranks']
    assert len(ranks) == 2 and ranks[0]['data_rng'] != ranks[1]['data_rng']

    # FSDP trains as DDP does, bit for bit on a CPU (same batches, same dropout draws), and reports each
    # process's memory; a DDP checkpoint resumes under FSDP and an FSDP one under DDP, both ending where the
    # uninterrupted run ends
    fsdp = tmp_path / 'fsdp'
    proc = torchrun(2, 'train.py', *DDP_TRAIN, data, f'--out_dir={fsdp}', '--max_iters=4', '--parallel=fsdp')
    assert_same_weights(tmp_path / 'at4', fsdp)
    assert len(bench_memory.peaks_per_process(proc.stdout)[0]) == 2, proc.stdout
    shutil.copytree(tmp_path / 'at4', tmp_path / 'ddp_then_fsdp')
    for folder, parallel in ((tmp_path / 'ddp_then_fsdp', 'fsdp'), (fsdp, 'ddp')):
        torchrun(2, 'train.py', *DDP_TRAIN, data, f'--out_dir={folder}', '--max_iters=8', '--init_from=resume',
                 f'--parallel={parallel}')
        assert_same_weights(whole, folder)

    # one process resuming a two-process checkpoint cannot continue both streams: it says so, and re-seeds
    # from (seed, rank, iteration), so two such resumes agree
    for name in ('one_a', 'one_b'):
        shutil.copytree(tmp_path / 'at4', tmp_path / name)
        proc = run('train.py', *DDP_TRAIN, data, f'--out_dir={tmp_path / name}', '--max_iters=8', '--init_from=resume')
        assert proc.stdout.count('written by 2 processes') == 1, proc.stdout
    assert_same_weights(tmp_path / 'one_a', tmp_path / 'one_b')


def save_hf_gpt2(folder, vocab_size):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(folder)


def test_ddp_fine_tune_of_a_hugging_face_folder_trains_every_process(char_dataset, tmp_path):
    """Loaded GPT-2 weights come back in eval mode (ready to sample): with dropout, a process left in it trains
    differently from one that resumes (a resumed model is in train mode), so interrupted and uninterrupted runs
    part ways."""
    folder = tmp_path / 'hf'
    save_hf_gpt2(folder, 64)
    args = [*DDP_TRAIN, f'--dataset={char_dataset}', f'--init_from={folder}']
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    torchrun(2, 'train.py', *args, f'--out_dir={whole}', '--max_iters=8')
    torchrun(2, 'train.py', *args, f'--out_dir={split}', '--max_iters=4')
    torchrun(2, 'train.py', *args[:-1], f'--out_dir={split}', '--max_iters=8', '--init_from=resume')
    assert_same_weights(whole, split)
