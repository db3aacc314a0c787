"""
What a training run will cost, before it starts (train.py --plan): parameters, FLOPs per token, memory per
process by part, tokens per second measured in a few real steps, time to max_iters, tokens against Chinchilla's
20 per parameter.

The memory model counts, it does not fit: one optimizer step (forward, backward, gradient clipping, the
optimizer's update) runs on the meta device (shapes, no memory, no arithmetic) under a dispatch mode that sees
every tensor each operation creates and keeps a weak reference to its storage, so it knows which storages are
alive after each operation: weights, gradients, optimizer state and the rest (what autograd saves for backward,
the logits and their gradient, the backward's temporaries). The peak is the largest sum over the step. What a
real run adds on top is counted from the model too: DDP's gradient buckets, FSDP's shards (1/N of the weights,
gradients and optimizer state) with the root's parameters gathered whole through forward and backward and two
blocks gathered at a time, 16-bit copies of the weights under autocast. On a CPU the measured peak is the whole
process's resident memory, so the prediction adds the process's baseline (Python, PyTorch, the data): the
resident memory when the plan is made, less the model's tensors it holds then.
"""
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from decoder import BatchDecoder, StaticCache
from model import GPT, GPTConfig
from muon import configure_optimizers
from runtime import DTYPES, free_memory

MiB = 2**20


class LiveStorages(TorchDispatchMode):
    """Every storage the operations under it create, with its bytes and kind, dropped when it is freed; after each
    operation, the bytes alive of each kind ('weights', 'gradients', 'root gradients', 'optimizer', 'other')."""

    def __init__(self):
        super().__init__()
        self.live = {}  # StorageWeakRef -> [bytes, kind]
        self.timeline = []  # {kind: bytes alive} after each operation

    def add(self, tensor, kind):
        key = StorageWeakRef(tensor.untyped_storage())
        if key in self.live:
            self.live[key][1] = kind if kind != 'other' else self.live[key][1]
        else:
            self.live[key] = [tensor.untyped_storage().nbytes(), kind]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t, 'other')
        self.sample()
        return out

    def sample(self):
        for key in [k for k in self.live if k.expired()]:
            del self.live[key]
        alive = {}
        for size, kind in self.live.values():
            alive[kind] = alive.get(kind, 0) + size
        self.timeline.append(alive)


@contextmanager
def device_attention(device_type):
    """Attention on the meta device as the training device computes it. PyTorch picks the kernel by device, and
    on meta it picks the plain one, which keeps the whole (T, T) attention matrix for backward; CUDA's fused
    kernels keep the output and a log-sum-exp per query, as does the CPU's where it applies (no dropout): then the
    CPU's fused kernel, which keeps the same, runs on meta instead. F's function is swapped for the duration (a
    TorchFunctionMode would miss checkpointing's recomputation: autograd runs meta's backward in a thread of its
    own, without the modes of this one)."""
    plain = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        one = torch.empty((1, *q.shape[1:]), dtype=q.dtype)  # what the CPU would choose, asked of one row
        if attn_mask is None and not kwargs and (device_type == 'cuda' or torch._fused_sdp_choice(
                one, one, one, dropout_p=dropout_p, is_causal=is_causal) == 1):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal)[0]
        return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def is_root(name):
    """A parameter of FSDP's root unit (embeddings, final norm, head), not of a transformer block (parallel.shard)."""
    return '.h.' not in name


def simulate_step(config, batch_size, optimizer, activation_checkpointing, device_type='cpu'):
    """One training step of a GPT of config at micro-batch batch_size, on the meta device, with the optimizer's
    state already there (as at every step after the first). Returns (timeline, the index where backward begins,
    {kind: bytes} of weights, optimizer state and gradients, bytes of the root's and of the largest block's
    parameters)."""
    with torch.device('meta'):
        model = GPT(config)
    model.activation_checkpointing = activation_checkpointing
    model.train()
    optim = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer)  # the real optimizer, its real state
    named = dict(model.named_parameters())  # a tied head is one tensor: counted once
    for p in named.values():
        p.grad = torch.zeros_like(p)
    optim.step()  # creates the state
    optim.zero_grad(set_to_none=True)
    tracker = LiveStorages()
    root = {id(p) for name, p in named.items() if is_root(name)}
    for p in named.values():
        tracker.add(p, 'weights')
        p.register_post_accumulate_grad_hook(
            lambda p: tracker.add(p.grad, 'root gradients' if id(p) in root else 'gradients'))
    for state in optim.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                tracker.add(t, 'optimizer')
    idx = torch.zeros(batch_size, config.block_size, dtype=torch.long, device='meta')
    with tracker, device_attention(device_type):  # the attention of backward's recomputation too (checkpointing)
        _, loss = model(idx, idx)
        backward_starts = len(tracker.timeline)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
    grads = sum(p.grad.untyped_storage().nbytes() for p in named.values())
    totals = dict(weights=sum(p.untyped_storage().nbytes() for p in named.values()), gradients=grads,
                  optimizer=sum(t.untyped_storage().nbytes() for s in optim.state.values() for t in s.values()
                                if isinstance(t, torch.Tensor)))
    root_bytes = sum(p.untyped_storage().nbytes() for name, p in named.items() if is_root(name))
    block_bytes = max(sum(p.untyped_storage().nbytes() for p in block.parameters()) for block in model.transformer.h)
    return tracker.timeline, backward_starts, totals, root_bytes, block_bytes


def estimate_memory(model_config, batch_size, block_size=None, optimizer='adamw', dtype='float32', parallel=None,
                    world_size=1, activation_checkpointing=False, baseline=0, device='cpu'):
    """Peak memory of one training process, by part, in bytes. model_config: a GPTConfig (its block_size, unless
    block_size is given); batch_size: the micro-batch; optimizer: 'adamw' or 'muon'; dtype: autocast's ('float32':
    none); parallel: None for one process, 'ddp' or 'fsdp' under torchrun with world_size processes; baseline:
    what the process holds besides the model (on a CPU its resident memory before the model; on CUDA 0); device:
    where the run trains (its attention kernel).

    Returns {'weights', 'gradients', 'optimizer', 'activations' (saved for backward at the end of the forward
    pass, with the loss), 'ddp buckets', 'fsdp gathered' (whole parameters: the root's and two blocks', and the
    gradients of one block before their reduce-scatter), 'autocast copies', 'baseline', 'peak'}: weights, gradients
    and optimizer are this process's (its shards under FSDP); 'peak' is the largest sum over the step, gradients and
    activations being alive together only in part (activations shrink as backward makes gradients)."""
    if block_size is not None:
        model_config = GPTConfig(**{**vars(model_config), 'block_size': block_size})
    timeline, backward_starts, totals, root_bytes, block_bytes = simulate_step(
        model_config, batch_size, optimizer, activation_checkpointing, torch.device(device).type)
    n = world_size if parallel == 'fsdp' else 1
    half = DTYPES[dtype].itemsize if dtype != 'float32' else 0  # autocast computes matmuls in 16 bits

    def alive(point, gradient_share):
        """Bytes alive after an operation, this process's: sharded parts divided by n."""
        return ((point.get('weights', 0) + point.get('optimizer', 0) + point.get('gradients', 0) * gradient_share) / n
                + point.get('root gradients', 0) * (1 if parallel == 'fsdp' else 1 / n) * gradient_share
                + point.get('other', 0))

    during_step = max(alive(point, 1) for point in timeline)
    parts = dict(weights=totals['weights'] / n, gradients=totals['gradients'] / n, optimizer=totals['optimizer'] / n,
                 activations=timeline[backward_starts - 1].get('other', 0))
    # DDP keeps a bucket per group of gradients to all-reduce: a second copy of every gradient, for the whole run
    parts['ddp buckets'] = totals['gradients'] if parallel == 'ddp' else 0
    parts['fsdp gathered'] = 0
    if parallel == 'fsdp':
        # the root unit stays gathered from its forward to the end of backward (FSDP2 does not reshard the root);
        # a block's all-gather output and the parameters copied out of it, or the next block's prefetched, and
        # one block's whole gradients before the reduce-scatter
        block_param = half / 4 * block_bytes if half else block_bytes
        parts['fsdp gathered'] = root_bytes + 2 * block_param + block_bytes
    # autocast caches a 16-bit copy of each matrix it casts for the forward pass; autograd keeps them for backward.
    # Under FSDP the blocks are gathered in 16 bits already: only the root's matrices are cast
    matrices = root_bytes if parallel == 'fsdp' else totals['weights']
    parts['autocast copies'] = matrices * half / 4 if half else 0
    parts['baseline'] = baseline
    parts['peak'] = (baseline + during_step + parts['ddp buckets'] + parts['fsdp gathered']
                     + parts['autocast copies'])
    return parts


def training_peak(model_config, batch_size, **settings):
    """estimate_memory's peak for a model of any depth in constant time: the blocks are alike, so every part grows
    by the same bytes per block, and a deep model's is extrapolated from a one- and a two-block model's (simulating
    200,000 blocks would take minutes). settings: estimate_memory's."""
    depth = model_config.n_layer
    if depth <= 2:
        return estimate_memory(model_config, batch_size, **settings)['peak']
    one, two = (estimate_memory(GPTConfig(**{**vars(model_config), 'n_layer': n}), batch_size, **settings)['peak']
                for n in (1, 2))
    return one + (depth - 1) * (two - one)


def decoding_peak(model_config, rows, prompt_tokens, max_new_tokens, use_cache=True, dtype='float32'):
    """The bytes sampling rows completions of a prompt of prompt_tokens tokens takes besides the weights: the KV cache
    of all rows (decoder.StaticCache, allocated at once), the first forward pass over the prompt of one row (each row's
    prompt runs alone; its activations on the meta device as in estimate_memory) and the rows' logits of a step.
    dtype: autocast's (the cache and activations are in it)."""
    with torch.device('meta'):
        model = GPT(model_config)
    if dtype != 'float32':
        model.to(DTYPES[dtype])
    model.eval()
    tracker = LiveStorages()
    for p in model.parameters():
        tracker.add(p, 'weights')
    max_len = min(model_config.block_size, prompt_tokens + max_new_tokens)
    with tracker:
        decoder = BatchDecoder(model, 1, max_len=max_len, use_cache=use_cache)
        decoder.add([0] * prompt_tokens, max_new_tokens, temperature=0)
        decoder.next_logits()
    prompt_pass = max(point.get('other', 0) for point in tracker.timeline)
    cache = StaticCache.bytes_for(model_config, rows - 1, max_len, DTYPES[dtype]) if use_cache else 0
    logits = 2 * rows * model_config.vocab_size * 4  # the float32 logits of a step and their copy
    return prompt_pass + cache + logits


def refusal(need, device, what):
    """A line refusing what (a run, a request), which needs need bytes more than device has free, or None where it
    fits or the free memory cannot be known."""
    free = free_memory(device)
    if free is None or need <= free:
        return None
    return f'{what} needs about {need / 2**30:,.1f} GiB of memory and {device} has {free / 2**30:,.1f} GiB free'


def resident_bytes():
    """This process's resident memory now (Linux), or None."""
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS:'))
    except (OSError, StopIteration, ValueError):
        return None


def process_baseline(model_config, optimizer, device, held=0):
    """What a training process holds besides its tensors, in bytes: on CUDA 0 (PyTorch's allocator counts tensors
    alone); elsewhere its resident memory less held, the bytes of the tensors it holds now (its model). Measured
    after one training step of a tiny model of the same kind (one layer, 2 channels per head, 16 positions,
    batch 1): a process's first step pages in PyTorch's kernels (~90 MiB of code on a CPU), part of its peak too."""
    if torch.device(device).type == 'cuda':
        return 0
    tiny = GPTConfig(**{**vars(model_config), 'n_layer': 1, 'n_embd': 2 * model_config.n_head, 'block_size': 16,
                        'vocab_size': 64, 'real_vocab_size': 0})
    model = GPT(tiny).to(device)
    optim = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer)
    idx = torch.zeros(1, 16, dtype=torch.long, device=device)
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        _, loss = model(idx, idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
    del model, optim, loss
    resident = resident_bytes()
    return resident - held if resident is not None else 0


def local_bytes(module):
    """Bytes of the parameters this process holds of module (its shards under FSDP)."""
    return sum((p.to_local() if hasattr(p, 'to_local') else p).untyped_storage().nbytes()
               for p in {id(p): p for p in module.parameters()}.values())


def time_steps(model, optim, scaler, ctx, batch_size, block_size, accumulation, device, steps=3):
    """Seconds per optimizer step, the median of steps real ones (after one to warm up) on random tokens (the
    arithmetic does not depend on their values). Changes the weights and the optimizer state: exit after."""
    vocab = model.module.config.vocab_size if hasattr(model, 'module') else model.config.vocab_size
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        for micro_step in range(accumulation):
            last = micro_step == accumulation - 1
            x = torch.randint(vocab, (batch_size, block_size), device=device)
            with nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync():
                with ctx:
                    _, loss = model(x, x)
                scaler.scale(loss / accumulation).backward()
        scaler.step(optim)
        scaler.update()
        optim.zero_grad(set_to_none=True)
        if device.startswith('cuda'):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def duration(seconds):
    return f'{seconds / 3600:.1f} h' if seconds >= 3600 else f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.1f} s'


def show_plan(model, raw_model, optim, scaler, ctx, dtype, settings, accumulation, world_size, iter_num, master, device):
    """Print (the master) what the run train.py has set up will cost. model: as trained (compiled, DDP-wrapped);
    raw_model: the GPT itself; dtype: autocast's ('float32': none); settings: train.py's config; accumulation: this process's micro-steps per
    iteration; world_size: 0 for one process, else torchrun's. Runs a few real steps: exit after it."""
    cfg = raw_model.config
    parallel = settings['parallel'] if world_size else None
    n = max(world_size, 1)
    say = print if master else (lambda *args: None)
    # before the timed steps allocate anything: the process's own memory, besides the model's weights
    baseline = process_baseline(raw_model.config, settings['optimizer'], device, held=local_bytes(raw_model))
    total = sum(p.numel() for p in {id(p): p for p in raw_model.parameters()}.values())
    embeddings = raw_model.transformer.wte.weight.numel() + (cfg.block_size * cfg.n_embd if cfg.position == 'learned' else 0)
    tokens_per_iter = accumulation * n * settings['batch_size'] * settings['block_size']
    say(f"plan: {settings['n_layer']} layers, {settings['n_embd']} wide, context {settings['block_size']}, micro-batch "
        f"{settings['batch_size']} x {accumulation} accumulation x {n} process{'es' if n > 1 else ''} = "
        f"{tokens_per_iter:,} tokens per iteration, {settings['optimizer']}, {dtype}, {device}"
        + (f', {parallel}' if parallel else ''))
    say(f'parameters: {total:,} ({total / 1e6:.2f}M), {total - embeddings:,} without the embeddings'
        + (' (the tied head is the token embedding)' if cfg.tie_weights else ''))
    say(f'training FLOPs per token: {raw_model.flops_per_token():,} ({raw_model.flops_per_token() * tokens_per_iter / 1e12:.3g} '
        f'TFLOP per iteration)')
    common = dict(optimizer=settings['optimizer'], dtype=dtype, parallel=parallel, world_size=n,
                  baseline=baseline, device=device)
    chosen = settings['activation_checkpointing']
    parts = estimate_memory(cfg, settings['batch_size'], activation_checkpointing=chosen, **common)
    other = estimate_memory(cfg, settings['batch_size'], activation_checkpointing=not chosen, **common)
    what = 'allocated by PyTorch' if device.startswith('cuda') else 'resident, the whole process'
    say(f'memory per process, MiB ({what}; {parallel or "one process"}'
        + (f' x {n}' if parallel else '') + ')')
    for key, label in (('weights', 'weights (float32)'), ('gradients', 'gradients'),
                       ('optimizer', 'optimizer state'), ('activations', 'activations saved for backward'),
                       ('ddp buckets', "DDP's gradient buckets"), ('fsdp gathered', "FSDP's gathered parameters"),
                       ('autocast copies', 'autocast 16-bit copies'), ('baseline', 'process baseline')):
        if parts[key] or key in ('weights', 'gradients', 'optimizer', 'activations'):
            say(f'  {label:34} {parts[key] / MiB:10,.1f}')
    say(f'  {"predicted peak":34} {parts["peak"] / MiB:10,.1f}   (activation checkpointing '
        f'{"on" if chosen else "off"}; {"off" if chosen else "on"}: activations {other["activations"] / MiB:,.1f}, '
        f'peak {other["peak"] / MiB:,.1f})')
    seconds = time_steps(model, optim, scaler, ctx, settings['batch_size'], settings['block_size'], accumulation, device)
    remaining = max(settings['max_iters'] - iter_num, 0)
    say(f'measured: {seconds * 1000:,.0f} ms per iteration, {tokens_per_iter / seconds:,.0f} tokens/s; '
        f'{remaining:,} iterations to max_iters={settings["max_iters"]:,}: {duration(remaining * seconds)}')
    seen = tokens_per_iter * settings['max_iters']
    say(f'tokens seen: {seen:,}, {seen / (20 * total):.2f} x Chinchilla\'s 20 per parameter ({20 * total:,})')
