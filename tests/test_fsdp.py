"""Fully sharded training (parallel.py, FSDP2) on 2 CPU processes (gloo), against references: one process training
the same model on the same global batch (tests/fsdp_worker.py), and DDP through train.py, whose checkpoints FSDP
resumes and which resumes FSDP's."""
import re
import shutil

from conftest import torchrun
from test_distributed import DDP_TRAIN, assert_same_weights


def test_sharded_training_follows_one_process_on_the_same_batch():
    out = torchrun(2, 'tests/fsdp_worker.py').stdout
    runs = dict(re.findall(r'^(\w+ \w+ checkpointing=\w+): (.*)$', out, re.M))
    assert len(runs) == 4, out
    for name, line in runs.items():
        sharded, single, weights, state = line.removeprefix('losses ').split(' | ')
        gaps = [abs(float(a) - float(b)) for a, b in zip(sharded.split(), single.split())]
        weight_gap, state_gap = float(weights.split()[-1]), float(state.split()[-1])
        if 'float32' in name:  # the same arithmetic up to the order of sums: Muon gathers each matrix whole
            assert max(gaps) < 1e-5 and weight_gap < 1e-5 and state_gap < 1e-6, (name, line)
        else:  # FSDP computes in bf16/fp16 from half-precision copies of the weights, autocast from float32 ones
            assert max(gaps) < 1e-3, (name, line)


def test_fsdp_trains_as_ddp_and_their_checkpoints_resume_each_other(char_dataset, tmp_path):
    """Same processes, same batches, same dropout draws: FSDP must give DDP's weights, bit for bit on a CPU; and a
    checkpoint of either resumes under the other, both ending alike (test_distributed shows that DDP's resume ends
    where an uninterrupted run does)."""
    args = [*DDP_TRAIN, f'--dataset={char_dataset}', '--optimizer=muon']  # Muon, and AdamW for the rest
    for parallel in ('ddp', 'fsdp'):
        torchrun(2, 'train.py', *args, f'--out_dir={tmp_path / parallel}', '--max_iters=4', f'--parallel={parallel}')
    assert_same_weights(tmp_path / 'ddp', tmp_path / 'fsdp')
    for start, then in (('ddp', 'fsdp'), ('fsdp', 'ddp')):
        shutil.copytree(tmp_path / start, tmp_path / f'{start}_{then}')
        torchrun(2, 'train.py', *args, f'--out_dir={tmp_path / f"{start}_{then}"}', '--max_iters=8',
                 '--init_from=resume', f'--parallel={then}')
    assert_same_weights(tmp_path / 'ddp_fsdp', tmp_path / 'fsdp_ddp')
