"""
The GPT language model, in one file.

By default it is GPT-2 exactly (learned positions, LayerNorm, GELU, tied embedding and head), so
OpenAI's and other GPT-2 weights load unchanged. Config switches bring in the modded-nanogpt speedrun
choices: rotary position embeddings, RMSNorm, QK-norm, ReLU² or SwiGLU MLPs, an untied head,
zero-initialised output projections and logit soft-capping.
References:
1) the official GPT-2 TensorFlow implementation: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
3) modded-nanogpt: https://github.com/KellerJordan/modded-nanogpt
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

ACTIVATIONS = ('gelu', 'gelu_tanh', 'relu', 'relu2', 'silu', 'swiglu')
POSITIONS = ('learned', 'rotary')
NORMS = ('layernorm', 'rmsnorm')


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304     # GPT-2's 50257 padded up to a multiple of 64 for speed
    real_vocab_size: int = 0    # the tokenizer's vocabulary: rows of vocab_size past it only pad (0: none do)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True           # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    activation: str = 'gelu'    # one of ACTIVATIONS ('gelu' is exact, GPT-2 itself used 'gelu_tanh')
    position: str = 'learned'   # 'learned' (GPT-2) or 'rotary'
    rope_base: float = 10000.0
    norm: str = 'layernorm'     # 'layernorm' or 'rmsnorm'
    qk_norm: bool = False       # normalise queries and keys per head before attention
    tie_weights: bool = True    # share the token embedding with the output head
    zero_init_proj: bool = False  # start residual output projections (and an untied head) at zero
    logit_softcap: float = 0.0  # if > 0, logits = cap * tanh(logits / cap)

    def __post_init__(self):
        """One-line ValueErrors for values that would fail later or mean nothing (a config may come from a file)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float) if f.type is float else f.type) or (f.type is not bool and isinstance(value, bool)):
                raise ValueError(f'{f.name}={value!r} must be {f.type.__name__}')
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, key) < 1:
                raise ValueError(f'{key}={getattr(self, key)} must be at least 1')
        if not 0 <= self.real_vocab_size <= self.vocab_size:
            raise ValueError(f'real_vocab_size={self.real_vocab_size} must be in [0, vocab_size={self.vocab_size}]')
        if not 0 <= self.dropout < 1:
            raise ValueError(f'dropout={self.dropout} must be in [0, 1)')
        if not (self.rope_base > 0 and self.logit_softcap >= 0):
            raise ValueError(f'rope_base={self.rope_base} must be positive, logit_softcap={self.logit_softcap} not negative')
        for key, allowed in (('activation', ACTIVATIONS), ('position', POSITIONS), ('norm', NORMS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.n_embd % self.n_head:
            raise ValueError(f'n_embd={self.n_embd} must be divisible by n_head={self.n_head}')
        if self.position == 'rotary' and (self.n_embd // self.n_head) % 2:
            raise ValueError('rotary embeddings need an even head size (n_embd // n_head)')


class Norm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1), or RMSNorm."""

    def __init__(self, ndim, kind='layernorm', bias=True):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias and kind == 'layernorm' else None

    def forward(self, x):
        if self.kind == 'rmsnorm':
            return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rotary_tables(head_dim, positions, base):
    """cos and sin of the rotation angles of each position, positions.shape + (head_dim // 2,): positions (T,) are
    shared by every row, (B, T) are each row's own (rows of a decoding batch stand at different lengths). Computed for
    the positions of each forward pass: a few hundred numbers, where tables for the whole block_size would be memory
    a checkpoint's config alone decides."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (B, nh, T, hs); rotate each (first half, second half) pair of channels by its position's angle
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # key, query, value projections for all heads, in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        head_dim = config.n_embd // config.n_head
        self.q_norm = Norm(head_dim, config.norm, bias=False) if config.qk_norm else None
        self.k_norm = Norm(head_dim, config.norm, bias=False) if config.qk_norm else None

    def forward(self, x, rotary=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:  # decoding: the cache stores the new keys and values and attends over all it holds
            y = cache.attend(self.layer, q, k, v)
        else:  # flash attention make GPU go brrrrr
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.activation = config.activation
        hidden = 4 * config.n_embd
        if self.activation == 'swiglu':
            # two input projections (gate and value) at 2/3 the width keep the parameter count of a 4x MLP
            hidden = 2 * (int(2 * hidden / 3) // 2)
            self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        else:
            self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        if self.activation == 'swiglu':
            gate, value = x.chunk(2, dim=-1)
            x = F.silu(gate) * value
        elif self.activation == 'relu2':
            x = F.relu(x).square()  # ReLU², from the Primer paper; cheap and better than GELU at small scale
        elif self.activation == 'gelu_tanh':
            x = F.gelu(x, approximate='tanh')
        else:
            x = getattr(F, self.activation)(x)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.norm, config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = Norm(config.n_embd, config.norm, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, cache=None):
        x = x + self.attn(self.ln_1(x), rotary, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=Norm(config.n_embd, config.norm, config.bias),
        ))
        if config.position == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # weight tying: the same matrix embeds tokens and scores them (https://paperswithcode.com/method/weight-tying)
            self.transformer.wte.weight = self.lm_head.weight

        # a training switch, not part of the architecture: keep only each block's input from the forward pass
        # and recompute the block's activations during backward (a block's worth of memory instead of all of
        # them, for about a third more compute), for long contexts or large batches
        self.activation_checkpointing = False
        if not self.lm_head.weight.is_meta:  # built on the meta device, the weights get their values later
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator=None, assign=None):
        """GPT-2's initialisation: matrices and embeddings N(0, 0.02), residual output projections N(0, 0.02 /
        sqrt(2 * n_layer)) so the residual stream's variance does not grow with depth (or zero with
        zero_init_proj: each block then starts as the identity, the speedrun's choice, as does an untied head),
        biases 0, norm gains 1. Each parameter is drawn whole on the CPU from generator (torch's global one by
        default), in the order of named_parameters: the weights depend on the generator's seed alone, not on
        the device nor on how the parameters are split over processes. assign(param, value) stores a value
        (FSDP keeps this process's rows of it); by default the whole value is copied in."""
        for name, p in self.named_parameters():
            value = torch.empty(p.shape, dtype=p.dtype)
            zero = self.config.zero_init_proj and (name.endswith('c_proj.weight') or name == 'lm_head.weight')
            if p.ndim == 1:  # a Linear's or a norm's bias, or a norm's gain
                value.fill_(1.0 if name.endswith('weight') else 0.0)
            elif zero:
                value.zero_()
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith('c_proj.weight') else 0.02
                value.normal_(0.0, std, generator=generator)
            if assign is None:
                p.copy_(value)
            else:
                assign(p, value)

    def to_empty(self, *, device, recurse=True):
        """nn.Module.to_empty (storage for a model built on the meta device, values unset), keeping the embedding
        and the head one tensor: nn.Module's gives each module a new tensor of its own."""
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_weights and self.lm_head.weight is not self.transformer.wte.weight:
            self.lm_head.weight = self.transformer.wte.weight
        return self

    def get_num_params(self, non_embedding=True):
        """Number of parameters. Position embeddings are left out by default; the token embedding is
        counted because, tied, it is also the output head."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.position == 'learned':
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, cache=None, last_only=False):
        """idx: (B, T) token ids. With targets (B, T), also returns the mean cross-entropy loss (ids of -1
        are ignored). With a cache (decoder.py's: the keys and values of the tokens already seen), idx holds
        only the tokens after those: the cache gives their positions (cache.positions(T): (T,), or (B, T) where each
        row has its own) and does every layer's attention (cache.attend: store the new keys and values, attend over
        all of them). last_only computes logits for the last position alone (all generation needs)."""
        B, T = idx.size()
        if cache is None and T > self.config.block_size:
            raise ValueError(f'cannot forward {T} positions, block_size is only {self.config.block_size}')
        x = self.transformer.wte(idx)
        positions = torch.arange(T, device=idx.device) if cache is None else cache.positions(T)
        rotary = None
        if self.config.position == 'learned':
            x = x + self.transformer.wpe(positions)
        else:
            rotary = rotary_tables(self.config.n_embd // self.config.n_head, positions, self.config.rope_base)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rotary, cache, use_reentrant=False)  # the recompute replays dropout's draws
            else:
                x = block(x, rotary, cache)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, [-1], :]
        logits = self.lm_head(x)
        if self.config.logit_softcap > 0:
            # soft-capping keeps logits in (-cap, cap) so no token gets an overconfident score early on
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        if 0 < self.config.real_vocab_size < self.config.vocab_size:
            # the rows that pad the vocabulary to a multiple of 64 are no tokens: they get no probability, so the loss
            # is over the tokenizer's vocabulary (as once exported, without them). In place: a copy of all the logits
            # would cost memory, and nothing saved for the backward pass is this tensor
            logits[..., self.config.real_vocab_size:] = float('-inf')
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context, e.g. to fine-tune GPT-2 (1024) with a smaller block."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.position == 'learned':
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def grow_vocabulary(self, vocab_size):
        """Rows for new tokens (a chat template's markers, ids after the tokenizer's own): the embedding, and an
        untied head, grow to a multiple of 64 where the padding rows do not suffice, and each new token starts at
        the mean of the real tokens' rows, so its embedding is an average input and its logit an average score."""
        old = self.config.real_vocab_size or self.config.vocab_size
        rows = max(self.config.vocab_size, math.ceil(vocab_size / 64) * 64)
        layers = [self.transformer.wte] + ([] if self.config.tie_weights else [self.lm_head])
        with torch.no_grad():
            for layer in layers:
                weight = layer.weight.new_zeros(rows, layer.weight.size(1))
                weight[:old] = layer.weight[:old]
                weight[old:vocab_size] = layer.weight[:old].mean(dim=0)
                layer.weight = nn.Parameter(weight)
        if self.config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.transformer.wte.num_embeddings = self.lm_head.out_features = rows
        self.config.vocab_size, self.config.real_vocab_size = rows, vocab_size

    def fused_matrices(self):
        """The weights that stack several matrices by rows, by name, with how many: each attention's query, key
        and value projections (3) and SwiGLU's gate and value (2). Muon orthogonalises each part on its own."""
        fused = {}
        for name, _ in self.named_parameters():
            if name.endswith('attn.c_attn.weight'):
                fused[name] = 3
            elif name.endswith('mlp.c_fc.weight') and self.config.activation == 'swiglu':
                fused[name] = 2
        return fused

    def flops_per_token(self):
        """Training FLOPs per token, from the PaLM paper's appendix B (https://arxiv.org/abs/2204.02311)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        N = self.get_num_params()
        if not cfg.tie_weights:
            N -= self.transformer.wte.weight.numel()  # an untied embedding is a lookup, not a matmul
        return 6 * N + 12 * L * H * Q * T
