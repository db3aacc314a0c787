"""
Checkpoints without pickle. A checkpoint in out_dir is three files:

    checkpoint.json              model config, training config, iteration, best val loss, the tokenizer's
                                 description, and which of the two files below belong to it
    model-<iter>.safetensors     the weights
    optimizer-<iter>.safetensors the optimizer's tensors and the random number generators' states

checkpoint.json is the latest checkpoint, which a resumed run continues. best.json, written by the saves of
evaluations that found a new best val loss, names the weights of the best one (the same fields, without the
optimizer): what sample.py and eval.py run by default. Its weight file stays as long as best.json names it.

Nothing a crash, a kill or a second run can do loses the last complete checkpoint:
- the weight files are written first, then best.json (for a new best) and checkpoint.json, each under a
  temporary name, fsynced, then renamed, and the folder is fsynced after the renames; the SHA-256 of each weight
  file goes into the JSON, and loading checks it;
- a save never overwrites a file the current checkpoint.json names (saving an iteration again takes new names),
  and removes only this format's own files: earlier checkpoints' weights and temporaries left by killed saves;
- weights that are not finite (a diverged run) are refused, at save and at load;
- lock_out_dir() keeps a second training run out of a folder in use.

Nothing in a checkpoint is trusted either: checkpoint.json is checked field by field, its file names must be
plain names inside out_dir, and its model config must match the weight file's header (names and shapes)
before any model is built, so a damaged or crafted file gives one line, never a traceback or a huge allocation.
"""
import hashlib
import json
import os
import re
import socket
import struct
from typing import NamedTuple, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from atomic_write import atomic_write_bytes, atomic_write_json, fsync_dir, remove_dead_temporaries
from hf_gpt2 import GPT2_NAMES, load_gpt2
from model import GPT, GPTConfig
from parallel import copy_local, like, local_rows

CHECKPOINT_NAME = 'checkpoint.json'
BEST_NAME = 'best.json'
LOCK_NAME = '.lock'
JSON_LIMIT = 64 * 2**20  # bytes: a checkpoint.json holds settings and a tokenizer's vocabulary, a few MB at most
WEIGHT_FILE = re.compile(r'^(model|optimizer)-\d{7}(-\d+)?\.safetensors$')


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete, unreadable or in use; the message says what to do."""


# ---------------------------------------------------------------------------- writing

def lock_out_dir(out_dir):
    """Claim out_dir for this training run, or raise CheckpointError naming the run that holds it. The lock is
    the operating system's (flock, or msvcrt's on Windows) on out_dir/.lock: it ends with the process however
    that ends, so a run that was killed leaves nothing to clean up. Keep the returned file open while training."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, LOCK_NAME), 'a+', encoding='utf-8')
    try:
        if os.name == 'nt':
            import msvcrt
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise CheckpointError(f'{out_dir} is in use by another training run ({holder}): wait for it to finish, '
                              f'or pass another --out_dir') from None
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()} on {socket.gethostname()}')
    f.flush()
    return f


def model_state(model):
    """The weights to save, a tied head stored once (as the embedding)."""
    state = dict(model.state_dict())
    if model.config.tie_weights:
        state.pop('lm_head.weight', None)
    return state


# safetensors' names of the dtypes a checkpoint holds
SAFETENSORS_DTYPES = {torch.float64: 'F64', torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16',
                      torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8', torch.uint8: 'U8',
                      torch.bool: 'BOOL'}


def _cpu(tensor):
    return tensor.detach().cpu()


def _file_order(tensors):
    """The order tensors go into a file: widest dtype first, so that after the 8-byte-aligned header every tensor
    starts at a multiple of its own size (as safetensors' own writer does); by name within a dtype."""
    return sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))


def save_tensors(path, tensors, fetch=_cpu, finite=False):
    """Write tensors (name -> tensor) to path as a safetensors file, one tensor at a time: the header comes from
    their shapes, then each tensor is fetched (fetch(tensor): the whole tensor on the CPU, gathered from shards
    under FSDP) and written, so no more than one tensor is ever held beyond what already exists. finite: refuse
    (CheckpointError, nothing written) a floating-point tensor holding NaN or inf; every tensor is still fetched,
    since under FSDP the other processes take part in each gather. Atomic, as every file here. Returns the file's
    SHA-256, computed from the bytes as they are written (no second read)."""
    names = _file_order(tensors)
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.dtype.itemsize
        header[name] = {'dtype': SAFETENSORS_DTYPES[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + size]}
        offset += size
    header = json.dumps(header, separators=(',', ':')).encode('utf-8')
    header += b' ' * (-len(header) % 8)
    bad, digest = [], hashlib.sha256()

    def write(f):
        for data in (struct.pack('<Q', len(header)), header):
            f.write(data)
            digest.update(data)
        for name in names:
            t = fetch(tensors[name])
            if finite and t.is_floating_point() and not torch.isfinite(t).all():
                bad.append(name)
            if not bad:  # little-endian bytes, as safetensors stores them (every machine PyTorch runs on)
                data = t.contiguous().view(-1).view(torch.uint8).numpy().data
                f.write(data)
                digest.update(data)
        if bad:
            raise CheckpointError(f'{bad[0]} (and {len(bad) - 1} more) hold NaN or inf')
    atomic_write_bytes(path, write)
    return digest.hexdigest()


def fetch_all(tensors, fetch):
    """What a process that lends its shards to the master's save does: the same fetches, in the same order."""
    for name in _file_order(tensors):
        fetch(tensors[name])


def _split_optimizer_state(state):
    """An optimizer's state_dict as (tensors for safetensors, everything else for JSON)."""
    tensors, scalars = {}, {}
    for pid, param_state in state['state'].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f'state.{pid}.{name}'] = value
            else:
                scalars[f'{pid}.{name}'] = value
    return tensors, {'param_groups': state['param_groups'], 'scalars': scalars}


def _join_optimizer_state(tensors, saved):
    state = {}
    for key, value in tensors.items():
        if key.startswith('state.'):
            _, pid, name = key.split('.', 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in saved['scalars'].items():
        pid, name = key.split('.', 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{k: tuple(v) if k == 'betas' else v for k, v in g.items()} for g in saved['param_groups']]
    return {'state': state, 'param_groups': groups}


def rng_state():
    """This process's torch random number generators (dropout draws from them)."""
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def _unused_name(prefix, iter_num, taken):
    """prefix-<iter>.safetensors, or with -1, -2, ... when the current checkpoint already uses that name."""
    name, n = f'{prefix}-{iter_num:07d}.safetensors', 0
    while name in taken:
        n += 1
        name = f'{prefix}-{iter_num:07d}-{n}.safetensors'
    return name


def _named_files(out_dir):
    """The weight files that checkpoint.json and best.json name: the ones a save must neither overwrite nor delete."""
    named = set()
    for name in (CHECKPOINT_NAME, BEST_NAME):
        try:
            ckpt = read_checkpoint(out_dir, name)
            named |= {ckpt['model_file'], ckpt.get('optimizer_file')}
        except CheckpointError:
            pass
    return named - {None}


def resumed_best_val_loss(out_dir, ckpt):
    """The best val loss a run resumed from ckpt (out_dir's checkpoint.json) goes on from: ckpt's own, or best.json's
    where a kill between the two renames of a save left best.json ahead of checkpoint.json (see save_checkpoint), so
    the resumed run replaces those weights only with better ones."""
    try:
        best = read_checkpoint(out_dir, BEST_NAME)
    except CheckpointError:
        return ckpt['best_val_loss']
    return min(ckpt['best_val_loss'], best['best_val_loss']) if best['iter_num'] > ckpt['iter_num'] else ckpt['best_val_loss']


def save_checkpoint(out_dir, model, optimizer, iter_num, best_val_loss, model_args, config, tokenizer,
                    training_state=None, ranks=None, best=False, fetch=_cpu, write=True):
    """training_state: whatever else, JSON-able, an exact resume needs (the loss scale). ranks: what each process
    needs to continue exactly, rank 0 first: dicts of its random generators' states, tensors (its torch
    generators, into the optimizer file) or JSON-able values (its batch sampler). By default this process's
    rng_state(). best: these weights have the best val loss so far (best.json names them too).
    fetch(tensor): the whole tensor on the CPU (parallel.gatherer under FSDP, where the model and optimizer hold
    shards); the files are written one tensor at a time. write=False: this process only lends its shards to the
    master's gathers (FSDP's other processes): it fetches what the master fetches, in the same order.
    Raises CheckpointError, and writes nothing, if a weight is not finite."""
    state = model_state(model)
    opt_tensors, opt_json = ({}, None) if optimizer is None else _split_optimizer_state(optimizer.state_dict())
    if not write:
        fetch_all(state, fetch)
        fetch_all(opt_tensors, fetch)
        return
    rank_json = []
    for rank, rank_state in enumerate(ranks or [rng_state()]):
        rank_json.append({k: v for k, v in rank_state.items() if not torch.is_tensor(v)})
        opt_tensors.update({f'rank{rank}.{k}': v for k, v in rank_state.items() if torch.is_tensor(v)})
    os.makedirs(out_dir, exist_ok=True)
    taken = _named_files(out_dir)
    model_file, optimizer_file = _unused_name('model', iter_num, taken), _unused_name('optimizer', iter_num, taken)
    try:
        try:
            model_sha256 = save_tensors(os.path.join(out_dir, model_file), state, fetch, finite=True)
        except CheckpointError as e:
            fetch_all(opt_tensors, fetch)  # the other processes' share of the optimizer file's gathers
            raise CheckpointError(f'not saving iteration {iter_num}: {e}; the last good checkpoint stays in {out_dir}') from None
        optimizer_sha256 = save_tensors(os.path.join(out_dir, optimizer_file), opt_tensors, fetch)
        fsync_dir(out_dir)  # both weight files are in place for good before checkpoint.json names them
        common = dict(format=1, iter_num=iter_num, best_val_loss=best_val_loss, model_args=model_args, config=config,
                      tokenizer=tokenizer, model_file=model_file, model_sha256=model_sha256)
        if best:
            # before checkpoint.json: a kill between the two renames leaves best.json naming these weights and
            # checkpoint.json the previous ones, and the next save keeps both (the other way round, it deleted the best)
            atomic_write_json(os.path.join(out_dir, BEST_NAME), common)
        atomic_write_json(os.path.join(out_dir, CHECKPOINT_NAME), dict(
            common, optimizer_file=optimizer_file, optimizer_sha256=optimizer_sha256, optimizer=opt_json,
            training_state=dict(training_state or {}, ranks=rank_json),
        ))
    except BaseException:  # a full disk, Ctrl-C: the new files no checkpoint names go, the previous checkpoint stays
        named = _named_files(out_dir)
        for name in {model_file, optimizer_file} - named:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        raise
    # only now is the new checkpoint complete: drop earlier checkpoints' files (but the best's weights), and
    # temporaries of killed saves
    keep = _named_files(out_dir) | {model_file, optimizer_file}
    for name in os.listdir(out_dir):
        if WEIGHT_FILE.match(name) and name not in keep:
            try:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass  # a reader has it open (Windows), or it is already gone: the next save tries again
    remove_dead_temporaries(out_dir, lambda name: bool(WEIGHT_FILE.match(name)) or name in (CHECKPOINT_NAME, BEST_NAME))


# ---------------------------------------------------------------------------- reading

def _check_type(path, ckpt, key, kinds, what, required=True):
    if key not in ckpt:
        if required:
            raise CheckpointError(f'{path} is incomplete: it lacks {key!r}')
        return
    value = ckpt[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CheckpointError(f'{path} is damaged: {key} must be {what}, not {value!r:.60}')


def _check_file_name(path, ckpt, key):
    name = ckpt[key]
    if os.path.basename(name) != name or name in ('', '.', '..'):
        raise CheckpointError(f'{path} is damaged: {key} must be a file name in its folder, not {name!r}')


def read_checkpoint(out_dir, name=CHECKPOINT_NAME):
    """The checkpoint's JSON part (name: checkpoint.json, the latest, or best.json), checked field by field; raises
    CheckpointError if out_dir holds no complete, well-formed checkpoint."""
    path = os.path.join(out_dir, name)
    if not os.path.isdir(out_dir):
        raise CheckpointError(f'checkpoint folder {out_dir} does not exist: train one with `python train.py ... --out_dir={out_dir}`')
    if not os.path.exists(path):
        raise CheckpointError(f'no {name} in {out_dir}: it holds no complete checkpoint (was training stopped before the first save?)')
    try:
        if os.path.getsize(path) > JSON_LIMIT:
            raise ValueError(f'it holds {os.path.getsize(path):,} bytes, more than a checkpoint.json ever does')
        with open(path, encoding='utf-8') as f:
            ckpt = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, a 5,000-digit number
        raise CheckpointError(f'cannot read {path}: {type(e).__name__}: {str(e)[:200]}') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} is damaged: it holds a {type(ckpt).__name__}, not a JSON object')
    _check_type(path, ckpt, 'model_file', str, 'a file name')
    _check_file_name(path, ckpt, 'model_file')
    _check_type(path, ckpt, 'optimizer_file', str, 'a file name', required=False)
    if 'optimizer_file' in ckpt:
        _check_file_name(path, ckpt, 'optimizer_file')
    _check_type(path, ckpt, 'model_args', dict, 'an object')
    _check_type(path, ckpt, 'iter_num', int, 'a whole number')
    _check_type(path, ckpt, 'best_val_loss', (int, float), 'a number')
    _check_type(path, ckpt, 'config', dict, 'an object')
    for key in ('training_state', 'optimizer'):
        _check_type(path, ckpt, key, (dict, type(None)), 'an object', required=False)
    _check_type(path, ckpt, 'tokenizer', (dict, type(None)), 'an object', required=False)
    for key in ('model_sha256', 'optimizer_sha256'):  # absent in checkpoints written before they were recorded
        _check_type(path, ckpt, key, str, 'a SHA-256 in hex', required=False)
    try:
        GPTConfig(**ckpt['model_args'])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{path} is damaged: model_args: {e}') from None
    return ckpt


def _tensors_file(out_dir, name):
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        raise CheckpointError(f'checkpoint file {path} is missing: the checkpoint is incomplete')
    return path


def _safetensors_error(path, e):
    return CheckpointError(f'{path} is not a readable safetensors file (damaged, or not written by train.py): {e}')


class TensorFile:
    """A safetensors file (checked whole by the safetensors library first) read one tensor at a time with plain
    reads, each tensor whole or only the rows this process holds of the parameter it is loaded into
    (parallel.local_rows: a process of an FSDP run reads 1/N of every sharded tensor). Not through a memory map:
    what is read becomes this process's own memory and nothing of the file stays mapped once it is closed, so a
    later save can free its disk space (a map of it would live as long as an optimizer state read from it)."""

    def __init__(self, path):
        try:
            with safe_open(path, framework='pt') as f:  # validates the header: names, dtypes, shapes, offsets
                self.names = list(f.keys())
            self.file = open(path, 'rb')
            length = struct.unpack('<Q', self.file.read(8))[0]
            self.header = json.loads(self.file.read(length))
        except (SafetensorError, OSError, ValueError) as e:
            raise _safetensors_error(path, e) from None
        self.start = 8 + length

    def shape(self, name):
        return tuple(self.header[name]['shape'])

    def read(self, name, like=None):
        """Tensor name; with like (the parameter it goes into, or a state of that parameter's shape), only the
        rows this process holds of it."""
        info = self.header[name]
        dtype = next(t for t, n in SAFETENSORS_DTYPES.items() if n == info['dtype'])
        shape, (begin, end) = list(info['shape']), info['data_offsets']
        rows = local_rows(like) if like is not None else None
        if rows is not None:
            row_bytes = (end - begin) // shape[0]
            begin, end, shape[0] = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes, rows[1] - rows[0]
        out = torch.empty(shape, dtype=dtype)
        self.file.seek(self.start + begin)
        if self.file.readinto(out.view(-1).view(torch.uint8).numpy()) != end - begin:
            raise OSError(f'{self.file.name} ends before its tensor {name}')
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _check_weights_fit(path, config):
    """Compare the weight file's header (names and shapes, read without the tensors) with the model the config
    describes (built on the meta device: no memory), before anything is allocated."""
    try:
        with safe_open(path, framework='pt') as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise _safetensors_error(path, e) from None
    blocks = {int(m.group(1)) for m in (re.match(r'transformer\.h\.(\d+)\.', name) for name in shapes) if m}
    wte = shapes.get('transformer.wte.weight', ())
    if len(blocks) != config.n_layer or wte != (config.vocab_size, config.n_embd):
        raise CheckpointError(f'{path} does not fit its checkpoint.json: it holds {len(blocks)} layers and an embedding '
                              f'of {wte}, the config says n_layer={config.n_layer}, vocab_size={config.vocab_size}, '
                              f'n_embd={config.n_embd}')
    with torch.device('meta'):
        expected = {name: tuple(t.shape) for name, t in model_state(GPT(config)).items()}
    wrong = sorted(name for name in expected.keys() | shapes.keys() if expected.get(name) != shapes.get(name))
    if wrong:
        raise CheckpointError(f'{path} does not fit its checkpoint.json: {wrong[0]} is {shapes.get(wrong[0], "missing")} '
                              f'in the file and {expected.get(wrong[0], "absent")} in the model the config describes')


def checkpoint_model(out_dir, ckpt, **overrides):
    """The model the checkpoint JSON ckpt describes, with the GPTConfig fields in overrides changed (dropout, when
    resuming with another), on the meta device: shapes, no memory. Its weight file's header is checked against it
    first, so a damaged or crafted checkpoint allocates nothing. Raises CheckpointError."""
    try:
        config = GPTConfig(**{**ckpt['model_args'], **overrides})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{out_dir}: {e}') from None
    _check_weights_fit(_tensors_file(out_dir, ckpt['model_file']), config)
    with torch.device('meta'):
        return GPT(config)


def _verify(f, ckpt, key):
    """Compare the SHA-256 of f (a TensorFile) with the one its checkpoint recorded at save (ckpt[key]): a flipped bit
    of a weight loads silently otherwise, or as NaN far from here."""
    if ckpt.get(key) is None:
        return
    digest, path = hashlib.sha256(), f.file.name
    f.file.seek(0)
    while chunk := f.file.read(2**24):
        digest.update(chunk)
    if digest.hexdigest() != ckpt[key]:
        raise CheckpointError(f'{path} is damaged: its SHA-256 differs from the one recorded when it was saved '
                              f'({key} in the checkpoint JSON); use another checkpoint, or train again')


def load_weights(out_dir, ckpt, model):
    """Fill model (checkpoint_model's, given storage: values unset, or sharded by FSDP) with the weights of the
    checkpoint ckpt, one tensor at a time: no more than the largest tensor is held beside the model, and each
    process of an FSDP run reads only its rows. The file is checked against its recorded SHA-256 first, and every
    weight must be finite. Raises CheckpointError."""
    path = _tensors_file(out_dir, ckpt['model_file'])
    try:
        with TensorFile(path) as f, torch.no_grad():  # opened first: a save deleting the file now cannot take it
            _verify(f, ckpt, 'model_sha256')
            for name, p in model.named_parameters():  # a tied head is the embedding: stored once, loaded once
                value = f.read(name, p)
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise CheckpointError(f'{path} is damaged: its weight {name} holds NaN or inf; use another '
                                          f'checkpoint, or train again')
                copy_local(p, value)
    except OSError as e:
        raise _safetensors_error(path, e) from None


READ_ATTEMPTS = 50  # times a reader takes the newer checkpoint when a run replaced the one it was reading


def _load_checkpoint_model(out_dir, device='cpu', name=CHECKPOINT_NAME, **overrides):
    """Rebuild the model saved in out_dir (the checkpoint that name, checkpoint.json or best.json, describes), with
    any GPTConfig fields in overrides changed. Returns (model, its JSON). Raises CheckpointError.
    A run that saves often deletes the previous weights while a reader is still on its way to them: when reading
    fails and the JSON has moved on meanwhile, the reader takes the newer checkpoint, as long as the run goes on."""
    ckpt = read_checkpoint(out_dir, name)
    for attempt in range(READ_ATTEMPTS):
        try:
            model = checkpoint_model(out_dir, ckpt, **overrides).to_empty(device='cpu')
            load_weights(out_dir, ckpt, model)
            return model.to(device), ckpt
        except CheckpointError:
            newer = read_checkpoint(out_dir, name)
            if newer == ckpt or attempt == READ_ATTEMPTS - 1:
                raise  # nothing moved: the checkpoint itself is wrong
            ckpt = newer


def _check_process_state(state):
    """Raise ValueError or TypeError unless state (one process's, from load_training_state) holds generator states
    this process can take: numpy's PCG64 batch sampler (rank0's data_rng) and torch's byte tensors."""
    if state.get('data_rng') is not None:
        np.random.default_rng().bit_generator.state = state['data_rng']  # raises for another generator or a bad state
    for key in ('torch', 'cuda'):
        t = state.get(key)
        if t is not None and (t.dtype != torch.uint8 or t.dim() != 1 or
                              (key == 'torch' and t.numel() != torch.get_rng_state().numel())):
            raise ValueError(f'the {key} generator state is a {t.dtype} tensor of shape {tuple(t.shape)}, not bytes '
                             f'as this PyTorch saves them')


def load_training_state(out_dir, ckpt, optimizer):
    """Restore the optimizer's state (moments, momentum buffers, step counts) into optimizer, keeping the
    settings it was built with (learning rates, betas, weight decay, momentum): a resumed run may change them.
    Over sharded parameters (FSDP) each process reads only its rows of each state.
    Returns what each process saved to continue exactly (see save_checkpoint's ranks), rank 0 first."""
    if 'optimizer_file' not in ckpt:
        raise CheckpointError(f'{out_dir}/{CHECKPOINT_NAME} names no optimizer file: it cannot be resumed, only sampled')
    path = _tensors_file(out_dir, ckpt['optimizer_file'])
    params = [p for group in optimizer.param_groups for p in group['params']]
    saved = ckpt.get('training_state') or {}
    try:
        with TensorFile(path) as f:
            _verify(f, ckpt, 'optimizer_sha256')
            tensors = {}
            for key in f.names:
                param = None
                if key.startswith('state.'):  # state.<param index>.<name>: a state of the param's shape is sharded as it is
                    param = params[int(key.split('.')[1])]
                    if f.shape(key) != tuple(param.shape):
                        param = None
                value = f.read(key, param)
                tensors[key] = value if param is None else like(param, value)
        if ckpt.get('optimizer') is not None:
            settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
            optimizer.load_state_dict(_join_optimizer_state(tensors, ckpt['optimizer']))
            for group, setting in zip(optimizer.param_groups, settings):
                group.update(setting)
        if 'ranks' not in saved:  # written before every process saved its own state: one process, rank 0's
            return [dict(data_rng=saved.get('data_rng'), torch=tensors['rng.torch'],
                         **({'cuda': tensors['rng.cuda']} if 'rng.cuda' in tensors else {}))]
        ranks = [dict(state) for state in saved['ranks']]
        for key, value in tensors.items():
            if key.startswith('rank'):
                rank, name = key[len('rank'):].split('.', 1)
                ranks[int(rank)][name] = value
        if not ranks or any('torch' not in r for r in ranks):
            raise KeyError('rng.torch')
        for state in ranks:
            _check_process_state(state)
        if not isinstance(saved.get('evals_since_best', 0), int) or saved.get('evals_since_best', 0) < 0:
            raise TypeError(f"evals_since_best must be a whole number, not {saved['evals_since_best']!r:.60}")
        if not isinstance(saved.get('scaler') or {}, dict):
            raise TypeError(f"scaler must be an object, not {saved['scaler']!r:.60}")
    except OSError as e:
        raise _safetensors_error(path, e) from None
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f'{path} or {CHECKPOINT_NAME} is damaged: the optimizer state or random generators '
                              f'do not load ({type(e).__name__}: {e}); sample from it, or train afresh') from None
    return ranks


def restore(out_dir, model, optimizer, scaler):
    """Put a running model (checkpoint_model's, or sharded), its optimizer and GradScaler back in the state of the
    checkpoint in out_dir, in place, each process reading its rows as a resume does; returns its checkpoint.json.
    Raises CheckpointError."""
    ckpt = read_checkpoint(out_dir)
    load_weights(out_dir, ckpt, model)
    load_training_state(out_dir, ckpt, optimizer)
    if ckpt['training_state'].get('scaler'):
        scaler.load_state_dict(ckpt['training_state']['scaler'])
    return ckpt


# ---------------------------------------------------------------------------- a model to run

class LoadedModel(NamedTuple):
    model: GPT
    tokenizer: Optional[dict]  # the tokenizer's description; None for weights that came without one
    checkpoint: Optional[dict]  # checkpoint.json, for a checkpoint of ours; None for Hugging Face weights


def is_hf_source(source):
    """Whether source names GPT-2 weights for transformers to load (a GPT-2 name, or a folder with a Hugging Face
    config.json and no checkpoint.json) rather than a checkpoint folder of ours."""
    return source in GPT2_NAMES or (os.path.isdir(source) and os.path.exists(os.path.join(source, 'config.json'))
                                    and not os.path.exists(os.path.join(source, CHECKPOINT_NAME)))


def load_model(source, device='cpu', which='best', **overrides):
    """The one place that decides what a model to run is: source is a checkpoint folder of train.py, a GPT-2 name
    (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face GPT-2 folder. which: of a checkpoint folder, the
    'best' checkpoint (lowest val loss; the latest where none is recorded) or the 'latest'. overrides change
    GPTConfig fields (dropout). Returns LoadedModel(model, tokenizer description, checkpoint JSON or None); the
    model is in train mode, as nn.Module starts. Raises CheckpointError, or hf_gpt2.HFError."""
    if which not in ('best', 'latest'):
        raise CheckpointError(f"checkpoint={which!r}: use 'best' (the lowest val loss) or 'latest'")
    if is_hf_source(source):
        model, tokenizer = load_gpt2(source, **overrides)
        return LoadedModel(model.train().to(device), tokenizer, None)
    if not os.path.exists(source):
        raise CheckpointError(f"{source} does not exist: pass a checkpoint folder of train.py, a GPT-2 name "
                              f"({', '.join(GPT2_NAMES)}) or a Hugging Face GPT-2 folder")
    best = which == 'best' and os.path.exists(os.path.join(source, BEST_NAME))
    model, ckpt = _load_checkpoint_model(source, device, BEST_NAME if best else CHECKPOINT_NAME, **overrides)
    return LoadedModel(model, ckpt.get('tokenizer'), ckpt)
