"""Fully sharded training (parallel.py, FSDP2) on 2 CPU processes (gloo) against one process training the same
model on the same global batch (tests/fsdp_worker.py). Through train.py, test_distributed checks FSDP against
DDP and resumes from one to the other."""
import re

from conftest import torchrun


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
