"""
Train a GPT on a prepared dataset. One process on a CPU, a GPU or Apple silicon:

    python train.py config/shakespeare_char.py --batch_size=32

Distributed data parallel on 4 GPUs of one node, or on 2 nodes of 8 GPUs each:

    torchrun --standalone --nproc_per_node=4 train.py config/x.py
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 train.py config/x.py
    (and --node_rank=1 on the second node; add NCCL_IB_DISABLE=1 without Infiniband)

A model whose training state does not fit one GPU: the same commands with --parallel=fsdp (parallel.py).

`python train.py --help` lists every setting.
"""
import dataclasses
import importlib.util
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from atomic_write import atomic_write_bytes
from checkpoint import (BEST_NAME, CHECKPOINT_NAME, CheckpointError, checkpoint_model, is_hf_source, load_model,
                        load_training_state, load_weights, lock_out_dir, read_checkpoint, restore, resumed_best_val_loss,
                        rng_state, save_checkpoint, set_rng_state)
from configurator import ConfigError, choose, configure, fail, inherit
from dataset import (DatasetError, bits_per_byte, bytes_per_token, check_split, count_targets, dataset_dir, load_meta,
                     open_mask, open_split, sample_windows)
from fit import FitError, auto_micro_batch, halved, in_halves, regroup
from generate import generate_text
from metrics import PLOT_NAME, MetricsLog, plot_runs
from hf_gpt2 import GPT2_NAMES, HFError
from model import ACTIVATIONS, GPT, NORMS, POSITIONS, GPTConfig
from muon import configure_optimizers
from parallel import PARALLEL, Processes, assign, full_tensor, gatherer, grad_scaler, replicate, shard
from plan import refusal, show_plan, training_peak
from recovery import NO_BEST, ON_DIVERGENCE, Recovery
from report import run_facts, write_report
from runtime import MemoryPhases, autocast, batch_to_device, mfu, peak_flops, resolve_device, resolve_dtype
from tokenizer import TOKENIZER_FILE, TokenizerError, load_tokenizer, tokenizer_name, tokenizers_match

# -----------------------------------------------------------------------------
# default config values: GPT-2 (124M) on OpenWebText
# I/O
out_dir = 'out'  # where checkpoints are written (and read, with init_from='resume')
eval_interval = 2000  # evaluate train/val loss every this many iterations
log_interval = 1  # print a log line every this many iterations
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # evaluate once, then exit
always_save_checkpoint = True  # save after every evaluation, not only when val loss improves
save_interval = 0  # also save every this many iterations, between evaluations (0: at evaluations only)
sample_interval = 0  # print a short sample at the evaluations of every this many iterations (0: never)
sample_start = '\n'  # the prompt of those samples
progress = None  # a progress bar (loss, tokens/s, time left) instead of a line per iteration: None = when the output is a terminal
plot = True  # redraw out_dir/loss.png (from out_dir/metrics.jsonl) at evaluations, at most every 30 s, and at the end
init_from = 'scratch'  # 'scratch', 'resume' (from the checkpoint in out_dir), or fine-tune: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder or a checkpoint folder; 'auto': resume if out_dir holds a checkpoint, else start as the config file (or the default) says
target_val_loss = 0.0  # stop once an evaluation's val loss is <= this (a speedrun's finish line); 0 runs all max_iters
patience = 0  # early stopping: stop after this many evaluations in a row without a new best val loss (0: never)
max_overfit_gap = 0.0  # early stopping: stop once val loss exceeds train loss by more than this (0: never)
# wandb logging
wandb_log = False  # log to Weights & Biases (pip install wandb)
wandb_project = 'owt'
wandb_run_name = 'gpt2'
# data
dataset = 'openwebtext'  # a folder under data/, or a path to a prepared dataset folder
gradient_accumulation_steps = 5 * 8  # micro-batches per optimizer step (in total over all processes)
batch_size = 12  # micro-batch size; with accumulation, the batch is batch_size * gradient_accumulation_steps. 'auto': the largest that fits the device, the batch as asked (fit.py)
block_size = 1024  # context length in tokens
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # biases in Linear and LayerNorm layers
activation = 'gelu'  # MLP activation: gelu, gelu_tanh, relu, relu2, silu or swiglu
position = 'learned'  # position embedding: learned or rotary
rope_base = 10000.0  # rotary: base of the rotation frequencies (larger suits longer contexts)
norm = 'layernorm'  # layernorm or rmsnorm
qk_norm = False  # normalise queries and keys before attention
tie_weights = True  # share the token embedding and the output head
zero_init_proj = False  # zero-initialise residual output projections
logit_softcap = 0.0  # if > 0, cap logits smoothly at +-logit_softcap
# optimizer
optimizer = 'adamw'  # 'adamw', or 'muon': Muon for the blocks' weight matrices, AdamW (learning_rate) for the rest
muon_lr = 0.02  # Muon's max learning rate; the schedule scales it like learning_rate
muon_momentum = 0.95  # Muon's (Nesterov) momentum
learning_rate = 6e-4  # max learning rate (AdamW's)
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm, or disable if == 0.0
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
device = 'auto'  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where supported, else float16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float16'
compile = None  # torch.compile the model: None means on for CUDA only
backend = 'nccl'  # distributed backend on GPU (CPU processes always use gloo)
dist_timeout = 3600  # seconds a process waits for the others (in a collective, or for the master's checkpoint save) before the run fails: NCCL's default, 600, is less than writing a large checkpoint takes
parallel = 'ddp'  # under torchrun: 'ddp' (a whole copy of the model per process) or 'fsdp' (each process holds 1/N of the weights, gradients and optimizer state: for models too large for one GPU)
activation_checkpointing = False  # recompute each block's activations in the backward pass: less memory (long contexts, large batches), about a third more compute
seed = 1337
threads = 0  # CPU threads for torch, 0 leaves torch's default
memory_limit = 0.0  # GiB of memory per process batch_size='auto' may fill (0: what the device has free)
# divergence: a non-finite loss or gradient norm, a loss far above the best val loss, or (with 'recover') a loss spike (recovery.py)
on_divergence = 'stop'  # 'stop' (the last good checkpoint stays), or 'recover': back to it, on other batches, at a lower learning rate
divergence_factor = 10.0  # a step's loss or an evaluation's val loss above this multiple of the best val loss is a divergence, never saved (0: never)
spike_factor = 4.0  # with 'recover': a step's loss above this multiple of the median of the last spike_window steps' is a spike (0: never)
spike_window = 50
max_recoveries = 3  # with 'recover': the divergence after this many recoveries stops the run
recovery_lr_scale = 0.5  # each recovery multiplies the learning rate by this
plan = False  # print what this run will cost (parameters, FLOPs, memory per process by part, tokens/s, time) and exit
# every other GPTConfig field is a setting too, with the model's default (the vocabulary comes from the data)
for _field in dataclasses.fields(GPTConfig):
    if _field.name not in ('vocab_size', 'real_vocab_size'):
        globals().setdefault(_field.name, _field.default)
# -----------------------------------------------------------------------------
config = configure(globals(), auto=('batch_size', 'init_from'))
processes = Processes()  # this process's place among torchrun's, or a single process
ddp = processes.distributed  # under torchrun (DDP or FSDP)
master_process, ddp_rank, ddp_world_size = processes.master, processes.rank, processes.world_size
if ddp:
    # joined before out_dir or the dataset is read: what one node alone cannot read must stop every process
    # (parallel.Processes), not leave the others waiting in a collective until the timeout
    try:
        on_gpu = resolve_device(device).startswith('cuda')
    except ValueError as e:
        fail(e)
    processes.join(backend if on_gpu else 'gloo', dist_timeout)


def fail_together(error):
    """Stop every process (each must call it at the same point) if error, one process's message, is not None;
    the master says why."""
    error = processes.first_error(error)
    if error:
        fail(error) if master_process else sys.exit(2)


if ddp:
    fail_together(processes.check_shared_folder(out_dir))
if init_from == 'auto':  # a requeued job goes on where it stopped; a first one starts as configured
    init_from = config['init_from'] = 'resume' if processes.any(os.path.exists(os.path.join(out_dir, CHECKPOINT_NAME))) \
        else config.before_auto.get('init_from', 'scratch')
resumed = None  # the checkpoint.json of the run being resumed
if init_from == 'resume':
    # a resumed run goes on as the saved run was set up: only what this command line (or a config file given now)
    # sets changes, and the log below lists it. (The model's shape always comes from the checkpoint; where the
    # processes run is this launch's to say.)
    if is_hf_source(out_dir):
        fail(f'{out_dir} holds Hugging Face weights, not a checkpoint to resume: fine-tune them with --init_from={out_dir}')
    try:
        resumed = read_checkpoint(out_dir)
        inherit(config, resumed['config'], keep=('init_from', 'out_dir', 'eval_only', 'device', 'backend', 'dist_timeout',
                                                 'memory_limit'))
    except CheckpointError as e:
        fail(e)
    except ConfigError as e:
        fail(f'{out_dir}/checkpoint.json is damaged: its config says {e}')
    globals().update(config)
elif init_from != 'scratch' and os.path.isfile(os.path.join(init_from, CHECKPOINT_NAME)):
    # a fine-tune of one of our checkpoints starts from that run's training settings (its block size, batch,
    # accumulation, optimizer, schedule), not from this file's GPT-2-scale defaults; what is given now wins. Not taken:
    # where this run reads and writes and runs, and a speedrun's finish line
    try:
        base_run = read_checkpoint(init_from)
        taken = inherit(config, base_run['config'], keep=('init_from', 'out_dir', 'dataset', 'eval_only', 'device',
                                                           'backend', 'dist_timeout', 'target_val_loss', 'memory_limit'))
    except CheckpointError as e:
        fail(e)
    except ConfigError as e:
        fail(f'{init_from}/{CHECKPOINT_NAME} is damaged: its config says {e}')
    globals().update(config)
    if taken and master_process:
        print(f"fine-tuning with the training settings of {init_from}'s run (--key=value overrides any): "
              f"{', '.join(f'{key}={config[key]!r}' for key in taken)}")
# -----------------------------------------------------------------------------


MAX_LEARNING_RATE = 1e30  # Adam's first step, learning_rate / (1 - beta1), must fit float32 (3.4e38) or Adam raises


def check_settings():
    """One line and exit code 2 for settings that would crash later or train nonsense (the model's own are
    checked by GPTConfig)."""
    for key in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'log_interval',
                'spike_window'):
        if config[key] != 'auto' and config[key] < 1:
            fail(f'{key}={config[key]} must be at least 1')
    for key in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'learning_rate', 'min_lr', 'muon_lr', 'weight_decay',
                'grad_clip', 'target_val_loss', 'threads', 'save_interval', 'sample_interval', 'patience',
                'max_overfit_gap', 'memory_limit', 'spike_factor', 'max_recoveries', 'seed', 'divergence_factor'):
        if config[key] < 0:
            fail(f'{key}={config[key]} must not be negative')
    if not 0 < config['recovery_lr_scale'] <= 1:
        fail(f"recovery_lr_scale={config['recovery_lr_scale']} must be in (0, 1]")
    for key in ('learning_rate', 'min_lr', 'muon_lr'):
        if not config[key] <= MAX_LEARNING_RATE:  # inf and nan too
            fail(f'{key}={config[key]} must be a number of at most {MAX_LEARNING_RATE:g} (1e-4 to 1e-2 are usual): '
                 f"larger ones overflow the optimizer's float32 arithmetic")
    if config['threads'] > 4 * (os.cpu_count() or 1):  # each thread's stack and buffers: 100,000 of them exhaust memory
        fail(f"threads={config['threads']} is more than 4 per core of this machine's {os.cpu_count()}: use at most "
             f'{4 * (os.cpu_count() or 1)}, or 0 for torch\'s default')
    if config['wandb_log'] and importlib.util.find_spec('wandb') is None:
        fail('wandb_log=True needs wandb (pip install wandb), or pass --wandb_log=False')
    if not config['dist_timeout'] > 0:
        fail(f"dist_timeout={config['dist_timeout']} must be a positive number of seconds")
    for key in ('beta1', 'beta2', 'muon_momentum'):
        if not 0 <= config[key] < 1:
            fail(f'{key}={config[key]} must be in [0, 1)')
    try:  # choices in any case ('ReLU' is 'relu'), and the model's settings, before anything is built or written
        for key, allowed in (('activation', ACTIVATIONS), ('position', POSITIONS), ('norm', NORMS),
                             ('optimizer', ('adamw', 'muon')), ('dtype', ('auto', 'float32', 'bfloat16', 'float16')),
                             ('parallel', PARALLEL), ('on_divergence', ON_DIVERGENCE)):
            choose(config, key, allowed)
        GPTConfig(**{f.name: config[f.name] for f in dataclasses.fields(GPTConfig) if f.name in config})
    except (ConfigError, ValueError) as e:
        fail(e)
    globals().update(config)


check_settings()
if init_from not in ('scratch', 'resume') and init_from not in GPT2_NAMES and not os.path.isdir(init_from):
    fail(f"init_from={init_from!r}: use 'scratch', 'resume', {', '.join(GPT2_NAMES)}, a Hugging Face GPT-2 folder or a checkpoint folder")
if progress not in (None, True, False):
    fail(f'progress={progress!r}: use True, False or None (a bar when the output is a terminal)')
if compile not in (None, True, False):
    fail(f'compile={compile!r}: use True, False or None (on for CUDA only)')

# various inits, derived attributes, I/O setup
try:
    device = resolve_device(device)
except ValueError as e:
    fail(e)
if ddp and device.startswith('cuda'):
    device = f'cuda:{processes.local_rank}'  # this node's GPU for this process
    torch.cuda.set_device(device)
memory = MemoryPhases(device, 'resume' if init_from == 'resume' else 'start')  # peak memory by phase, for the end
if ddp:
    # world_size processes train simultaneously: scale down the accumulation steps of each
    if gradient_accumulation_steps % ddp_world_size:
        fail(f'gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the {ddp_world_size} processes')
    gradient_accumulation_steps //= ddp_world_size
elif parallel == 'fsdp':
    print('note: parallel=fsdp shards the model over the processes torchrun starts; one process trains it whole')
fsdp = ddp and parallel == 'fsdp'  # else DDP, under torchrun
torch.manual_seed(seed + ddp_rank)  # each process its own dropout; nothing else draws from torch's global generators
if threads:
    torch.set_num_threads(threads)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'  # for later use in torch.autocast
try:
    dtype = resolve_dtype(dtype, device)
except ValueError as e:
    fail(e)
ctx = autocast(device, dtype)
compile = device_type == 'cuda' if compile is None else compile

# data: token memmaps and the tokenizer that made them. Every node reads its own path: all must find the same data
data_dir = dataset_dir(dataset)
meta, data_error = None, None
try:
    meta = load_meta(data_dir)
    split_lengths = {split: check_split(data_dir, split, meta) for split in ('train', 'val')}
except DatasetError as e:
    data_error = str(e)
fail_together(data_error)
if ddp and processes.differs((meta, split_lengths)):
    fail_together(f'the processes found different datasets at {data_dir}: every node must read the same prepared '
                  f'dataset (put it on the shared filesystem, or copy it whole)')
for split, length in split_lengths.items():
    if length <= block_size:
        fail(f'{data_dir}/{split}.bin holds {length} tokens, too few for block_size={block_size}: use a smaller --block_size or more text')
if master_process and not eval_only and not plan:
    # one run at a time writes into out_dir; the lock lasts as long as this process. Taken once the settings and
    # the data are known to be good: a run that cannot start creates nothing
    try:
        out_dir_lock = lock_out_dir(out_dir)
    except CheckpointError as e:
        fail(e)
    except OSError as e:
        fail(f'cannot write to out_dir {out_dir}: {e.strerror}; pass a folder you can write to')
    if meta['tokenizer'].get('tokenizer_file'):  # the tokenizer's own file travels with the checkpoints too
        try:
            with open(os.path.join(data_dir, TOKENIZER_FILE), 'rb') as f:
                tokenizer_file = f.read()
            atomic_write_bytes(os.path.join(out_dir, TOKENIZER_FILE), lambda f: f.write(tokenizer_file))
        except OSError as e:
            fail(f'cannot copy {TOKENIZER_FILE} from {data_dir} to {out_dir}: {e.strerror}; prepare the dataset again')
val_bytes_per_token = bytes_per_token(meta, 'val')
lossy_note = '' if meta.get('lossless', True) else f" ({meta['tokenizer']['kind']} tokenizer, lossy: not comparable)"
chat = bool(meta.get('chat'))  # a chat dataset: the loss is over the replies' tokens alone
# the sampler's state is saved in checkpoints, so a resumed run draws the same batches it would have
data_rng = np.random.default_rng(seed + ddp_rank)


def draw_windows(split, rng):
    """A micro-batch of token windows, in host memory (runtime.batch_to_device moves it). A fresh memmap per batch
    avoids a memory leak, https://stackoverflow.com/questions/45132940"""
    data = open_split(data_dir, split, meta)
    try:
        mask = open_mask(data_dir, split, meta)  # a chat dataset's: the loss counts the assistant's tokens only
        return sample_windows(data, block_size, batch_size, rng, mask)
    except DatasetError as e:
        fail(e)


# model init. A new model and a resumed one are built on the meta device (shapes, no memory) and get storage
# below, where they are placed: under FSDP each process then holds its own shards alone, never the whole model
iter_num = 0
best_val_loss = NO_BEST
model_args = {f.name: config[f.name] for f in dataclasses.fields(GPTConfig) if f.name in config}
# the model's vocabulary comes from the tokenizer, padded up to a multiple of 64 for efficient matmuls
model_args['vocab_size'] = math.ceil(meta['vocab_size'] / 64) * 64
model_args['real_vocab_size'] = meta['vocab_size']


def refuse_what_cannot_fit(model_config):
    """One line (in every process) before the model takes memory, where a training step needs more than the device
    has free (plan.py's estimate): sizes asked by mistake fail now, not in the allocator minutes later."""
    if eval_only or batch_size == 'auto':  # an evaluation needs less; 'auto' fits what there is
        return
    need = training_peak(model_config, batch_size, block_size=block_size, optimizer=optimizer, dtype=dtype,
                         parallel=parallel if ddp else None, world_size=ddp_world_size,
                         activation_checkpointing=activation_checkpointing, device=device)
    line = refusal(need, device, f'training {model_config.n_layer} layers of {model_config.n_embd} channels on '
                                 f'micro-batches of {batch_size:,} x {block_size:,} tokens')
    fail_together(line and f'{line}: use a smaller --batch_size (or --batch_size=auto), --block_size or model')


if init_from == 'scratch':
    if master_process:
        print('Initializing a new model from scratch')
    refuse_what_cannot_fit(GPTConfig(**model_args))
    with torch.device('meta'):
        model = GPT(GPTConfig(**model_args))
elif init_from == 'resume':
    if master_process:
        print(f'Resuming training from {out_dir}')
    if resumed.get('tokenizer') != meta['tokenizer']:
        fail(f'the checkpoint in {out_dir} was trained with another tokenizer than the dataset {data_dir}: resume on the dataset it was trained on')
    try:  # the checkpoint's architecture wins over the command line; dropout may change
        model = checkpoint_model(out_dir, resumed, dropout=dropout)
    except CheckpointError as e:
        fail(e)
    model_args = dataclasses.asdict(model.config)
    saved_optimizer = resumed['config'].get('optimizer', 'adamw')
    if saved_optimizer != optimizer:
        fail(f'the checkpoint in {out_dir} was trained with optimizer={saved_optimizer!r}: resume with --optimizer={saved_optimizer}')
    iter_num = resumed['iter_num']
    best_val_loss = resumed_best_val_loss(out_dir, resumed)
    changed = [f'{key} {value!r} -> {config[key]!r}' for key, value in resumed['config'].items()
               if key != 'init_from' and key in config and config[key] != value]
    if changed and master_process:
        print(f"resuming with changed settings: {', '.join(changed)}")
else:  # fine-tuning: these weights (whole, in every process), a new optimizer, iterations from 0
    if master_process:
        print(f'Initializing from the weights of {init_from}')
    try:
        model, model_tokenizer, _ = load_model(init_from, which='best', dropout=dropout)
    except (CheckpointError, HFError) as e:
        fail(e)
    if model_tokenizer is not None and not tokenizers_match(model_tokenizer, meta['tokenizer'], chat=True):
        fail(f"the dataset {data_dir} was tokenized with another tokenizer than {init_from}'s "
             f"({tokenizer_name(model_tokenizer)}): prepare the dataset with that tokenizer")
    if meta['vocab_size'] > (model.config.real_vocab_size or model.config.vocab_size):
        if model_tokenizer is None:
            fail(f"the dataset's vocabulary ({meta['vocab_size']}) is larger than {init_from}'s ({model.config.vocab_size})")
        model.grow_vocabulary(meta['vocab_size'])  # a chat template's tokens (tokenizers_match said so)
    if block_size > model.config.block_size:
        fail(f"block_size={block_size} is larger than {init_from}'s context of {model.config.block_size}: use --block_size={model.config.block_size} or less")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    model_args = dataclasses.asdict(model.config)
if init_from != 'scratch':
    refuse_what_cannot_fit(model.config)
model.activation_checkpointing = activation_checkpointing
model.train()  # in every process (a sample or an evaluation switches back on its own)
raw_model = model
if fsdp:
    if compile:
        # each block on its own, in place (as torchtitan does): FSDP's gathers between the blocks stay outside
        # the compiled graphs, and parameter names do not change
        for block in model.transformer.h:
            block.compile()
    # before the optimizer is built, which must hold the shards
    shard(model, device, ddp_world_size, dtype)
elif model.lm_head.weight.is_meta:
    model.to_empty(device=device)
else:
    model.to(device)
if init_from == 'scratch':
    # from a generator of its own: the same weights in every process and for any number of processes, drawn
    # without touching the global generators (each process's dropout stream stays its own)
    model.init_weights(torch.Generator().manual_seed(seed), assign)
elif init_from == 'resume':
    try:
        load_weights(out_dir, resumed, model)  # each process reads only its shards' rows under FSDP
    except CheckpointError as e:
        fail(e)

# a GradScaler is needed for float16 only: it is a no-op when disabled
scaler = grad_scaler(device_type, dtype == 'float16', sharded=fsdp)

# the optimizer setting names the kind (adamw or muon); optim is the optimizer itself
optim = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), device_type, optimizer, muon_lr,
                             muon_momentum)
if resumed is not None:
    try:
        saved_ranks = load_training_state(out_dir, resumed, optim)
    except CheckpointError as e:
        fail(e)
    # each process takes back its own batch sampler and random generators, so the run continues as if never stopped
    if len(saved_ranks) == ddp_world_size and saved_ranks[ddp_rank].get('data_rng'):
        data_rng.bit_generator.state = saved_ranks[ddp_rank]['data_rng']
        set_rng_state(saved_ranks[ddp_rank])
    else:
        # another number of processes cannot continue the saved streams: start new ones, the same every time
        data_rng = np.random.default_rng([seed, ddp_rank, iter_num])
        torch.manual_seed(int(np.random.SeedSequence([seed, ddp_rank, iter_num]).generate_state(1)[0]))
        if master_process:
            print(f'note: the checkpoint was written by {len(saved_ranks)} process{"es" if len(saved_ranks) > 1 else ""} '
                  f'and this run has {ddp_world_size}: every process re-seeds its batches and dropout from '
                  f'(seed, rank, iteration), so the run goes on reproducibly but not as the saved one would have')
    if resumed['training_state'].get('scaler'):
        scaler.load_state_dict(resumed['training_state']['scaler'])

if batch_size == 'auto':  # the largest micro-batch that fits, for the batch the settings ask (fit.py)
    memory.enter('fitting')
    asked = resumed['config']['batch_size'] if resumed else config.before_auto.get('batch_size', 12)
    try:
        batch_size, gradient_accumulation_steps, fit_line = auto_micro_batch(
            raw_model, optim, ctx, device, block_size, gradient_accumulation_steps * asked, memory_limit, processes, fsdp)
    except FitError as e:
        fail(e) if master_process else sys.exit(2)
    config.update(batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps * ddp_world_size)
    if master_process:
        print(fit_line)
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    print(f'tokens per iteration will be: {tokens_per_iter:,}')
if compile and master_process:
    print('compiling the model... (takes a ~minute)')
if compile and not fsdp:
    model = torch.compile(model)
if ddp and not fsdp:
    model = replicate(model, device_type, processes.local_rank)
if plan:  # the run's cost, predicted and measured in a few steps (plan.py), and no training
    show_plan(model, raw_model, optim, scaler, ctx, dtype, config, gradient_accumulation_steps, ddp_world_size if ddp else 0,
              iter_num, master_process, device)
    if ddp:
        processes.leave()
    sys.stdout.flush()
    os._exit(0)  # as at the end of a run under torchrun: without the interpreter's teardown (Gloo's threads)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split. The batches come from a generator seeded the
    same way every time: evaluations are comparable across iterations and do not disturb training's
    random stream. Several processes share the work: all draw the same batches, each scores (and moves to its
    device) every world_size-th, and the sum of their lists (each entry one process's loss, zeros elsewhere)
    gives every process exactly the figures one process would have computed."""
    out = {}
    model.eval()

    def score(windows):
        with ctx:
            return model(*batch_to_device(windows, device))[1].float()
    rounds = math.ceil(eval_iters / ddp_world_size)
    for split in ('train', 'val'):
        rng = np.random.default_rng([seed, 0, 1 if split == 'val' else 0])
        losses = torch.zeros(rounds * ddp_world_size, device=device)
        for k in range(rounds * ddp_world_size):
            windows = draw_windows(split, rng)
            # under FSDP every forward is a collective (each process lends its shards), so all processes run
            # as many: a batch past eval_iters is scored and dropped
            if k % ddp_world_size == ddp_rank and (k < eval_iters or fsdp):
                losses[k] = score(windows) if ddp else in_halves(score, windows)  # halved when out of memory
        if ddp:
            torch.distributed.all_reduce(losses)
        out[split] = losses.cpu()[:eval_iters].mean().item()
    model.train()
    return out


def random_state():
    """What this process needs to continue exactly from here: its batch sampler and its random generators."""
    return dict(rng_state(), data_rng=data_rng.bit_generator.state)


def lr_schedule(it):
    """The factor by which each param group's initial learning rate (learning_rate for AdamW, muon_lr for Muon) is
    scaled at iteration it: linear warmup to 1, then cosine decay to min_lr / learning_rate at lr_decay_iters."""
    if not decay_lr:
        return 1.0
    if it < warmup_iters:
        return (it + 1) / (warmup_iters + 1)
    floor = min_lr / learning_rate if learning_rate else 0.0
    if it > lr_decay_iters:
        return floor
    decay_ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return floor + coeff * (1.0 - floor)


def request_stop(signum, frame):
    """Ctrl-C or SIGTERM: save at the end of this micro-step, and exit. A second Ctrl-C (torchrun relays the first
    one, hence the second of grace) leaves at once, without saving."""
    global stop_signal, stop_time
    if stop_signal is not None and signum == signal.SIGINT and time.time() - stop_time > 1.0:
        print('\ninterrupted again: exiting without saving', file=sys.stderr, flush=True)
        os._exit(128 + signum)
    if stop_signal is None:
        stop_signal, stop_time = signum, time.time()


stop_signal, stop_time = None, 0.0
last_saved_iter = iter_num if init_from == 'resume' else None
best_saved_iter = None
evals_since_best = resumed['training_state'].get('evals_since_best', 0) if resumed else 0  # for patience
recovery = Recovery(on_divergence, spike_factor, spike_window, max_recoveries, recovery_lr_scale, raw_model,
                    resumed['training_state'] if resumed else None, divergence_factor)


# logging
if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

device_peak = peak_flops(device, dtype)
if master_process:
    peak_text = f', device peak {device_peak / 1e12:.0f} TFLOP/s' if device_peak else ''
    print(f'{raw_model.get_num_params() / 1e6:.2f}M parameters, {raw_model.flops_per_token():,} training FLOPs per token{peak_text}')
start_iter = iter_num
sample_tokenizer = None
# out_dir/metrics.jsonl: the curve of this run (a resumed run continues it from the checkpoint's iteration)
def kept():
    """What a run that stops now leaves, for its last line."""
    return f'the checkpoint of iteration {last_saved_iter} in {out_dir} is kept' if last_saved_iter else 'nothing was saved'


metrics = MetricsLog(out_dir, iter_num if init_from == 'resume' else None,  # a full disk stops the run, in one line
                     on_error=lambda e: fail(f'{e}; {kept()}')) if master_process and not eval_only else None
if metrics:  # for the report page (report.py): this start's settings, machine, versions and data
    metrics.log('run', iter_num, 0.0, **run_facts(config, device, dtype, ddp_world_size, dataset=data_dir,
                tokenizer=meta['tokenizer'], vocab_size=meta['vocab_size'], split_tokens=split_lengths,
                parameters=raw_model.get_num_params(), flops_per_token=raw_model.flops_per_token(),
                tokens_per_iter=tokens_per_iter, peak_flops=device_peak))
run_start = time.time()
show_bar = master_process and not eval_only and (sys.stdout.isatty() if progress is None else progress)
bar = tqdm(total=max_iters, initial=iter_num, unit='it', dynamic_ncols=True, file=sys.stdout) if show_bar else None
last_plot = run_start  # drawing takes ~0.3 s: not more often than every 30 s (a short run gets its plot at the end)
local_iter_num = 0  # number of iterations in the lifetime of this process
running_mfu = -1.0
signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)
memory.enter('training')


def say(line):
    """Print a line of the log (the master's); above the progress bar, when there is one."""
    if not master_process:
        return
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def save(best=False, state=None):
    """Write a checkpoint of this iteration; best: its val loss is the best so far, so sample.py and eval.py will
    read it (best.json). state: what this process needs to continue from it (random_state(), by default now's).
    Every process calls it at the same iteration: each sends the master its state and, under FSDP, its shards,
    one tensor at a time; the master writes, and the others wait for it here."""
    global last_saved_iter, best_saved_iter
    memory.enter('save')
    rank_states = processes.gather(state or random_state())
    last_saved_iter = iter_num
    best_saved_iter = iter_num if best else best_saved_iter
    say(f"saving checkpoint to {out_dir} (iteration {iter_num}{', the best so far' if best else ''})")
    try:
        save_checkpoint(out_dir, raw_model, optim, iter_num, best_val_loss, model_args, config, meta['tokenizer'],
                        dict(scaler=scaler.state_dict(), evals_since_best=evals_since_best, **recovery.state()),
                        rank_states, best,
                        fetch=gatherer(master_process), write=master_process)
    except CheckpointError as e:
        fail(e)
    except OSError as e:
        fail(f'cannot save a checkpoint in {out_dir}: {e.strerror}; the previous checkpoint there is intact')
    try:
        processes.wait_for_master(f'the checkpoint of iteration {iter_num}')
    except RuntimeError as e:
        fail(e)
    memory.enter('training')


def draw_sample():
    """A short sample from sample_start, so a user sees the text improve. From a random generator of its own, so
    training goes on exactly as it would have without it, and eagerly: compiled, the growing shapes of decoding
    would recompile every block (compiled in place under FSDP) up to dynamo's limit. Under FSDP every process runs
    each forward pass (each lends its shards), and all go on with the master's tokens: they take the same steps
    and stop at the same end of text."""
    global sample_tokenizer
    try:
        sample_tokenizer = sample_tokenizer or load_tokenizer(meta['tokenizer'], data_dir)
        ids = sample_tokenizer.encode(sample_start) or [sample_tokenizer.eot_id or 0]
    except TokenizerError as e:
        say(f'note: no sample: {e}')
        return
    raw_model.eval()
    with torch.compiler.set_stance('force_eager'), ctx:
        text = generate_text(raw_model, sample_tokenizer, ids[-block_size // 2:], max_new_tokens=min(200, block_size),
                             temperature=0.8, top_k=200, generator=torch.Generator(device).manual_seed(seed),
                             sync=processes.same_as_master if fsdp else None)[0]
    raw_model.train()
    say(f'sample at step {iter_num}: {sample_tokenizer.decode(ids) + text!r}')
    if metrics:
        metrics.log('sample', iter_num, time.time() - run_start, text=sample_tokenizer.decode(ids) + text)


def redraw_plot():
    global last_plot
    last_plot = time.time()
    try:
        plot_runs([out_dir], os.path.join(out_dir, PLOT_NAME))
    except Exception as e:  # no matplotlib, a full disk, a font problem: the run matters more than its plot
        say(f'note: cannot draw {PLOT_NAME}: {e}')


def diverged(what):
    tried = f' (after {recovery.recoveries} recoveries)' if recovery.recoveries else ''
    fail(f'training diverged at iteration {iter_num}: {what}{tried}; {kept()}. Try a lower --learning_rate '
         f'(or --muon_lr), --grad_clip=1.0, --dtype=float32 or --on_divergence=recover')


def recover(why):
    """on_divergence='recover': back to the last good state, other batches and dropout from there on, a lower
    learning rate (recovery.py); the steps undone leave the metrics."""
    global iter_num, best_val_loss, data_rng, t0
    try:
        restore_last = (lambda: restore(out_dir, raw_model, optim, scaler)) if last_saved_iter is not None else None
        iter_num, best, what = recovery.go_back(why, iter_num, raw_model, optim, restore_last)
    except CheckpointError as e:
        fail(e)
    best_val_loss = best_val_loss if best is None else best
    data_rng = np.random.default_rng(recovery.seed(seed, ddp_rank, iter_num))
    torch.manual_seed(recovery.seed(seed, ddp_rank, iter_num))
    if bar is not None:
        bar.n = iter_num
    say(f'divergence: {what}')
    if metrics:
        metrics.rewind(iter_num)
        metrics.log('event', iter_num, time.time() - run_start, what='divergence', detail=what)
    t0 = time.time()


def stop_run(state=None):
    """Save (state: as in save()) and exit with the shell's code for death by the signal that asked for it."""
    save(state=state)
    if master_process:
        name = signal.Signals(stop_signal).name if stop_signal else 'a signal to another process'
        print(f'stopped by {name} at iteration {iter_num}, checkpoint saved: continue with --init_from=resume '
              f'--out_dir={out_dir}', file=sys.stderr, flush=True)
        if wandb_log:
            wandb.finish()
    if ddp:
        processes.leave()
    sys.stdout.flush()
    os._exit(128 + (stop_signal or signal.SIGINT))


def accumulate(windows, start_state):
    """The forward and backward passes of one step's micro-batches (windows), with the GradScaler if training in
    float16; returns this process's share of the step's mean loss. start_state: for a stop in the middle."""
    step_tokens = processes.sum(sum(map(count_targets, windows))) if chat else tokens_per_iter
    X, Y = batch_to_device(windows[0], device)
    step_loss = 0.0
    for micro_step in range(len(windows)):
        # under DDP, gradients are averaged across processes on the last micro step only; FSDP reduce-scatters
        # every micro step's, so that no process ever holds whole gradients (the memory FSDP is for)
        sync = not ddp or fsdp or micro_step == len(windows) - 1
        with nullcontext() if sync else model.no_sync():
            with ctx:
                _, loss = model(X, Y)
                # the mean over this micro-batch's targets, weighted by their share of the step's (the processes'
                # gradients are averaged, hence ddp_world_size): 1 / gradient_accumulation_steps unless a chat's
                loss = loss / (step_tokens / (count_targets(windows[micro_step]) * ddp_world_size))
            if micro_step + 1 < len(windows):  # the next batch's copy is queued while the GPU works
                X, Y = batch_to_device(windows[micro_step + 1], device)
            scaler.scale(loss).backward()
        step_loss += loss.detach()
        # a stop asked for is taken at once, agreed by every process: the step is dropped and the checkpoint is
        # of the last whole one, so a slow step does not outlast the grace period before SIGKILL
        if micro_step + 1 < len(windows) and processes.any(stop_signal is not None):
            optim.zero_grad(set_to_none=True)
            stop_run(start_state)
    return step_loss


def out_of_memory(windows, start_state):
    """The step ran out of memory: it is redone from its start (its windows, dropout as first drawn) in micro-batches
    half as large, and so is every later step (fit.halved); returns its windows regrouped."""
    global batch_size, gradient_accumulation_steps
    optim.zero_grad(set_to_none=True)
    try:  # one process of several cannot redo a step alone: the others would wait for it
        batch_size, gradient_accumulation_steps, what = halved(batch_size, gradient_accumulation_steps, alone=not ddp)
    except FitError as e:
        kept = f'the checkpoint of iteration {last_saved_iter} is kept' if last_saved_iter else 'nothing was saved'
        fail(f'out of memory at iteration {iter_num} {e} ({kept})')
    set_rng_state(start_state)
    say(f'out of memory at iteration {iter_num}: the step is {what}')
    if metrics:
        metrics.log('event', iter_num, time.time() - run_start, what='out_of_memory', detail=f'the step is {what}')
    config.update(batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps * ddp_world_size)
    return regroup(windows, batch_size)


t0 = time.time()
while True:

    # determine and set the learning rate for this iteration
    lr_factor = lr_schedule(iter_num)
    for param_group in optim.param_groups:
        param_group['lr'] = param_group['initial_lr'] * lr_factor * recovery.lr_scale

    # evaluate the loss on train/val sets and write checkpoints (not again right after a resume, unless asked)
    evaluate = eval_only or ((iter_num % eval_interval == 0 or iter_num == max_iters)
                             and (iter_num != start_iter or init_from != 'resume'))
    finished = False  # the target val loss was reached, or early stopping ends the run
    if evaluate:
        losses = estimate_loss()  # in every process, which all get the same figures, and so take the same decisions
        bpb = f", val bits/byte {bits_per_byte(losses['val'], val_bytes_per_token):.4f}{lossy_note}" if val_bytes_per_token else ''
        say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{bpb}")
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            diverged('the evaluated loss is not finite')
        trouble = not eval_only and recovery.check_evaluation(losses['val'], best_val_loss)  # finite garbage is no checkpoint either
        if trouble and not recovery.can_go_back():
            diverged(trouble)
        if trouble:
            recover(trouble)
            continue
        if wandb_log and master_process:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr_factor * recovery.lr_scale * learning_rate, 'mfu': running_mfu * 100})
        if metrics:
            val_bpb = bits_per_byte(losses['val'], val_bytes_per_token) if val_bytes_per_token else None
            metrics.log('eval', iter_num, time.time() - run_start, train_loss=losses['train'], val_loss=losses['val'],
                        val_bits_per_byte=val_bpb)
            if plot and time.time() - last_plot >= 30:
                redraw_plot()
        if sample_interval and iter_num % sample_interval == 0 and (master_process or fsdp):
            draw_sample()  # under FSDP the forward passes need every process's shards
        improved = losses['val'] < best_val_loss
        evals_since_best = 0 if improved else evals_since_best + 1
        autosave = save_interval and iter_num % save_interval == 0
        if improved or always_save_checkpoint or autosave:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0 and not eval_only:
                save(best=improved)
        gap = losses['val'] - losses['train']
        if target_val_loss > 0 and losses['val'] <= target_val_loss:
            finished = True
            say(f'reached target val loss {target_val_loss} at step {iter_num}')
        elif patience and evals_since_best >= patience and not eval_only:
            finished = True
            say(f'early stop at step {iter_num}: no new best val loss in {patience} evaluations (patience={patience})')
        elif max_overfit_gap and gap > max_overfit_gap and not eval_only:
            finished = True
            say(f'early stop at step {iter_num}: val loss exceeds train loss by {gap:.4f}, more than '
                  f'max_overfit_gap={max_overfit_gap} (overfitting)')
        t0 = time.time()  # the evaluation, sample and save are not the next iteration's time
    if finished:
        break
    if eval_only:
        break
    if iter_num >= max_iters:
        break

    # the windows of every micro-step of this iteration, drawn first: the loss is the mean over every target token
    # of the step, in all processes, and a chat dataset's windows hold different numbers of them (its replies')
    start_state = random_state()  # a stop before the step ends saves this: a resume draws these windows again
    windows = [draw_windows('train', data_rng) for _ in range(gradient_accumulation_steps)]
    while True:
        try:
            step_loss = accumulate(windows, start_state)
            break
        except torch.OutOfMemoryError:
            windows = out_of_memory(windows, start_state)
    # clip the gradient (or only measure its norm, with grad_clip 0), unscaled first if training in fp16
    scaler.unscale_(optim)
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf')))
    # step the optimizer and scaler if training in fp16
    scaler.step(optim)
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    optim.zero_grad(set_to_none=True)

    # a diverged step (a float16 GradScaler skips overflowing ones itself) or a stop signal, agreed by every
    # process, and the step's loss over all of them (a host-device sync per step, and one all-reduce of three
    # numbers under DDP)
    flags = torch.stack([(~torch.isfinite(step_loss) | (~torch.isfinite(grad_norm) & (not scaler.is_enabled()))).float(),
                         torch.tensor(float(stop_signal is not None), device=step_loss.device), step_loss.float()])
    if ddp:
        torch.distributed.all_reduce(flags)
    unhealthy, stop, loss_sum = flags.tolist()

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    iter_num += 1
    local_iter_num += 1
    if bar is not None:
        bar.update(1)
    if iter_num % log_interval == 0 and master_process:
        lossf = loss_sum / ddp_world_size  # the step's mean loss over every process's targets
        tokens_per_sec = tokens_per_iter / dt
        mfu_text = ''
        if device_peak and local_iter_num >= 5:  # let the training loop settle a bit
            iter_mfu = mfu(raw_model.flops_per_token(), tokens_per_iter, dt, device_peak, ddp_world_size)
            running_mfu = iter_mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * iter_mfu
            mfu_text = f', mfu {running_mfu * 100:.2f}%'
        lr_text = f', lr {lr_factor * recovery.lr_scale * learning_rate:.2e}'  # AdamW's (Muon's goes the same way)
        if bar is not None:
            bar.set_postfix_str(f'loss {lossf:.4f}, {tokens_per_sec:,.0f} tok/s{mfu_text}{lr_text}', refresh=False)
        else:
            print(f'iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tokens_per_sec:,.0f} tok/s{mfu_text}{lr_text}')
        if metrics:
            metrics.log('step', iter_num, t1 - run_start, train_loss=lossf, lr=lr_factor * recovery.lr_scale * learning_rate,
                        grad_norm=grad_norm.item(), tokens_per_sec=round(tokens_per_sec),
                        mfu=running_mfu if running_mfu > 0 else None)

    trouble = recovery.check(loss_sum / ddp_world_size, finite=not unhealthy, best=best_val_loss)
    if trouble and not recovery.can_go_back():
        diverged(trouble)
    if trouble:
        recover(trouble)
        continue
    if save_interval and iter_num % save_interval == 0 and iter_num % eval_interval and iter_num != max_iters and not stop:
        save()  # an autosave between evaluations (an evaluation saves at its own iteration)
        t0 = time.time()
    if stop:
        stop_run()

if not eval_only and iter_num > start_iter and last_saved_iter != iter_num:
    # no evaluation saved the last state (always_save_checkpoint=False, and none beat the best val loss): a run that
    # trained never ends without a checkpoint to sample from or to continue
    save()
if bar is not None:
    bar.close()
if metrics and plot:
    redraw_plot()
if master_process and not eval_only and last_saved_iter is not None:
    if best_saved_iter is not None and best_saved_iter != last_saved_iter:
        print(f'the best checkpoint (iteration {best_saved_iter}, val loss {best_val_loss:.4f}) is what sample.py and '
              f'eval.py read; --init_from=resume continues from the latest (iteration {last_saved_iter})')
    elif not os.path.exists(os.path.join(out_dir, BEST_NAME)):
        print(f'no evaluation beat the first val loss ({best_val_loss:.4f}), so there is no best checkpoint: sample.py, '
              f'eval.py and --init_from=resume all read the latest (iteration {last_saved_iter})')
memory.enter(None)
if ddp or device_type == 'cuda':  # every process's, by phase: what DDP and FSDP differ in (bench_memory.py)
    phases = processes.gather(memory.peaks)
    if master_process and all(phases):
        print(MemoryPhases.summary(phases, device))
if metrics:
    metrics.log('end', iter_num, time.time() - run_start, peak_memory_mib=memory.peaks)
    try:
        write_report([out_dir])
    except Exception as e:  # the run is saved: its page (report.py draws it again any time) must not fail it
        print(f'note: cannot write the report page in {out_dir}: {e}')
if wandb_log and master_process:
    wandb.finish()
if ddp:
    processes.leave()
    if not device.startswith('cuda'):
        # Gloo's worker threads can still be releasing the last collective's tensors when the interpreter shuts
        # down, and taking the GIL then aborts the process (SIGABRT, about 1 run in 20 here; pytorch#179291).
        # Everything is saved and printed by now, so leave without the interpreter's teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
