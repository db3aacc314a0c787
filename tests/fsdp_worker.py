"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): the pieces of parallel.py that train.py uses for
FSDP, each against what it must equal, printing one JSON line per check (rank 0) for the test to judge.

    init        a model built on the meta device, sharded and filled by init_weights, against one process's model
    reference   FSDP against one process training the same model on the same global batch (float32)
    ddp         FSDP against DDP on the same per-process batches, in bfloat16 and float16: the same numerics
    scaler      float16: an overflow in one process's shard only, which every process must skip
    checkpoint  a save gathered one tensor at a time, and a resume reading each process's rows
    sample      decoding under FSDP with a different random stream per process, all following the master's tokens
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import checkpoint_model, load_training_state, load_weights, read_checkpoint, save_checkpoint  # noqa: E402
from generate import generate_text  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from muon import configure_optimizers  # noqa: E402
from parallel import Processes, assign, full_tensor, gatherer, grad_scaler, replicate, shard  # noqa: E402
from runtime import autocast  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402

STEPS = 4


def config(**changes):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, real_vocab_size=60,
                                dropout=0.0, bias=False), **changes})


def batches(rows, world):
    """STEPS global batches of rows * world windows of 16 tokens, the same in every process."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        b = torch.randint(0, 60, (rows * world, 17), generator=g)
        out.append((b[:, :-1].contiguous(), b[:, 1:].contiguous()))
    return out


def my_rows(batch, rank, world):
    x, y = batch
    n = len(x) // world
    return x[rank * n:(rank + 1) * n].contiguous(), y[rank * n:(rank + 1) * n].contiguous()


def train(model, optimizer, batches, dtype, scaler, corrupt=None):
    """STEPS optimizer steps, as train.py takes them; corrupt(step) may spoil gradients after the backward pass.
    Returns each step's loss (this process's)."""
    losses = []
    for step, (x, y) in enumerate(batches):
        with autocast('cpu', dtype):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        if corrupt:
            corrupt(step)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def sharded(cfg, processes, dtype, seed=0):
    """A model as train.py builds a new one under FSDP: on the meta device, sharded, each process drawing its rows."""
    with torch.device('meta'):
        model = GPT(cfg)
    shard(model, 'cpu', processes.world_size, dtype)
    model.init_weights(torch.Generator().manual_seed(seed), assign)
    return model


def one_process(cfg, seed=0):
    model = GPT(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def whole(model):
    """The full weights of a sharded or whole model, by name (every process must call it)."""
    return {name: full_tensor(t).detach().clone() for name, t in model.state_dict().items()}


def gap(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def relative_gap(a, b, start):
    """How far apart two trainings ended, relative to how far they moved: |a - b| / |b - start|, all weights."""
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a) ** 0.5
    den = sum(((b[k].float() - start[k].float()) ** 2).sum() for k in a) ** 0.5
    return (num / den).item()


def report(processes, **figures):
    if processes.master:
        print(json.dumps(figures), flush=True)


def check_init(processes):
    cfg = config()
    rng_before = torch.get_rng_state()
    model = sharded(cfg, processes, 'float32', seed=7)
    untouched = torch.equal(rng_before, torch.get_rng_state())
    reference = one_process(cfg, seed=7)
    report(processes, check='init', gap=gap(whole(model), reference.state_dict()), global_rng_untouched=untouched,
           local_rows=[p.to_local().shape[0] for p in model.parameters()][:2])


def check_reference(processes):
    """FSDP against one process training the whole global batch: the same arithmetic up to the order of sums."""
    world, rank = processes.world_size, processes.rank
    for kind, checkpointing in (('adamw', False), ('muon', True)):
        cfg = config(tie_weights=kind == 'adamw')
        model = sharded(cfg, processes, 'float32')
        model.activation_checkpointing = checkpointing
        reference = one_process(cfg)
        data = batches(8, world)
        optimizer = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cpu', kind)
        losses = train(model, optimizer, [my_rows(b, rank, world) for b in data], 'float32',
                       grad_scaler('cpu', False, True))
        losses = [sum(processes.gather(v)) / world for v in losses]  # each process's loss is over its share
        weights = whole(model)
        state = {pid: {k: full_tensor(v) for k, v in s.items()} for pid, s in optimizer.state_dict()['state'].items()}
        start = one_process(cfg).state_dict()
        ref_optimizer = configure_optimizers(reference, 0.1, 3e-3, (0.9, 0.95), 'cpu', kind)
        ref_losses = train(reference, ref_optimizer, data, 'float32', grad_scaler('cpu', False, False))
        ref_state = ref_optimizer.state_dict()['state']
        state_gap = max((state[pid][k] - v).abs().max().item()
                        for pid, s in ref_state.items() for k, v in s.items() if torch.is_tensor(v) and v.ndim)
        report(processes, check='reference', optimizer=kind, checkpointing=checkpointing,
               loss_gap=max(abs(a - b) for a, b in zip(losses, ref_losses)),
               relative_gap=relative_gap(weights, reference.state_dict(), start), state_gap=state_gap)


def check_ddp(processes):
    """FSDP against DDP, each process on its own rows of every batch, in bfloat16 and float16: both must compute
    alike (autocast's casts, a float32 residual stream and head, gradients reduced in float32). The gradients of
    one step are compared, then the weights after a few: a master weight one float32 ulp apart can round to
    another bfloat16 value, so the runs drift apart a little as they go."""
    world, rank = processes.world_size, processes.rank
    for dtype in ('bfloat16', 'float16'):
        cfg = config(norm='rmsnorm', qk_norm=True)
        model = sharded(cfg, processes, dtype)
        start = whole(model)
        ddp = replicate(one_process(cfg), 'cpu', 0)
        data = [my_rows(b, rank, world) for b in batches(4, world)]
        grads = []
        for m in (model, ddp):
            scaler = grad_scaler('cpu', dtype == 'float16', m is model)
            optimizer = configure_optimizers(m.module if m is ddp else m, 0.1, 3e-3, (0.9, 0.95), 'cpu')
            with autocast('cpu', dtype):
                _, loss = m(*data[0])
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grads.append({name: full_tensor(p.grad) for name, p in (m.module if m is ddp else m).named_parameters()})
            optimizer.zero_grad(set_to_none=True)
        rel = {k: ((grads[0][k] - grads[1][k]).norm() / grads[1][k].norm()).item() for k in grads[1]}
        last = f'transformer.h.{cfg.n_layer - 1}.'  # its gradients are computed first: nothing before them differs
        losses = train(model, configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cpu'), data, dtype,
                       grad_scaler('cpu', dtype == 'float16', True))
        ddp_losses = train(ddp, configure_optimizers(ddp.module, 0.1, 3e-3, (0.9, 0.95), 'cpu'), data, dtype,
                           grad_scaler('cpu', dtype == 'float16', False))
        weights, ddp_weights = whole(model), ddp.module.state_dict()
        report(processes, check='ddp', dtype=dtype, grad_gap=max(rel.values()),
               last_block_grad_gap=max(v for k, v in rel.items() if k.startswith(last)),
               loss_gap=max(abs(a - b) for a, b in zip(losses, ddp_losses)),
               relative_gap=relative_gap(weights, ddp_weights, start))


def check_scaler(processes):
    """float16's loss scaler when an overflow lands in one process's shard only (FSDP) or, for DDP, in the same
    rows of every replica: every process must skip that step and halve its scale, as DDP does."""
    world, rank = processes.world_size, processes.rank
    cfg = config()
    model = sharded(cfg, processes, 'float16')
    start = whole(model)
    ddp = replicate(one_process(cfg), 'cpu', 0)
    data = [my_rows(b, rank, world) for b in batches(4, world)]
    victim = model.transformer.h[0].attn.c_attn.weight  # rank 1 holds its last rows
    rows = victim.shape[0] - 1

    def spoil_shard(step):
        if step == 1 and rank == world - 1:
            victim.grad.to_local()[-1, 0] = float('inf')

    def spoil_replica(step):
        if step == 1:
            ddp.module.transformer.h[0].attn.c_attn.weight.grad[rows, 0] = float('inf')

    scaler, ddp_scaler = grad_scaler('cpu', True, True), grad_scaler('cpu', True, False)
    train(model, configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cpu'), data, 'float16', scaler, spoil_shard)
    train(ddp, configure_optimizers(ddp.module, 0.1, 3e-3, (0.9, 0.95), 'cpu'), data, 'float16', ddp_scaler, spoil_replica)
    report(processes, check='scaler', scales=processes.gather(scaler.get_scale()), ddp_scale=ddp_scaler.get_scale(),
           relative_gap=relative_gap(whole(model), ddp.module.state_dict(), start))


def check_checkpoint(processes):
    """Save under FSDP (the master gathers one tensor at a time) and resume under FSDP (each process reads its
    rows): the file holds the full weights and optimizer state, and the resumed shards are the saved ones."""
    world, rank = processes.world_size, processes.rank
    cfg = config(tie_weights=False)
    model = sharded(cfg, processes, 'float32')
    optimizer = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cpu', 'muon')
    train(model, optimizer, [my_rows(b, rank, world) for b in batches(4, world)], 'float32', grad_scaler('cpu', False, True))
    folder = processes.gather(tempfile.mkdtemp() if processes.master else None)[0]
    model_args = dict(cfg.__dict__)
    save_checkpoint(folder, model, optimizer, STEPS, 0.0, model_args, {}, None, fetch=gatherer(processes.master),
                    write=processes.master)
    processes.wait_for_master('the checkpoint')
    weights = whole(model)
    ckpt = read_checkpoint(folder)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(folder, ckpt['model_file']))
    file_gap = gap(saved, weights) if set(saved) == set(weights) else float('inf')

    resumed = checkpoint_model(folder, ckpt)
    shard(resumed, 'cpu', world, 'float32')
    load_weights(folder, ckpt, resumed)
    resumed_optimizer = configure_optimizers(resumed, 0.1, 3e-3, (0.9, 0.95), 'cpu', 'muon')
    load_training_state(folder, ckpt, resumed_optimizer)
    shards_equal = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), resumed.parameters()))
    resumed_state = resumed_optimizer.state_dict()['state']
    states_equal = all([torch.equal(torch.as_tensor(full_tensor(v)), torch.as_tensor(full_tensor(resumed_state[pid][k])))
                        for pid, s in optimizer.state_dict()['state'].items() for k, v in s.items()])  # every gather
    report(processes, check='checkpoint', file_gap=file_gap, shards_equal=processes.gather(shards_equal),
           states_equal=processes.gather(states_equal))


def check_sample(processes):
    """Every forward pass under FSDP is a collective: processes that drew different tokens would run different
    numbers of steps and wait on each other forever. With the master's tokens they all return its text."""
    cfg = config(real_vocab_size=0)
    model = sharded(cfg, processes, 'float32').eval()
    tokenizer = CharTokenizer(''.join(chr(65 + i) for i in range(64)))
    tokenizer.eot_id = 63  # a sample ends there, after a different number of steps in each process unless agreed
    texts = []
    for seed in (processes.rank, 10 + processes.rank):  # a stream of its own in each process
        texts.append(generate_text(model, tokenizer, [0, 1, 2], max_new_tokens=40, temperature=1.0,
                                   generator=torch.Generator().manual_seed(seed), sync=processes.same_as_master)[0])
    report(processes, check='sample', texts=processes.gather(texts))


def main():
    processes = Processes()
    processes.join('gloo', 120)
    for check in (check_init, check_reference, check_ddp, check_scaler, check_checkpoint, check_sample):
        check(processes)
    processes.leave()


if __name__ == '__main__':
    main()
