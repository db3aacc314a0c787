"""
How train.py spreads one model over the processes torchrun starts:

    ddp   DistributedDataParallel: every process holds the whole model, its gradients and the optimizer state,
          and the gradients are averaged (all-reduce) once per optimizer step. The fastest while it all fits.
    fsdp  PyTorch's FSDP2 (fully_shard): every process holds 1/N of each parameter, gradient and optimizer
          state; a block's weights are gathered just before its forward (and again for its backward) and freed
          after, and gradients are reduce-scattered to their owners. Memory per process shrinks about N-fold
          for the training state, for more communication: the way to train a model that one device cannot.

Checkpoints stay one format for both (and for a single process): the full weights and optimizer state are
gathered, tensor by tensor, into the CPU memory of rank 0, which writes them; a resume loads the full state in
every process and shards it again. So a run saved under DDP resumes under FSDP, and back.
"""
import torch
from torch.nn.parallel import DistributedDataParallel

from runtime import DTYPES

# torch.distributed.fsdp and torch.distributed.tensor take half a second to import (sympy and more): the functions
# below that need them import them when called, so that only FSDP runs pay, not every start of train.py

PARALLEL = ('ddp', 'fsdp')


def replicate(model, device_type, local_rank):
    """DDP. No buffer broadcasts: the only buffers (rotary tables) are constants, so broadcasting them before every
    forward would only cost time."""
    return DistributedDataParallel(model, device_ids=[local_rank] if device_type == 'cuda' else None,
                                   broadcast_buffers=False)


def shard(model, device_type, world_size, dtype):
    """FSDP2, in place: each transformer block is one unit (gathered for its own forward and backward), the
    root unit holds the rest (embeddings, the final norm, the head; a tied head is one tensor). A model built
    on the CPU moves to the device a shard at a time. With dtype bfloat16 or float16 the blocks compute in
    it while the sharded master weights, the optimizer and the gradient reduction stay in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device_type, (world_size,))
    if dtype == 'float32':
        policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def grad_scaler(device_type, enabled, sharded):
    """float16's loss scaler. Sharded, each process sees only its shards' gradients, so whether any is inf
    must be agreed by all (ShardedGradScaler all-reduces it), or some shards would step and others skip."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device_type, enabled=enabled)
    return torch.amp.GradScaler(device_type, enabled=enabled)


def full_tensor(tensor):
    """A sharded tensor gathered from every process (a collective: all must call it, in the same order);
    any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, 'full_tensor') else tensor  # a DTensor


def _gathered(tensor, keep):
    tensor = full_tensor(tensor)
    return tensor.detach().cpu() if keep else None  # the other processes drop it at once


def full_state(model, optimizer, keep):
    """The model's weights and optimizer.state_dict() with every shard gathered, one tensor at a time into the
    CPU memory of the process where keep is true (the master); None elsewhere. Every process must call it."""
    weights = {name: _gathered(t, keep) for name, t in model.state_dict().items()}
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state['state'] = {pid: {name: _gathered(value, keep) if torch.is_tensor(value) else value
                            for name, value in param_state.items()}
                      for pid, param_state in state['state'].items()}
    return (weights, state) if keep else (None, None)


def shard_optimizer_state(optimizer, state):
    """A saved (full) optimizer state_dict turned into this process's shards of it, for load_state_dict of an
    optimizer over sharded parameters: each tensor the shape of its parameter is cut the way the parameter is."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for group in optimizer.param_groups for p in group['params']]
    for pid, param_state in state['state'].items():
        p = params[pid]
        for name, value in param_state.items():
            if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                param_state[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                                      src_data_rank=None)  # every process has it all: no scatter
    return state
