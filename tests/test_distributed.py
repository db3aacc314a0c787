"""Training in several processes (torchrun on the CPU, gloo backend), checked against what one uninterrupted run
gives: resume restores every process's own batch sampler and random numbers, under DDP or FSDP and from one to
the other; two nodes train as one; a stop through torchrun saves before torchrun's grace period ends. What only
shows on GPUs or across machines is watched on the CPU in test_distributed_watch.py.

Exact equality only where both sides do the same arithmetic in the same order: the same mode (DDP or FSDP) with
the same number of processes. Across DDP and FSDP the gradient-norm clipping sums the squares shard by shard under
FSDP and tensor by tensor under DDP: the norms differ in the last bit, and so do the weights of every step whose
norm is above grad_clip."""
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import torch
from conftest import DDP_TRAIN, ROOT, TINY_TRAIN, run, script_env, torchrun
from safetensors.torch import load_file

import bench_memory

def weights(out_dir):
    ckpt = json.loads((out_dir / 'checkpoint.json').read_text())
    return ckpt, load_file(out_dir / ckpt['model_file'])


def assert_same_weights(a, b, exact=True):
    """exact: the same arithmetic on both sides; else DDP against FSDP: float32 sums in another order (the clipping
    norm), a few ulps a step, which Adam's normalised steps can turn into up to ~1e-6 over a few steps."""
    (ckpt_a, wa), (ckpt_b, wb) = weights(a), weights(b)
    assert ckpt_a['iter_num'] == ckpt_b['iter_num'] and wa.keys() == wb.keys()
    for key in wa:
        if exact:
            assert torch.equal(wa[key], wb[key]), key
        else:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=2e-6, msg=key)


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

    # FSDP trains as DDP does (same batches, same dropout draws; sums in another order) and reports each process's
    # memory by phase; a DDP checkpoint resumes under FSDP and an FSDP one under DDP, both ending where the
    # uninterrupted run ends, and an FSDP run resumed under FSDP ends exactly where FSDP's whole run does
    fsdp, fsdp_whole = tmp_path / 'fsdp', tmp_path / 'fsdp_whole'
    proc = torchrun(2, 'train.py', *DDP_TRAIN, data, f'--out_dir={fsdp}', '--max_iters=4', '--parallel=fsdp')
    assert_same_weights(tmp_path / 'at4', fsdp, exact=False)
    assert len(bench_memory.peaks_per_process(proc.stdout)[0]) == 2, proc.stdout
    assert re.search(r'^peak memory by phase, MiB per process: start [\d,]+, [\d,]+; training [\d,]+, [\d,]+; '
                     r'save [\d,]+, [\d,]+$', proc.stdout, re.M), proc.stdout
    shutil.copytree(fsdp, tmp_path / 'fsdp_then_fsdp')
    shutil.copytree(tmp_path / 'at4', tmp_path / 'ddp_then_fsdp')
    for folder, parallel in ((tmp_path / 'ddp_then_fsdp', 'fsdp'), (fsdp, 'ddp'), (tmp_path / 'fsdp_then_fsdp', 'fsdp')):
        torchrun(2, 'train.py', *DDP_TRAIN, data, f'--out_dir={folder}', '--max_iters=8', '--init_from=resume',
                 f'--parallel={parallel}')
        assert_same_weights(whole, folder, exact=False)
    torchrun(2, 'train.py', *DDP_TRAIN, data, f'--out_dir={fsdp_whole}', '--max_iters=8', '--parallel=fsdp')
    assert_same_weights(fsdp_whole, tmp_path / 'fsdp_then_fsdp')

    # one process resuming a two-process checkpoint cannot continue both streams: it says so, and re-seeds
    # from (seed, rank, iteration), so two such resumes agree
    for name in ('one_a', 'one_b'):
        shutil.copytree(tmp_path / 'at4', tmp_path / name)
        proc = run('train.py', *DDP_TRAIN, data, f'--out_dir={tmp_path / name}', '--max_iters=8', '--init_from=resume')
        assert proc.stdout.count('written by 2 processes') == 1, proc.stdout
    assert_same_weights(tmp_path / 'one_a', tmp_path / 'one_b')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def two_nodes(out_dirs, args):
    """Two torchrun launches of one process each, as two nodes would run them (node ranks 0 and 1, rank 0's node
    as the rendezvous), here on one machine; each node with its own out_dir. Returns both CompletedProcesses."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
                               f'--node_rank={node}', '--master_addr=127.0.0.1', f'--master_port={port}', 'train.py',
                               *args, f'--out_dir={out_dir}'], cwd=ROOT, env=script_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for node, out_dir in enumerate(out_dirs)]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


def test_two_nodes_train_and_resume_as_one_and_need_a_shared_out_dir(char_dataset, tmp_path):
    args = [*DDP_TRAIN, f'--dataset={char_dataset}']
    torchrun(2, 'train.py', *args, f'--out_dir={tmp_path / "standalone"}', '--max_iters=8')
    shared = tmp_path / 'shared'
    for more in (['--max_iters=4'], ['--max_iters=8', '--init_from=resume']):
        nodes = two_nodes([shared, shared], [*args, *more])
        assert all(p.returncode == 0 for p in nodes), [p.stderr[-3000:] for p in nodes]
    assert 'Resuming training' in nodes[0].stdout
    assert_same_weights(tmp_path / 'standalone', shared)  # two processes in both: the same arithmetic

    # an out_dir that is not shared is named at once, by rank 0, in one line, before anything is read or written
    nodes = two_nodes([tmp_path / 'node0', tmp_path / 'node1'], [*args, '--max_iters=4'])
    assert all(p.returncode != 0 for p in nodes)
    ours = [line for line in nodes[0].stderr.splitlines() if 'out_dir' in line]
    assert len(ours) == 1 and 'does not see out_dir' in ours[0] and 'shared filesystem' in ours[0], nodes[0].stderr
    assert not any(re.search(r'\[rank\d\]: Traceback', p.stderr) for p in nodes), [p.stderr for p in nodes]
    assert not (tmp_path / 'node0' / 'checkpoint.json').exists()


def test_a_slow_step_stopped_through_torchrun_saves_before_its_grace_period_ends(char_dataset, tmp_path):
    """torchrun relays SIGTERM (or Ctrl-C) to every process and kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
    later (30 by default, set to 1 here); a step takes ~3 s here. Each process checks the stop after every
    micro-step, all agree, and the last whole step is saved at once: a resume ends where an uninterrupted run
    does."""
    args = [*TINY_TRAIN, '--gradient_accumulation_steps=600', '--dropout=0.1', '--eval_interval=100', '--eval_iters=2',
            f'--dataset={char_dataset}']
    stopped, whole = tmp_path / 'stopped', tmp_path / 'whole'
    env = script_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT='1')
    agent = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                              'train.py', *args, f'--out_dir={stopped}', '--max_iters=2'], cwd=ROOT, env=env,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in agent.stdout:
        if line.startswith('iter 1:'):
            break
    time.sleep(0.5)  # into the second step
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=120)
    assert 'stopped by SIGTERM at iteration 1, checkpoint saved' in stderr, stderr[-3000:]
    assert json.loads((stopped / 'checkpoint.json').read_text())['iter_num'] == 1
    torchrun(2, 'train.py', *args, f'--out_dir={stopped}', '--max_iters=2', '--init_from=resume')
    torchrun(2, 'train.py', *args, f'--out_dir={whole}', '--max_iters=2')
    assert_same_weights(whole, stopped)


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
