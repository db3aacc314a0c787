"""
Checkpoints without pickle. A checkpoint in out_dir is three files:

    checkpoint.json              model config, training config, iteration, best val loss, the tokenizer's
                                 description, and which of the two files below belong to it
    model-<iter>.safetensors     the weights
    optimizer-<iter>.safetensors the optimizer's tensors and the random number generators' states

The weight files are written first and checkpoint.json last, each to a temporary name then renamed, so
a crash at any moment leaves the previous complete checkpoint in place. Older weight files are removed
only after the new checkpoint.json is in place.
"""
import glob
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from dataset import atomic_write_bytes, atomic_write_json
from model import GPT, GPTConfig

CHECKPOINT_NAME = 'checkpoint.json'


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or unreadable; the message says what to do."""


def model_state(model):
    """The weights to save: contiguous tensors, a tied head stored once (as the embedding)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop('lm_head.weight', None)
    return state


def save_tensors(path, tensors):
    data = save({k: v.cpu() for k, v in tensors.items()}, metadata={'format': 'pt'})
    atomic_write_bytes(path, lambda f: f.write(data))


def _split_optimizer_state(optimizer):
    """Optimizer state as (tensors for safetensors, everything else for JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, param_state in state['state'].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f'state.{pid}.{name}'] = value.contiguous()
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


def save_checkpoint(out_dir, model, optimizer, iter_num, best_val_loss, model_args, config, tokenizer,
                    training_state=None, ranks=None):
    """training_state: whatever else, JSON-able, an exact resume needs (the loss scale). ranks: what each
    process needs to continue exactly, rank 0 first: dicts of its random generators' states, tensors (its
    torch generators, into the optimizer file) or JSON-able values (its batch sampler). By default this
    process's rng_state()."""
    os.makedirs(out_dir, exist_ok=True)
    model_file, optimizer_file = f'model-{iter_num:07d}.safetensors', f'optimizer-{iter_num:07d}.safetensors'
    save_tensors(os.path.join(out_dir, model_file), model_state(model))
    opt_tensors, opt_json = ({}, None) if optimizer is None else _split_optimizer_state(optimizer)
    rank_json = []
    for rank, state in enumerate(ranks or [rng_state()]):
        rank_json.append({k: v for k, v in state.items() if not torch.is_tensor(v)})
        opt_tensors.update({f'rank{rank}.{k}': v for k, v in state.items() if torch.is_tensor(v)})
    save_tensors(os.path.join(out_dir, optimizer_file), opt_tensors)
    atomic_write_json(os.path.join(out_dir, CHECKPOINT_NAME), dict(
        format=1, iter_num=iter_num, best_val_loss=best_val_loss, model_args=model_args, config=config,
        tokenizer=tokenizer, model_file=model_file, optimizer_file=optimizer_file, optimizer=opt_json,
        training_state=dict(training_state or {}, ranks=rank_json),
    ))
    # only now is the new checkpoint complete: drop the files of earlier ones
    for path in glob.glob(os.path.join(out_dir, '*-*.safetensors')):
        if os.path.basename(path) not in (model_file, optimizer_file):
            os.remove(path)


def read_checkpoint(out_dir):
    """The checkpoint's JSON part; raises CheckpointError if out_dir holds no complete checkpoint."""
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    if not os.path.isdir(out_dir):
        raise CheckpointError(f'checkpoint folder {out_dir} does not exist: train one with `python train.py ... --out_dir={out_dir}`')
    if not os.path.exists(path):
        raise CheckpointError(f'no {CHECKPOINT_NAME} in {out_dir}: it holds no complete checkpoint (was training stopped before the first save?)')
    try:
        with open(path, encoding='utf-8') as f:
            ckpt = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f'cannot read {path}: {e}') from None
    for key in ('model_file', 'model_args'):
        if key not in ckpt:
            raise CheckpointError(f'{path} is incomplete: it lacks {key!r}')
    return ckpt


def _load_tensors(path, device):
    if not os.path.exists(path):
        raise CheckpointError(f'checkpoint file {path} is missing: the checkpoint is incomplete')
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'cannot read {path}: {e}') from None


def load_model(out_dir, device='cpu', **overrides):
    """Rebuild the model saved in out_dir, with any GPTConfig fields in overrides changed (dropout, when
    resuming with another). Returns (model, checkpoint JSON)."""
    ckpt = read_checkpoint(out_dir)
    model = GPT(GPTConfig(**{**ckpt['model_args'], **overrides}))
    state = _load_tensors(os.path.join(out_dir, ckpt['model_file']), 'cpu')
    missing, unexpected = model.load_state_dict(state, strict=False)
    if model.config.tie_weights:
        missing = [k for k in missing if k != 'lm_head.weight']
    if missing or unexpected:
        raise CheckpointError(f'{out_dir}: weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})')
    return model.to(device), ckpt


def load_training_state(out_dir, ckpt, optimizer):
    """Restore the optimizer's state (moments, momentum buffers, step counts) into optimizer, keeping the
    settings it was built with (learning rates, betas, weight decay, momentum): a resumed run may change them.
    Returns what each process saved to continue exactly (see save_checkpoint's ranks), rank 0 first."""
    tensors = _load_tensors(os.path.join(out_dir, ckpt['optimizer_file']), 'cpu')
    if ckpt.get('optimizer') is not None:
        settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
        optimizer.load_state_dict(_join_optimizer_state(tensors, ckpt['optimizer']))
        for group, setting in zip(optimizer.param_groups, settings):
            group.update(setting)
    saved = ckpt.get('training_state') or {}
    if 'ranks' not in saved:  # written before every process saved its own state: one process, rank 0's
        return [dict(data_rng=saved.get('data_rng'), torch=tensors['rng.torch'],
                     **({'cuda': tensors['rng.cuda']} if 'rng.cuda' in tensors else {}))]
    ranks = [dict(state) for state in saved['ranks']]
    for key, value in tensors.items():
        if key.startswith('rank'):
            rank, name = key[len('rank'):].split('.', 1)
            ranks[int(rank)][name] = value
    return ranks
