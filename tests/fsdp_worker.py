"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): trains the same model on the same global batch
sharded with parallel.shard and, in rank 0, unsharded in one process, and prints how far apart they end."""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, GPTConfig  # noqa: E402
from muon import configure_optimizers  # noqa: E402
from parallel import full_state, grad_scaler, shard  # noqa: E402
from runtime import autocast  # noqa: E402


def train(model, optimizer, batches, dtype, scaler):
    losses = []
    for x, y in batches:
        with autocast('cpu', dtype):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    losses = torch.stack(losses)
    if dist.is_initialized() and isinstance(next(model.parameters()), torch.distributed.tensor.DTensor):
        dist.all_reduce(losses)  # each process's loss is over its half of the batch: the mean of the two
        losses /= dist.get_world_size()
    return losses


def main():
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    for optimizer_kind, dtype, checkpointing in (('adamw', 'float32', False), ('muon', 'float32', True),
                                                 ('adamw', 'bfloat16', False), ('adamw', 'float16', False)):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, real_vocab_size=60,
                           tie_weights=optimizer_kind == 'adamw', dropout=0.0)
        model = GPT(config)
        reference = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 60, (2, 8 * world, 17), generator=g) for _ in range(4)]
        batches = [(b[:, :, :-1].reshape(-1, 16).contiguous(), b[:, :, 1:].reshape(-1, 16).contiguous()) for b in batches]

        model.activation_checkpointing = checkpointing
        shard(model, 'cpu', world, dtype)
        optimizer = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cpu', optimizer_kind)
        rows = slice(rank * len(batches[0][0]) // world, (rank + 1) * len(batches[0][0]) // world)
        sharded_losses = train(model, optimizer, [(x[rows].contiguous(), y[rows].contiguous()) for x, y in batches], dtype,
                               grad_scaler('cpu', dtype == 'float16', True))
        weights, optimizer_state = full_state(model, optimizer, keep=rank == 0)
        if rank == 0:
            ref_optimizer = configure_optimizers(reference, 0.1, 3e-3, (0.9, 0.95), 'cpu', optimizer_kind)
            ref_losses = train(reference, ref_optimizer, batches, dtype, grad_scaler('cpu', dtype == 'float16', False))
            ref_state = ref_optimizer.state_dict()['state']
            weight_gap = max((weights[k] - v).abs().max().item() for k, v in reference.state_dict().items())
            state_gap = max((optimizer_state['state'][pid][name] - v).abs().max().item()
                            for pid, s in ref_state.items() for name, v in s.items() if torch.is_tensor(v) and v.ndim)
            print(f'{optimizer_kind} {dtype} checkpointing={checkpointing}: '
                  f'losses {" ".join(f"{v:.6f}" for v in sharded_losses.tolist())} | '
                  f'{" ".join(f"{v:.6f}" for v in ref_losses.tolist())} | '
                  f'max weight gap {weight_gap:.3g} | max optimizer state gap {state_gap:.3g}', flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
