"""Tests for the architecture switches of model.py, and the speedrun configs that combine them.

Every switch: a tiny model with it learns (loss falls) and round-trips a checkpoint. Each switch is also
checked against an independent computation of what it should do (formulas, no-cache forward passes).
Muon through train.py is in test_muon.py."""
import math

import pytest
import torch
from conftest import TINY_TRAIN, assert_clean_error, final_weights, run

from checkpoint import load_model, save_checkpoint
from conftest import decoder_of
from decoder import PrefillView, StaticCache
from model import GPT, MLP, GPTConfig, apply_rotary, rotary_tables
from muon import configure_optimizers

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=32, dropout=0.0)
SPEEDRUN = dict(activation='relu2', position='rotary', norm='rmsnorm', qk_norm=True, tie_weights=False,
                zero_init_proj=True, logit_softcap=15.0, bias=False)
SWITCHES = {
    'gelu_tanh': dict(activation='gelu_tanh'),
    'relu': dict(activation='relu'),
    'relu2': dict(activation='relu2'),
    'silu': dict(activation='silu'),
    'swiglu': dict(activation='swiglu'),
    'rotary': dict(position='rotary'),
    'rmsnorm': dict(norm='rmsnorm'),
    'qk_norm': dict(qk_norm=True),
    'untied': dict(tie_weights=False),
    'zero_init_proj': dict(zero_init_proj=True),
    'logit_softcap': dict(logit_softcap=5.0),
    'no_bias': dict(bias=False),
    'speedrun': SPEEDRUN,
}


pytestmark = pytest.mark.usefixtures('torch_threads_here')


def tiny_model(seed=0, **switches):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **switches}))


def pattern_batches(n, batch_size=8, seed=0):
    """Batches cut from a fixed random 40-token sequence repeated: learnable, far from uniform."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, TINY['vocab_size'], (40,), generator=g).repeat(20)
    T = TINY['block_size']
    starts = torch.randint(0, len(stream) - T - 1, (n, batch_size), generator=g)
    return [(stream[s[:, None] + torch.arange(T)], stream[s[:, None] + torch.arange(1, T + 1)]) for s in starts]


# every switch with AdamW, and Muon on a few (the Muon/AdamW split depends on parameter names and shapes)
TRAIN_CASES = [(name, 'adamw') for name in SWITCHES] + [(name, 'muon') for name in ('speedrun', 'swiglu', 'qk_norm')]


@pytest.mark.parametrize('name,optimizer', TRAIN_CASES)
def test_switch_trains_and_round_trips_a_checkpoint(name, optimizer, tmp_path):
    model = tiny_model(**SWITCHES[name])
    opt = configure_optimizers(model, 0.0, 1e-2, (0.9, 0.95), 'cpu', optimizer, muon_lr=0.05)
    batches = pattern_batches(40)
    losses = []
    for x, y in batches:
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # uniform guessing is ln(32) = 3.47; the pattern is learnable, so 40 steps get far below it
    assert losses[0] > 3.0 and sum(losses[-5:]) / 5 < 0.5 * losses[0], (losses[0], losses[-5:])

    model.eval()
    save_checkpoint(tmp_path, model, opt, 40, losses[-1], dict(model.config.__dict__), {'optimizer': optimizer},
                    {'kind': 'char', 'chars': 'abc'})
    loaded, _, ckpt = load_model(tmp_path)
    loaded.eval()
    x = batches[0][0]
    with torch.no_grad():  # exactly: the same weights, read back bit for bit, through the same forward pass
        assert torch.equal(model(x)[0], loaded(x)[0])
    assert loaded.config == model.config


def test_mlp_activations_match_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24)
    formulas = {
        'gelu': lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
        'gelu_tanh': lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))),
        'relu': lambda h: h.clamp(min=0),
        'relu2': lambda h: h.clamp(min=0) ** 2,
        'silu': lambda h: h / (1 + torch.exp(-h)),
    }
    for activation, f in formulas.items():
        mlp = MLP(GPTConfig(**{**TINY, 'n_embd': 24, 'activation': activation}))
        expected = mlp.c_proj(f(x @ mlp.c_fc.weight.T + mlp.c_fc.bias))
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6, msg=activation)
    mlp = MLP(GPTConfig(**{**TINY, 'n_embd': 24, 'activation': 'swiglu'}))
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    gate, value = h[..., :h.size(-1) // 2], h[..., h.size(-1) // 2:]
    torch.testing.assert_close(mlp(x), mlp.c_proj(gate / (1 + torch.exp(-gate)) * value), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('n_embd', [48, 768])
def test_swiglu_keeps_the_parameter_count_of_a_4x_mlp(n_embd):
    cfg = dict(TINY, n_embd=n_embd, n_head=4, bias=False)
    count = lambda activation: sum(p.numel() for p in MLP(GPTConfig(**cfg, activation=activation)).parameters())
    assert count('gelu') == 8 * n_embd * n_embd
    assert count('swiglu') == count('gelu')  # hidden 8/3 * n_embd, two input projections
    assert MLP(GPTConfig(**cfg, activation='swiglu')).c_proj.in_features == 8 * n_embd // 3


def test_rmsnorm_and_qk_norm_match_their_formulas():
    model = tiny_model(norm='rmsnorm', qk_norm=True)
    x = torch.randn(2, 5, 32)
    ln = model.transformer.h[0].ln_1
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    torch.testing.assert_close(ln(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * ln.weight)
    assert ln.bias is None
    # QK-norm: every query and key has RMS 1 per head, whatever the input scale, so attention logits stay bounded
    attn = model.transformer.h[0].attn
    q = attn.q_norm(torch.randn(2, 2, 5, 16) * 100)
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 2, 5), rtol=1e-4, atol=1e-4)


def test_rotary_is_a_rotation_by_position():
    """Rotary equals multiplying each (i, i + d/2) channel pair, read as a complex number, by e^(i * pos * freq);
    so a query at position m and a key at position n score by their offset m - n alone."""
    model = tiny_model(position='rotary')
    cos, sin = rotary_tables(TINY['n_embd'] // TINY['n_head'], torch.arange(16), 10000.0)
    head_dim = TINY['n_embd'] // TINY['n_head']
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, head_dim)
    z = torch.complex(x[..., :head_dim // 2], x[..., head_dim // 2:])
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    rotated = z * torch.polar(torch.ones(16, head_dim // 2), torch.arange(16).float()[:, None] * freqs)
    torch.testing.assert_close(apply_rotary(x, cos, sin), torch.cat((rotated.real, rotated.imag), -1), rtol=1e-5, atol=1e-5)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m, n):
        rq = apply_rotary(q.view(1, 1, 1, -1), cos[m:m + 1], sin[m:m + 1])
        rk = apply_rotary(k.view(1, 1, 1, -1), cos[n:n + 1], sin[n:n + 1])
        return (rq * rk).sum()
    torch.testing.assert_close(score(5, 2), score(12, 9), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))
    assert not hasattr(model.transformer, 'wpe')


@pytest.mark.parametrize('switches', [dict(position='rotary'), SPEEDRUN], ids=['rotary', 'speedrun'])
def test_kv_cache_equals_no_cache_forward(switches):
    model = tiny_model(**switches)
    with torch.no_grad():  # zero-initialised projections would make every position alike: give them weights
        for name, p in model.named_parameters():
            if name.endswith('c_proj.weight') or name == 'lm_head.weight':
                p.normal_(0, 0.2)
    model.eval()
    idx = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        full, _ = model(idx)
        cache = StaticCache(model.config, 2, 16, 'cpu', torch.float32)
        parts = []
        for row in range(2):  # a prompt, then one token at a time
            pieces = [model(idx[[row], :7], cache=PrefillView(cache, row, 0))[0]]
            pieces += [model(idx[[row], t:t + 1], cache=PrefillView(cache, row, t))[0] for t in range(7, 16)]
            parts.append(torch.cat(pieces, dim=1))
    # attention over a cache, one position at a time, or all at once: float32 sums in another order, a few ulps
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)

    # past block_size, the decoder's window jumps forward: the cached and uncached paths still agree
    cached, uncached = decoder_of(model, idx[:, :5], use_cache=True), decoder_of(model, idx[:, :5], use_cache=False)
    for step in range(40):
        a, b = cached.next_logits(), uncached.next_logits()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f'step {step}')
        token = b.argmax(-1)
        cached.append(token)
        uncached.append(token)


def test_logit_softcap_bounds_the_logits():
    capped, plain = tiny_model(logit_softcap=5.0), tiny_model()
    with torch.no_grad():
        for model in (capped, plain):
            model.lm_head.weight.mul_(1000)  # huge raw logits
    idx = torch.randint(0, 32, (2, 16))
    raw, _ = plain(idx)
    logits, _ = capped(idx)
    assert raw.abs().max() > 50
    assert logits.abs().max() <= 5.0
    torch.testing.assert_close(logits, 5.0 * torch.tanh(raw / 5.0))


def test_zero_init_makes_every_block_the_identity():
    model = tiny_model(zero_init_proj=True, tie_weights=False)
    x = torch.randn(2, 16, 32)
    for block in model.transformer.h:  # exactly: zero projections and biases add exact zeros
        assert torch.equal(block(x), x)
    # and the untied head starts at zero: uniform predictions, loss exactly ln(vocab)
    idx = torch.randint(0, 32, (2, 16))
    logits, loss = model(idx, idx)
    assert torch.equal(logits, torch.zeros_like(logits))
    assert abs(loss.item() - math.log(32)) < 1e-6
    # tied, zeroing the head would zero the embedding too: it keeps its init
    tied = tiny_model(zero_init_proj=True)
    assert tied.lm_head.weight.abs().sum() > 0


def test_flops_count_the_head_once_tied_or_untied():
    """An untied embedding is a lookup (no FLOPs); the head is one matmul either way."""
    tied, untied = tiny_model(), tiny_model(tie_weights=False)
    assert untied.get_num_params() == tied.get_num_params() + 32 * 32
    assert untied.flops_per_token() == tied.flops_per_token()


def test_bad_switch_values_are_rejected(char_dataset, tmp_path):
    for key, value in (('activation', 'gelu2'), ('position', 'alibi'), ('norm', 'batchnorm')):
        with pytest.raises(ValueError, match=f"{key}='{value}' is not one of"):
            GPTConfig(**{key: value})
    with pytest.raises(ValueError, match='not one of adamw, muon'):
        configure_optimizers(tiny_model(), 0.1, 1e-3, (0.9, 0.95), 'cpu', 'sgd')
    # through train.py: one line naming the setting, exit code 2
    for arg, fragment in (('--activation=gelu2', "activation='gelu2' is not one of"), ('--optimizer=sgd', "optimizer='sgd' is not one of adamw, muon"),
                          ('--parallel=zero', "parallel='zero' is not one of ddp, fsdp")):
        proc = run('train.py', *TINY_TRAIN, f'--dataset={char_dataset}', f'--out_dir={tmp_path}', arg, check=False)
        assert proc.returncode == 2
        assert_clean_error(proc, fragment)


@pytest.mark.parametrize('config', ['shakespeare_char_cpu_speedrun.py', 'shakespeare_char_speedrun.py',
                                    'gpt2_124m_speedrun.py'])
def test_speedrun_configs_train(config, char_dataset, tmp_path):
    """Every key in the speedrun configs exists and has the right type, and their switches train together
    (shrunk to a few CPU steps here; GPU figures come from bench.py on a GPU)."""
    proc = run('train.py', f'config/{config}', f'--dataset={char_dataset}', f'--out_dir={tmp_path}', '--device=cpu',
               '--compile=False', '--dtype=float32', '--batch_size=4', '--block_size=32', '--n_layer=1', '--n_head=2', '--n_embd=64',
               '--gradient_accumulation_steps=1', '--max_iters=4', '--eval_interval=4', '--eval_iters=1')
    assert 'step 4:' in proc.stdout
    ckpt, _ = final_weights(tmp_path)
    assert ckpt['config']['optimizer'] == 'muon' and ckpt['model_args']['position'] == 'rotary'
