"""Fully sharded training (parallel.py, FSDP2) on 2 CPU processes (gloo), piece by piece (tests/fsdp_worker.py):
each figure against what it must equal, with the reason for every tolerance. Through train.py, test_distributed
checks FSDP against DDP and resumes from one to the other."""
import json

from conftest import torchrun


def test_sharded_training_against_one_process_ddp_and_itself():
    out = torchrun(2, 'tests/fsdp_worker.py').stdout
    checks = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    by_name = {}
    for c in checks:
        by_name.setdefault(c['check'], []).append(c)
    assert sorted(by_name) == ['checkpoint', 'ddp', 'init', 'reference', 'sample', 'scaler'], out

    # a model built on the meta device and sharded draws each process's rows of the very numbers one process
    # draws whole: exactly its weights, and the global generator is left as it was
    init, = by_name['init']
    assert init['gap'] == 0.0 and init['global_rng_untouched'] and init['local_rows'] == [32, 16], init

    # float32, FSDP against one process on the same global batch: the same arithmetic but for the order of the
    # sums (the loss and gradient reductions, the clipping norm over shards), which moves losses by a few ulps and
    # the weights by far less than the training moved them (Adam normalises, so a gradient that is rounding noise,
    # e.g. zero in exact arithmetic, can take a different sign: the gaps are measured relative to the whole change)
    for c in by_name['reference']:
        assert c['loss_gap'] < 2e-6 and c['relative_gap'] < 2e-4 and c['state_gap'] < 1e-6, c

    # half precision, FSDP against DDP on the same rows per process: the same numerics. One step's gradients: the
    # last block's are computed first, from identical inputs, and must agree to float32 rounding (reduced in 16
    # bits they would be 2e-4 (float16) to 2e-3 (bfloat16) apart); earlier ones get a residual-stream gradient
    # summed in another order, which half precision may round to the neighbouring value (float16's step is 8x
    # finer than bfloat16's, hence its looser bound). Then a few steps: the runs drift apart only a little (with
    # bfloat16 embeddings and residual stream, as FSDP had before, 2-5% of the training's change)
    for c in by_name['ddp']:
        assert c['last_block_grad_gap'] < 1e-6, c
        assert c['grad_gap'] < (1e-5 if c['dtype'] == 'bfloat16' else 5e-4), c
        assert c['relative_gap'] < 5e-3, c

    # float16: an overflow in one process's shard is skipped by every process, which all halve their scale as DDP
    # does for the same overflow in every replica, and train on alike
    scaler, = by_name['scaler']
    assert scaler['scales'] == [scaler['ddp_scale']] * 2 == [2.0 ** 15] * 2, scaler
    assert scaler['relative_gap'] < 5e-3, scaler

    # the checkpoint written one gathered tensor at a time holds exactly the model's weights, and a resume that
    # reads each process's rows gives back exactly its shards and optimizer state (copies: no arithmetic)
    ckpt, = by_name['checkpoint']
    assert ckpt['file_gap'] == 0.0 and ckpt['shards_equal'] == [True, True] and ckpt['states_equal'] == [True, True], ckpt

    # each process drew from a stream of its own, yet all return the master's text (and none waits forever)
    sample, = by_name['sample']
    assert sample['texts'][0] == sample['texts'][1] and sample['texts'][0][0] != sample['texts'][0][1], sample
