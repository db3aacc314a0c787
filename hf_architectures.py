"""
Our GPT as a transformers architecture other than GPT-2 (hf_gpt2.py has GPT-2): which family holds which of
model.py's switches, and its config and weights for ours. Each family computes what ours does, to float rounding:

    Llama       rotary positions, RMSNorm, SwiGLU
    Arcee       rotary positions, RMSNorm, an ungated MLP (gelu, gelu_tanh, relu, relu2, silu)
    Qwen3       rotary positions, RMSNorm, QK-norm (RMSNorm), SwiGLU; no biases
    VaultGemma  rotary positions, RMSNorm, SwiGLU, logit soft-capping; no biases (Gemma's norms scale by 1 + weight
                and its embedding by sqrt(n_embd): the export stores weight - 1 and an embedding divided by it, so
                a tied head is written untied)
    Persimmon   rotary positions, LayerNorm, QK-norm (LayerNorm), an ungated MLP

family_for(config) picks the first that holds every switch of a checkpoint; a combination none holds (logit
soft-capping with QK-norm, say: only the Gemma family caps logits, and its QK-norm comes with norms after each
block that ours lacks) raises ValueError naming what the nearest family lacks. This module imports nothing of ours.
"""
import math

EPS = 1e-5  # model.Norm's epsilon
UNGATED = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'relu': 'relu', 'relu2': 'relu2', 'silu': 'silu'}


def _lacks(config, norm, qk_norm, gated, softcap=False, bias=True):
    """What a rotary family with these parts cannot hold of config. qk_norm: True (always has it), False (never)
    or None (either, by its config); gated: SwiGLU (True) or an ungated MLP (False)."""
    lacks = []
    if config.position != 'rotary':
        lacks.append(f'position={config.position!r}')
    if config.norm != norm:
        lacks.append(f'norm={config.norm!r}')
    if qk_norm is not None and config.qk_norm != qk_norm:
        lacks.append(f'qk_norm={config.qk_norm}')
    if gated and config.activation != 'swiglu' or not gated and config.activation not in UNGATED:
        lacks.append(f'activation={config.activation!r}')
    if config.logit_softcap and not softcap:
        lacks.append(f'logit_softcap={config.logit_softcap}')
    if config.bias and not bias:
        lacks.append('bias=True')
    return lacks


class Family:
    """One transformers architecture: name (its model_type), what it lacks of a config, its config for ours."""
    name = ''

    def lacks(self, config):
        raise NotImplementedError

    def config_args(self, config):
        raise NotImplementedError

    def hf_config(self, config, vocab_size, eos_id):
        from transformers import AutoConfig
        head_dim = config.n_embd // config.n_head
        rope = {'rope_type': 'default', 'rope_theta': config.rope_base}
        args = dict(vocab_size=vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                    num_attention_heads=config.n_head, max_position_embeddings=config.block_size,
                    intermediate_size=hidden_size(config), tie_word_embeddings=config.tie_weights,
                    rope_parameters=rope, attention_dropout=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
                    pad_token_id=None, head_dim=head_dim, num_key_value_heads=config.n_head,
                    rms_norm_eps=EPS, attention_bias=config.bias)
        args.update(self.config_args(config))
        return AutoConfig.for_model(self.name, **args)

    def state(self, state, config, vocab_size):
        """Our state dict (float32, on the CPU) as the family's, the embedding and head cut to vocab_size."""
        raise NotImplementedError


def hidden_size(config):
    """The width of the MLP's hidden layer (model.MLP's)."""
    hidden = 4 * config.n_embd
    return 2 * (int(2 * hidden / 3) // 2) if config.activation == 'swiglu' else hidden


class LlamaLike(Family):
    """Llama's layout: separate q, k and v projections, gate/up/down MLP projections, model.norm."""
    post_attention_norm = 'post_attention_layernorm'

    def norm_weight(self, weight):
        return weight

    def embedding(self, weight, config):
        return weight

    def state(self, state, config, vocab_size):
        out = {'model.embed_tokens.weight': self.embedding(state['transformer.wte.weight'][:vocab_size], config),
               'model.norm.weight': self.norm_weight(state['transformer.ln_f.weight']),
               'lm_head.weight': state['lm_head.weight'][:vocab_size]}  # (tied, the embedding's values again)
        for i in range(config.n_layer):
            ours, theirs = f'transformer.h.{i}.', f'model.layers.{i}.'
            out[theirs + 'input_layernorm.weight'] = self.norm_weight(state[ours + 'ln_1.weight'])
            out[theirs + self.post_attention_norm + '.weight'] = self.norm_weight(state[ours + 'ln_2.weight'])
            for kind in ('weight', 'bias') if config.bias else ('weight',):
                for name, part in zip('qkv', state[ours + f'attn.c_attn.{kind}'].chunk(3)):
                    out[theirs + f'self_attn.{name}_proj.{kind}'] = part
                out[theirs + f'self_attn.o_proj.{kind}'] = state[ours + f'attn.c_proj.{kind}']
                fc = state[ours + f'mlp.c_fc.{kind}']
                if config.activation == 'swiglu':
                    out[theirs + f'mlp.gate_proj.{kind}'], out[theirs + f'mlp.up_proj.{kind}'] = fc.chunk(2)
                else:
                    out[theirs + f'mlp.up_proj.{kind}'] = fc
                out[theirs + f'mlp.down_proj.{kind}'] = state[ours + f'mlp.c_proj.{kind}']
            if config.qk_norm:
                for name in 'qk':
                    out[theirs + f'self_attn.{name}_norm.weight'] = self.norm_weight(state[ours + f'attn.{name}_norm.weight'])
        return out


class Llama(LlamaLike):
    name = 'llama'

    def lacks(self, config):
        return _lacks(config, 'rmsnorm', qk_norm=False, gated=True)

    def config_args(self, config):
        return dict(hidden_act='silu', mlp_bias=config.bias)


class Arcee(LlamaLike):
    name = 'arcee'

    def lacks(self, config):
        return _lacks(config, 'rmsnorm', qk_norm=False, gated=False)

    def config_args(self, config):
        return dict(hidden_act=UNGATED[config.activation], mlp_bias=config.bias)


class Qwen3(LlamaLike):
    name = 'qwen3'

    def lacks(self, config):
        return _lacks(config, 'rmsnorm', qk_norm=True, gated=True, bias=False)

    def config_args(self, config):
        return dict(hidden_act='silu', use_sliding_window=False, layer_types=['full_attention'] * config.n_layer)


class VaultGemma(LlamaLike):
    name = 'vaultgemma'
    post_attention_norm = 'pre_feedforward_layernorm'

    def lacks(self, config):
        return _lacks(config, 'rmsnorm', qk_norm=False, gated=True, softcap=True, bias=False)

    def config_args(self, config):
        return dict(hidden_activation='silu', query_pre_attn_scalar=config.n_embd // config.n_head,
                    final_logit_softcapping=config.logit_softcap or None, attn_logit_softcapping=None,
                    # every layer attends to the whole context (VaultGemma builds a sliding-window mask all the same)
                    sliding_window=config.block_size, layer_types=['full_attention'] * config.n_layer,
                    tie_word_embeddings=False)

    def norm_weight(self, weight):
        return weight - 1.0  # Gemma's RMSNorm scales by 1 + weight

    def embedding(self, weight, config):
        return weight / math.sqrt(config.n_embd)  # Gemma multiplies the embedding by sqrt(n_embd)


class Persimmon(Family):
    name = 'persimmon'

    def lacks(self, config):
        return _lacks(config, 'layernorm', qk_norm=None, gated=False)

    def config_args(self, config):
        rope = {'rope_type': 'default', 'rope_theta': config.rope_base, 'partial_rotary_factor': 1.0}
        return dict(hidden_act=UNGATED[config.activation], layer_norm_eps=EPS, qk_layernorm=config.qk_norm,
                    rope_parameters=rope, hidden_dropout=0.0)

    def state(self, state, config, vocab_size):
        """Persimmon has biases everywhere (ours without them are zero) and one query_key_value projection whose rows
        go head by head (each head's q, k, v), where ours hold all queries, then all keys, then all values."""
        import torch
        heads, head_dim, C = config.n_head, config.n_embd // config.n_head, config.n_embd

        def with_bias(name):
            weight = state[name + '.weight']
            return weight, state.get(name + '.bias', torch.zeros(weight.size(0)))

        out = {'model.embed_tokens.weight': state['transformer.wte.weight'][:vocab_size],
               'lm_head.weight': state['lm_head.weight'][:vocab_size]}
        out['model.final_layernorm.weight'], out['model.final_layernorm.bias'] = with_bias('transformer.ln_f')
        for i in range(config.n_layer):
            ours, theirs = f'transformer.h.{i}.', f'model.layers.{i}.'
            names = (('ln_1', 'input_layernorm'), ('ln_2', 'post_attention_layernorm'), ('attn.c_proj', 'self_attn.dense'),
                     ('mlp.c_fc', 'mlp.dense_h_to_4h'), ('mlp.c_proj', 'mlp.dense_4h_to_h'))
            if config.qk_norm:
                names += (('attn.q_norm', 'self_attn.q_layernorm'), ('attn.k_norm', 'self_attn.k_layernorm'))
            for a, b in names:
                out[theirs + b + '.weight'], out[theirs + b + '.bias'] = with_bias(ours + a)
            weight, bias = with_bias(ours + 'attn.c_attn')
            out[theirs + 'self_attn.query_key_value.weight'] = weight.view(3, heads, head_dim, C).transpose(0, 1).reshape(3 * C, C)
            out[theirs + 'self_attn.query_key_value.bias'] = bias.view(3, heads, head_dim).transpose(0, 1).reshape(3 * C)
        return out


FAMILIES = (Llama(), Arcee(), Qwen3(), VaultGemma(), Persimmon())


def family_for(config, others=()):
    """The first family of FAMILIES that holds every switch of config (a model.GPTConfig); ValueError naming what the
    nearest one lacks where none does. others: (name, what it lacks) of other candidates, for that message."""
    lacks = dict(others, **{family.name: family.lacks(config) for family in FAMILIES})
    for family in FAMILIES:
        if not lacks[family.name]:
            return family
    nearest = min(lacks, key=lambda name: len(lacks[name]))
    missing = lacks[nearest]
    raise ValueError(f"no transformers architecture has {' with '.join(missing)} together with the rest of this "
                     f"model: the nearest, {nearest}, lacks {'it' if len(missing) == 1 else 'them'}")
