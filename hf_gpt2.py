"""
GPT-2 weights from and to Hugging Face transformers.

    load_gpt2('gpt2')             OpenAI's GPT-2 124M (or gpt2-medium, gpt2-large, gpt2-xl), fetched by transformers
    load_gpt2('path/to/folder')   any local GPT-2-architecture folder (config.json + weights), e.g. ruGPT-3
    export_model(model, tokenizer_description, 'folder')   the reverse: a folder that
                                  transformers.pipeline('text-generation', model='folder') runs as is; GPT-2's
                                  architecture, or for the modern switches another family's (hf_architectures.py)

Our parameter names are GPT-2's, but GPT-2 (and so Hugging Face) keeps its attention and MLP weights in
Conv1D layers, which store the transpose of an nn.Linear's weight. A config we cannot represent exactly
(another activation, another LayerNorm epsilon, ...) is refused rather than approximated.
"""
import base64
import contextlib
import inspect
import json
import os
import tempfile

import torch

from hf_architectures import family_for
from model import GPT, GPTConfig
from tokenizer import CHAT_ROLES, ChatTokenizer, TokenizerError, load_tokenizer

# the short names resolve to OpenAI's checkpoints on the Hugging Face hub
GPT2_NAMES = {'gpt2': 'openai-community/gpt2', 'gpt2-medium': 'openai-community/gpt2-medium',
              'gpt2-large': 'openai-community/gpt2-large', 'gpt2-xl': 'openai-community/gpt2-xl'}
ACTIVATION_FROM_HF = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_python_tanh': 'gelu_tanh',
                      'gelu': 'gelu', 'gelu_python': 'gelu', 'relu': 'relu', 'relu2': 'relu2',
                      'silu': 'silu', 'swish': 'silu'}
ACTIVATION_TO_HF = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu', 'relu2': 'relu2', 'silu': 'silu'}
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# our tokenizer's description, written beside the weights, so a folder we exported loads back exactly
DESCRIPTION_FILE = 'nanogpt_tokenizer.json'
EPS = 1e-5  # model.Norm's epsilon


class HFError(Exception):
    """A Hugging Face model that cannot be loaded or a model that cannot be exported; one-line message."""


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and warnings while we call it: we check what it loads ourselves
    (e.g. it warns about GPT2Config's default token ids even when they are overridden)."""
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def config_from_hf(hf, source, dropout=0.0):
    """Our GPTConfig for a transformers GPT2Config, or HFError naming the setting we cannot represent."""
    problems = []
    if hf.activation_function not in ACTIVATION_FROM_HF:
        problems.append(f'activation_function={hf.activation_function!r}')
    if abs(hf.layer_norm_epsilon - EPS) > 1e-12:
        problems.append(f'layer_norm_epsilon={hf.layer_norm_epsilon} (ours is {EPS})')
    if hf.n_inner not in (None, 4 * hf.n_embd):
        problems.append(f'n_inner={hf.n_inner} (ours is 4 * n_embd)')
    if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
        problems.append('a non-standard attention scaling')
    if getattr(hf, 'add_cross_attention', False):
        problems.append('cross-attention')
    if problems:
        raise HFError(f"{source}: cannot represent {', '.join(problems)} in this GPT exactly")
    try:
        return GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer, n_head=hf.n_head,
                         n_embd=hf.n_embd, dropout=dropout, bias=True,
                         activation=ACTIVATION_FROM_HF[hf.activation_function],
                         tie_weights=bool(getattr(hf, 'tie_word_embeddings', True)))
    except ValueError as e:
        raise HFError(f'{source}: {e}') from None


def _read_hf_config(name):
    """The transformers config of a GPT-2 name or folder; HFError for anything that is not GPT-2."""
    source = GPT2_NAMES.get(name, name)
    if name not in GPT2_NAMES:
        if not os.path.isdir(name):
            raise HFError(f"init_from={name!r} is neither a GPT-2 name ({', '.join(GPT2_NAMES)}) nor a folder")
        path = os.path.join(name, 'config.json')
        if not os.path.exists(path):
            raise HFError(f'{name} holds neither a checkpoint (checkpoint.json) nor a Hugging Face model (config.json)')
        try:
            with open(path, encoding='utf-8') as f:
                model_type = json.load(f).get('model_type')
        except (OSError, ValueError) as e:
            raise HFError(f'cannot read {path}: {_first_line(e)}') from None
        if model_type != 'gpt2':
            raise HFError(f"{name} holds a {model_type or 'unknown'} model, not GPT-2: only GPT-2-architecture "
                          f"folders (model_type 'gpt2' in config.json) can be loaded")
    from transformers import AutoConfig  # only now: importing transformers takes seconds
    try:
        return from_cache_or_hub(AutoConfig.from_pretrained, source), source
    except HFError:
        raise
    except Exception as e:  # OSError without network, ValueError, ...: all mean the same here
        raise HFError(f'cannot load the config of {source}: {_first_line(e).rstrip(".")}; GPT-2 weights are downloaded on '
                      f'first use: connect once, or pass a local folder') from None


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub answers a connection now (False in offline mode). Behind a proxy, the proxy
    decides: True."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)), timeout).close()
        return True
    except OSError:
        return False


def from_cache_or_hub(load, source, **kwargs):
    """load(source, **kwargs) (a transformers from_pretrained) from the local cache, else from the hub, but only if
    the hub answers: offline, transformers would retry for tens of seconds before failing; this fails at once."""
    if os.path.isdir(source):
        return load(source, **kwargs)
    try:
        with quiet_transformers():
            return load(source, local_files_only=True, **kwargs)
    except OSError:
        pass  # not in the cache
    if not hub_reachable():
        raise HFError(f'{source} is not in the local Hugging Face cache and the hub cannot be reached (offline?): '
                      f'connect once to download it, or pass a local folder')
    return load(source, **kwargs)


def tokenizer_of(name):
    """The tokenizer description that goes with GPT-2 weights: tiktoken's 'gpt2' for OpenAI's, for a
    folder the description we exported with it, else its Hugging Face tokenizer files; None if it has none."""
    if name in GPT2_NAMES:
        return {'kind': 'tiktoken', 'name': 'gpt2'}
    folder = os.path.abspath(name)
    saved = os.path.join(folder, DESCRIPTION_FILE)
    if os.path.exists(saved):
        with open(saved, encoding='utf-8') as f:
            description = json.load(f)
        if description.get('kind') == 'hf':  # the tokenizer files travel with the folder
            description['name'] = folder
        return description
    files = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'tokenizer.model')
    if any(os.path.exists(os.path.join(folder, f)) for f in files):
        return {'kind': 'hf', 'name': folder}
    return None


def state_from_hf(hf_state):
    """transformers GPT2LMHeadModel weights -> ours (same names; Conv1D weights transposed)."""
    state = {}
    for key, value in hf_state.items():
        if key.endswith(('.attn.bias', '.attn.masked_bias')):
            continue  # causal-mask buffers of older transformers versions, not weights
        state[key] = value.t().contiguous() if key.endswith(CONV1D) else value
    return state


def load_gpt2(name, dropout=0.0):
    """GPT-2 weights as our GPT (float32, eval mode) and their tokenizer's description (or None).
    name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local folder. Raises HFError."""
    hf_config, source = _read_hf_config(name)
    config = config_from_hf(hf_config, name, dropout)
    from transformers import GPT2LMHeadModel
    try:
        with quiet_transformers():
            hf_model = from_cache_or_hub(GPT2LMHeadModel.from_pretrained, source, dtype=torch.float32)
    except HFError:
        raise
    except Exception as e:
        raise HFError(f'cannot load the weights of {source}: {_first_line(e)}') from None
    with torch.device('meta'):  # storage below, values from the state dict: none drawn only to be overwritten
        model = GPT(config)
    model.to_empty(device='cpu')
    missing, unexpected = model.load_state_dict(state_from_hf(hf_model.state_dict()), strict=False)
    missing = [k for k in missing if not (k == 'lm_head.weight' and config.tie_weights)]
    if missing or unexpected:
        raise HFError(f'{source}: weights do not match a GPT-2 of its config (missing {missing[:3]}, unexpected {unexpected[:3]})')
    return model.eval(), tokenizer_of(name)


# ---------------------------------------------------------------------------- export

def gpt2_lacks(config):
    """What GPT-2 cannot hold of our GPTConfig (empty: it exports as GPT-2)."""
    problems = []
    if config.position != 'learned':
        problems.append(f'position={config.position!r}')
    if config.norm != 'layernorm':
        problems.append(f'norm={config.norm!r}')
    if config.qk_norm:
        problems.append('qk_norm=True')
    if config.activation not in ACTIVATION_TO_HF:
        problems.append(f'activation={config.activation!r}')
    if config.logit_softcap:
        problems.append(f'logit_softcap={config.logit_softcap}')
    return problems


def hf_config_for(config, vocab_size, eot_id=None):
    """A transformers GPT2Config for our GPTConfig (gpt2_lacks(config) must be empty)."""
    from transformers import GPT2Config
    return GPT2Config(vocab_size=vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, n_inner=None,
                      activation_function=ACTIVATION_TO_HF[config.activation], resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, layer_norm_epsilon=EPS, tie_word_embeddings=config.tie_weights,
                      bos_token_id=eot_id, eos_token_id=eot_id)


def state_to_hf(model, vocab_size):
    """Our weights -> transformers GPT2LMHeadModel's: Conv1D weights transposed, the embedding and head cut
    to vocab_size (the padding rows are no tokens), zeros for the biases a bias=False model lacks."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for key in ('transformer.wte.weight', 'lm_head.weight'):
        state[key] = state[key][:vocab_size]
    if model.config.tie_weights:
        state['lm_head.weight'] = state['transformer.wte.weight']
    hf_state = {k: v.t() if k.endswith(CONV1D) else v for k, v in state.items()}
    if not model.config.bias:  # a LayerNorm or Linear without bias is one with a zero bias
        for key, value in list(hf_state.items()):
            if key.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight')):
                hf_state[key[:-len('weight')] + 'bias'] = torch.zeros_like(value)
            elif key.endswith(CONV1D):
                hf_state[key[:-len('weight')] + 'bias'] = torch.zeros(value.size(1))
    return {k: v.contiguous() for k, v in hf_state.items()}


def architecture_for(config):
    """None where our GPTConfig is GPT-2's, else the family of hf_architectures.py that holds every switch; HFError
    naming what is missing where none does."""
    lacks = gpt2_lacks(config)
    if not lacks:
        return None
    try:
        return family_for(config, others=[('gpt2', lacks)])
    except ValueError as e:
        raise HFError(f'cannot export: {e}') from None


def hf_model_for(model, vocab_size, eos_id, family):
    """A transformers model holding model's weights, of GPT-2's architecture (family None) or the family's."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    if family is None:
        hf_model = GPT2LMHeadModel(hf_config_for(model.config, vocab_size, eos_id))
        state, buffers = state_to_hf(model, vocab_size), ('.attn.bias', '.attn.masked_bias')
    else:
        hf_model = AutoModelForCausalLM.from_config(family.hf_config(model.config, vocab_size, eos_id))
        ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        state, buffers = {k: v.contiguous() for k, v in family.state(ours, model.config, vocab_size).items()}, ()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(buffers)]
    if missing or unexpected:
        raise HFError(f'internal: weights do not map onto {type(hf_model).__name__} (missing {missing[:3]}, '
                      f'unexpected {unexpected[:3]})')
    return hf_model


def export_model(model, tokenizer_description, folder, tokenizer_folder=None):
    """Write model (a GPT) as a Hugging Face folder: config.json, model.safetensors, the tokenizer's files where its
    kind has them, and our tokenizer description (DESCRIPTION_FILE). The architecture is GPT-2's where the model is
    GPT-2's, else another family's (architecture_for). tokenizer_folder: where the description was found (the
    checkpoint folder), for a tokenizer's own file. Returns notes for the user (e.g. that a tokenizer could not be
    exported). Raises HFError."""
    family = architecture_for(model.config)  # first: a model that cannot be exported is refused at once
    tokenizer = None
    if tokenizer_description is not None:
        try:
            tokenizer = load_tokenizer(tokenizer_description, tokenizer_folder)
        except TokenizerError as e:
            raise HFError(f'cannot load the checkpoint\'s tokenizer to export it: {e}') from None
    vocab_size = model.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size <= vocab_size:
        vocab_size = tokenizer.vocab_size
    with quiet_transformers():
        # a chat model's text ends at its end of turn: transformers' generate stops there
        eos = tokenizer.end_id if isinstance(tokenizer, ChatTokenizer) else tokenizer.eot_id if tokenizer else None
        hf_model = hf_model_for(model, vocab_size, eos, family)
        os.makedirs(folder, exist_ok=True)
        hf_model.save_pretrained(folder)  # safetensors
    notes = []
    if tokenizer is None:
        notes.append('the checkpoint records no tokenizer: only the weights and config were exported')
        return notes
    hf_tokenizer = _hf_tokenizer(tokenizer, tokenizer_description)
    if hf_tokenizer is None:
        notes.append(f"a '{tokenizer.kind}' tokenizer has no Hugging Face equivalent: transformers gets the weights "
                     f"and config only (this repository's scripts read {DESCRIPTION_FILE})")
    else:
        hf_tokenizer.save_pretrained(folder)
    saved = dict(tokenizer_description)
    if saved.get('kind') == 'hf':
        saved['name'] = '.'  # its files are in this folder now
    with open(os.path.join(folder, DESCRIPTION_FILE), 'w', encoding='utf-8') as f:
        json.dump(saved, f, ensure_ascii=False)
    return notes


def chat_template(special_tokens):
    """Our chat template (tokenizer.ChatTokenizer) as the Jinja template transformers' apply_chat_template runs:
    each message is its role's marker, its content and the end-of-turn marker; add_generation_prompt opens the
    assistant's turn."""
    markers = json.dumps({role: special_tokens[role] for role in CHAT_ROLES}, ensure_ascii=False)
    return ("{% for message in messages %}{{ " + markers + "[message['role']] + message['content'] + "
            + json.dumps(special_tokens['end'], ensure_ascii=False) + " }}{% endfor %}"
            "{% if add_generation_prompt %}{{ " + json.dumps(special_tokens['assistant'], ensure_ascii=False)
            + " }}{% endif %}")


def _hf_tokenizer(tokenizer, description):
    """A transformers tokenizer that encodes and decodes like ours, or None where none can. A chat model's also
    renders conversations as ours does (chat_template) and ends a reply at the end of turn (eos_token)."""
    special = description.get('special_tokens')
    hf_tokenizer = _hf_base_tokenizer(tokenizer.base if special else tokenizer, description)
    if hf_tokenizer is None or not special:
        return hf_tokenizer
    if tokenizer.added:  # our vocabulary grew by the markers: the same ids after the base's
        from tokenizers import AddedToken
        hf_tokenizer.add_special_tokens({'additional_special_tokens': [
            AddedToken(special[role], special=True, normalized=False) for role in tokenizer.added]})
        ids = {role: hf_tokenizer.convert_tokens_to_ids(special[role]) for role in tokenizer.added}
        if ids != {role: tokenizer.marker_ids[role][0] for role in tokenizer.added}:
            raise HFError(f'internal: the chat markers get ids {ids} in the exported tokenizer, not ours')
    hf_tokenizer.chat_template = chat_template(special)
    hf_tokenizer.eos_token = special['end']
    # the template's markers must be read as the tokens they are (the rendered conversation is text), so a chat
    # export does not split special tokens: unlike our encode(), text typed with a marker in it would give its id
    hf_tokenizer.split_special_tokens = False
    return hf_tokenizer


def _hf_base_tokenizer(tokenizer, description):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    # like ours: decode gives the text back as is; '<|endoftext|>' typed in a prompt is text, not the token
    options = dict(clean_up_tokenization_spaces=False, split_special_tokens=True)
    kind = description['kind']
    if kind == 'hf':
        return tokenizer.transformers_tokenizer()
    if kind == 'char':
        # one token per character: split text into single characters, look each up, join them back
        backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(description['chars'])}, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
        backend.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(tokenizer_object=backend, **options)
    if kind == 'bpe':
        backend = Tokenizer.from_str(description['tokenizer_json'])
    elif kind == 'tiktoken':
        import tiktoken
        backend = tiktoken_backend(tiktoken.get_encoding(description['name']))
    else:
        return None  # word: its decoding rules (spaces between tokens, none around newlines) have no equivalent
    eot = tokenizer.decode([tokenizer.eot_id]) if tokenizer.eot_id is not None else None
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot, bos_token=eot, **options)


def tiktoken_backend(encoding):
    """A tiktoken Encoding as a Hugging Face `tokenizers` BPE, by transformers' own converter."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    # the converter reads tiktoken's file format (base64 token, rank); tiktoken keeps its ranks and
    # pattern in private attributes, which transformers' own tiktoken integration reads too
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'ranks.tiktoken')
        with open(path, 'wb') as f:
            for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1]):
                f.write(base64.b64encode(token) + b' ' + str(rank).encode() + b'\n')
        # transformers 5 renamed additional_special_tokens to extra_special_tokens
        special = ('extra_special_tokens' if 'extra_special_tokens' in inspect.signature(TikTokenConverter).parameters
                   else 'additional_special_tokens')
        return TikTokenConverter(vocab_file=path, pattern=encoding._pat_str,
                                 **{special: encoding._special_tokens}).converted()
