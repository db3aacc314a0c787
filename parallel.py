"""
Training in the processes torchrun starts, on one node or many: how they join, agree and spread one model.

    ddp   DistributedDataParallel: every process holds the whole model, its gradients and the optimizer state,
          and the gradients are averaged (all-reduce) once per optimizer step. The fastest while it all fits.
    fsdp  PyTorch's FSDP2 (fully_shard): every process holds 1/N of each parameter, gradient and optimizer
          state; a block's weights are gathered just before its forward (and again for its backward) and freed
          after, and gradients are reduce-scattered to their owners. Memory per process shrinks about N-fold
          for the training state, for more communication: the way to train a model that one device cannot.

Under FSDP no process ever holds the whole model: it is built on the meta device (shapes, no memory), sharded,
and each process then fills only its own rows, drawn (init_weights) or read from a checkpoint file. Checkpoints
stay one format for both (and for a single process): the master gathers one tensor at a time and writes it, so
a run saved under DDP resumes under FSDP, and back.

Every process must take the same decisions (stop, save, give up) at the same step, or the others wait forever in
the next collective: the small agreements below run on a CPU (gloo) group, so they never wait for a GPU.
"""
import ctypes
import inspect
import os
import secrets
import signal
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model import Norm
from runtime import DTYPES

# torch.distributed.fsdp and torch.distributed.tensor take half a second to import (sympy and more): the functions
# below that need them import them when called, so that only FSDP runs pay, not every start of train.py

PARALLEL = ('ddp', 'fsdp')
SHARED_PROBE = '.shared-folder-probe'


def end_with_agent():
    """Linux: this process gets a SIGTERM when its parent, torchrun's agent, dies. A kill -9 of the agent skips its
    shutdown of the workers, which would train on under PID 1 holding out_dir's lock; with the signal they save and
    stop as on any SIGTERM (train.py), every process at the same step, and the lock ends with them."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class Processes:
    """This process's place among torchrun's (RANK, LOCAL_RANK and WORLD_SIZE from its environment), or a
    single process when torchrun did not start it. Files are written and the log printed by the master (global
    rank 0); a GPU is chosen by the local rank (its index on this node)."""

    def __init__(self, environ=os.environ):
        self.distributed = 'RANK' in environ
        self.rank = int(environ.get('RANK', 0))
        self.local_rank = int(environ.get('LOCAL_RANK', 0))
        self.world_size = int(environ.get('WORLD_SIZE', 1))
        self.master = self.rank == 0
        self.cpu_group = None  # for the agreements: gloo, whatever the backend of the training collectives
        if self.distributed:
            end_with_agent()

    def join(self, backend, timeout_s):
        """Join the process group (torchrun's rendezvous), with collectives that wait up to timeout_s seconds for
        the slowest process (NCCL's own default, 10 minutes, is less than a large checkpoint takes to write)."""
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout)
        self.cpu_group = dist.new_group(backend='gloo', timeout=timeout) if backend != 'gloo' else dist.group.WORLD

    def any(self, flag):
        """Whether flag is true in any process (every process must ask, at the same point)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, group=self.cpu_group)
        return t.item() > 0

    def sum(self, number):
        """number summed over the processes (an integer count, exactly)."""
        if not self.distributed:
            return number
        t = torch.tensor([number], dtype=torch.int64)
        dist.all_reduce(t, group=self.cpu_group)
        return t.item()

    def gather(self, value):
        """value of every process, rank 0 first, in every process."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.cpu_group)
        return values

    def same_as_master(self, tensor):
        """tensor as the master has it, in every process (in place; on the device of the training collectives)."""
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor

    def first_error(self, error):
        """The first error (a message, or None for none) among the processes', the same in all. What one process
        alone finds wrong (a file its node lacks) must stop them all: alone, it would leave the others waiting in
        their next collective until the timeout."""
        return next((e for e in self.gather(error) if e), None)

    def differs(self, value):
        """Whether value (anything picklable) is not the same in every process."""
        values = self.gather(value)
        return any(v != values[0] for v in values)

    def wait_for_master(self, what):
        """Every process waits here until the master has done what (a checkpoint written), instead of waiting in
        whatever collective comes next, whose timeout (NCCL's) may be shorter. Raises RuntimeError."""
        if self.distributed:
            try:
                dist.barrier(group=self.cpu_group)
            except RuntimeError as e:
                why = str(e).splitlines()[0]
                if self.master:  # done, and left alone: the other processes said why they left
                    raise RuntimeError(f'{what} is done, but the other processes stopped waiting for it ({why})') from None
                raise RuntimeError(f'rank {self.rank} gave up waiting for {what} ({why}); if the master was still at '
                                   f'it, a larger --dist_timeout gives it more time') from None

    def check_shared_folder(self, folder):
        """None if this process sees folder as the master does (the master writes a file there, every process
        looks for it), else why not: every process must call it, and agree on the answers (first_error). Several
        nodes share out_dir only through a shared filesystem: with a folder of its own per node, a resume would
        read another run's checkpoint, or none."""
        if not self.distributed:
            return None
        error = None
        path = os.path.join(folder, SHARED_PROBE)
        token = secrets.token_hex(8) if self.master else None
        if self.master:
            try:
                os.makedirs(folder, exist_ok=True)
                with open(path, 'w', encoding='utf-8') as f:
                    f.write(token)
            except OSError as e:
                error = f'cannot write to out_dir {folder}: {e.strerror}; pass a folder you can write to'
        token = self.gather(token)[0]
        if not self.master:
            try:
                with open(path, encoding='utf-8') as f:
                    seen = f.read() == token
            except OSError:
                seen = False
            if not seen:
                error = (f'rank {self.rank} on {socket.gethostname()} does not see out_dir {folder} as rank 0 writes '
                         f'it: every node must reach out_dir (and the dataset) through one shared filesystem, at '
                         f'the same path')
        self.gather(None)  # every process has looked before the master removes the file
        if self.master and os.path.exists(path):
            os.remove(path)
        return error

    def leave(self):
        dist.destroy_process_group()


def replicate(model, device_type, local_rank):
    """DDP. No buffer broadcasts: the model has no buffers that change (rotary tables are computed per forward).
    (PyTorch 2.13 renamed the switch, and warns at the old name.)"""
    name = ('forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters
            else 'broadcast_buffers')
    return DistributedDataParallel(model, device_ids=[local_rank] if device_type == 'cuda' else None, **{name: False})


def shard(model, device, world_size, dtype):
    """FSDP2, in place: each transformer block is one unit (gathered for its own forward and backward), the root
    unit holds the rest (embeddings, the final norm, the head; a tied head is one tensor). A model built on the
    meta device gets storage for this process's shards alone, on device, values unset (fill them with
    init_weights or a checkpoint); one built on the CPU moves there a shard at a time.

    With dtype bfloat16 or float16 the numerics are DDP's under autocast: the blocks' matrices are gathered in
    that dtype (autocast would cast them to it anyway) while the norms (their own small units), the embeddings and
    the head stay float32, and so does the residual stream (no cast of the blocks' inputs); autocast casts at
    each matmul. Master weights, optimizer and gradient reduction stay float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    device_type = torch.device(device).type
    mesh = init_device_mesh(device_type, (world_size,))
    full = MixedPrecisionPolicy()
    half = full if dtype == 'float32' else MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32,
                                                               cast_forward_inputs=False)
    for block in model.transformer.h:
        for norm in [m for m in block.modules() if isinstance(m, Norm)]:
            fully_shard(norm, mesh=mesh, mp_policy=full)
        fully_shard(block, mesh=mesh, mp_policy=half)
    fully_shard(model, mesh=mesh, mp_policy=full)
    if model.lm_head.weight.is_meta:
        model.to_empty(device=device)
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


def gatherer(master):
    """The function a checkpoint save fetches each tensor with: the whole tensor, on the CPU, in the master;
    None elsewhere. Sharded tensors are gathered one at a time (so every process must fetch the same tensors in
    the same order), so no process ever holds more than one whole tensor beside its shards."""
    def fetch(tensor):
        whole = full_tensor(tensor.detach())
        return whole.cpu() if master else None
    return fetch


def local_rows(tensor):
    """(start, stop): the rows of dim 0 this process holds of tensor, a parameter (or a state of the parameter's
    shape) that FSDP shards; None for a tensor held whole. FSDP2 shards dim 0 as torch.chunk does: ceil(n / N)
    rows each, the last processes with fewer or none."""
    if not hasattr(tensor, 'device_mesh'):
        return None
    from torch.distributed.tensor import Shard
    if tensor.device_mesh.ndim != 1 or tensor.placements[0] != Shard(0):
        raise ValueError(f'expected a tensor sharded by rows over one mesh dimension, not {tensor.placements}')
    rows, n = tensor.shape[0], tensor.device_mesh.size()
    chunk = -(-rows // n)
    start = min(tensor.device_mesh.get_local_rank() * chunk, rows)
    return start, min(start + chunk, rows)


def copy_local(param, part):
    """Copy part, this process's rows of param (all of it for a param held whole), into param."""
    (param.to_local() if hasattr(param, 'device_mesh') else param).copy_(part)


def assign(param, value):
    """Store value (the whole tensor, on the CPU) in param: its rows only, when param is a shard."""
    rows = local_rows(param)
    copy_local(param, value if rows is None else value[rows[0]:rows[1]])


def like(param, rows):
    """A tensor sharded as param is, holding rows, this process's part (a loaded optimizer state); rows as they
    are for a param held whole."""
    if not hasattr(param, 'device_mesh'):
        return rows
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(rows.to(param.to_local().device), param.device_mesh, param.placements,
                              run_check=False, shape=param.shape, stride=param.stride())
