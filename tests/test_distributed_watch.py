"""What only shows on GPUs or across machines, watched on the CPU in two gloo processes: tests/spy.py runs train.py
and reports the calls it makes (which seed each generator gets, the process group's timeout, each batch moved to
a device), and TORCH_LOGS=recompiles reports every recompilation."""
import json
import re

import pytest
from conftest import DDP_TRAIN, torchrun


def spied(log, rank):
    """The calls tests/spy.py saw in one process: [(name, argument)]."""
    return re.findall(rf'^spy {rank}: (\w+)\((.*)\)$', log, re.M)


def test_every_process_keeps_its_own_random_stream(char_dataset, tmp_path):
    """Each process seeds its generators once, with seed + rank, for its dropout; building the model and drawing the
    training-time sample use generators of their own. torch.manual_seed(seed) there would reseed every CUDA (and
    MPS) generator, giving every GPU the same dropout masks: the spy sees each seeding call."""
    proc = torchrun(2, 'tests/spy.py', 'train.py', *DDP_TRAIN, f'--dataset={char_dataset}', f'--out_dir={tmp_path}',
                    '--max_iters=4', '--sample_interval=4', '--seed=1000')
    assert 'sample at step 4:' in proc.stdout
    for rank in (0, 1):
        seeds = [(name, arg) for name, arg in spied(proc.stderr, rank) if name.startswith('manual_seed')]
        assert seeds == [('manual_seed_all', str(1000 + rank)), ('manual_seed', str(1000 + rank))], (rank, seeds)


def test_the_processes_wait_for_a_save_as_long_as_dist_timeout_allows(char_dataset, tmp_path):
    """NCCL gives up on a collective after 10 minutes by default, less than writing a large checkpoint can take:
    dist_timeout (default an hour) goes to the process groups, and the other processes wait for the master's
    save explicitly, within it. A save slower than dist_timeout ends the run with one line naming it."""
    args = [*DDP_TRAIN, f'--dataset={char_dataset}', '--max_iters=4']
    proc = torchrun(2, 'tests/spy.py', 'train.py', *args, f'--out_dir={tmp_path / "default"}')
    for rank in (0, 1):
        assert ('init_process_group', '3600.0') in spied(proc.stderr, rank), proc.stderr
    slow = dict(SPY_SAVE_DELAY='4')
    proc = torchrun(2, 'tests/spy.py', 'train.py', *args, f'--out_dir={tmp_path / "patient"}', '--dist_timeout=30',
                    env=slow)
    assert json.loads((tmp_path / 'patient' / 'checkpoint.json').read_text())['iter_num'] == 4
    proc = torchrun(2, 'tests/spy.py', 'train.py', *args, f'--out_dir={tmp_path / "hasty"}', '--dist_timeout=1',
                    env=slow, check=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if 'dist_timeout' in line and not line.startswith('spy')]
    assert len(ours) == 1 and 'rank 1 gave up waiting for the checkpoint of iteration 4' in ours[0], proc.stderr[-3000:]


def test_evaluation_moves_to_each_device_only_the_batches_it_scores(char_dataset, tmp_path):
    """Both processes draw the same evaluation batches and each scores every other one: 2 splits x 4 batches is
    4 batches each to move to its device (to a GPU, pinned copies), not 8."""
    proc = torchrun(2, 'tests/spy.py', 'train.py', *DDP_TRAIN, f'--dataset={char_dataset}', f'--out_dir={tmp_path}',
                    '--eval_iters=4', '--eval_only=True')
    for rank in (0, 1):
        assert [name for name, _ in spied(proc.stderr, rank)].count('batch_to_device') == 4, proc.stderr


@pytest.mark.slow
def test_a_sample_under_compiled_fsdp_compiles_nothing(char_dataset, tmp_path):
    """Under FSDP each block is compiled in place; a sample's growing shapes would recompile them at every token up
    to dynamo's limit (a minute for one sample here). Sampled eagerly, a run with samples compiles what a run
    without them does (TORCH_LOGS=recompiles prints every recompilation)."""
    args = [*DDP_TRAIN, f'--dataset={char_dataset}', '--max_iters=2', '--eval_interval=2', '--parallel=fsdp',
            '--compile=True']
    counts = []
    for name, more in (('plain', []), ('sampled', ['--sample_interval=2'])):
        proc = torchrun(2, 'train.py', *args, f'--out_dir={tmp_path / name}', *more, env=dict(TORCH_LOGS='recompiles'))
        counts.append(proc.stderr.count('Recompiling function'))
    assert 'sample at step 2:' in proc.stdout
    assert counts[0] == counts[1], counts
