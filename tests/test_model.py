import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from muon import configure_optimizers


def tiny(**overrides):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    args.update(overrides)
    return GPT(GPTConfig(**args))


def test_output_shapes():
    model = tiny()
    idx = torch.randint(0, 37, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, 37) and loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 11, 37) and loss.shape == ()
    logits, _ = model(idx, last_only=True)
    assert logits.shape == (3, 1, 37)
    with pytest.raises(ValueError, match='block_size'):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_causality():
    """Changing token t never changes the logits of positions before t."""
    model = tiny().eval()
    idx = torch.randint(0, 37, (1, 16))
    base, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 37
        logits, _ = model(changed)
        assert torch.allclose(logits[0, :t], base[0, :t], atol=1e-6)
        assert not torch.allclose(logits[0, t:], base[0, t:], atol=1e-4)


def reference_forward(model, idx):
    """GPT-2 written out with plain tensor operations: an independent check of the model's forward."""
    cfg, p = model.config, dict(model.named_parameters())
    B, T = idx.shape
    hs = cfg.n_embd // cfg.n_head
    ln = lambda x, name: F.layer_norm(x, (cfg.n_embd,), p[name + '.weight'], p.get(name + '.bias'), 1e-5)
    lin = lambda x, name: x @ p[name + '.weight'].T + (p[name + '.bias'] if name + '.bias' in p else 0)
    x = p['transformer.wte.weight'][idx] + p['transformer.wpe.weight'][:T]
    for i in range(cfg.n_layer):
        h = f'transformer.h.{i}.'
        q, k, v = lin(ln(x, h + 'ln_1'), h + 'attn.c_attn').split(cfg.n_embd, dim=2)
        q, k, v = (t.view(B, T, cfg.n_head, hs).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float('-inf')).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, cfg.n_embd), h + 'attn.c_proj')
        m = lin(ln(x, h + 'ln_2'), h + 'mlp.c_fc')
        x = x + lin(0.5 * m * (1 + torch.erf(m / math.sqrt(2))), h + 'mlp.c_proj')
    return ln(x, 'transformer.ln_f') @ p['transformer.wte.weight'].T


@pytest.mark.parametrize('bias', [True, False])
def test_loss_matches_independent_computation(bias):
    model = tiny(bias=bias).eval()
    torch.manual_seed(1)
    idx, targets = torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16))
    logits, loss = model(idx, targets)
    expected_logits = reference_forward(model, idx)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    log_probs = expected_logits.log_softmax(-1)
    expected_loss = -log_probs.gather(-1, targets[..., None]).mean()
    assert abs(loss.item() - expected_loss.item()) < 1e-5
    # ignore_index=-1 leaves padded targets out of the mean
    masked = targets.clone()
    masked[:, 8:] = -1
    _, loss = model(idx, masked)
    assert abs(loss.item() + log_probs[:, :8].gather(-1, targets[:, :8, None]).mean().item()) < 1e-5


def test_initial_loss_is_uniform_and_tiny_model_overfits():
    model = tiny()
    idx = torch.randint(0, 37, (4, 16))
    _, loss = model(idx, idx.roll(-1, dims=1))
    assert abs(loss.item() - math.log(37)) < 0.2  # a fresh model predicts nearly uniformly
    optimizer = configure_optimizers(model, 0.0, 3e-3, (0.9, 0.99), 'cpu')
    for _ in range(150):
        _, loss = model(idx, idx.roll(-1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_weight_tying_and_param_count():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 16 * 32
    untied = tiny(tie_weights=False)
    assert untied.get_num_params() == total - 16 * 32 + 37 * 32


def test_gpt2_init_scales_residual_projections():
    model = tiny(n_layer=8, n_embd=256, n_head=4)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_optimizer_decays_matrices_only():
    model = tiny()
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = optimizer.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() == 2 for p in decay['params']) and all(p.dim() == 1 for p in no_decay['params'])
    assert sum(p.numel() for g in optimizer.param_groups for p in g['params']) == model.get_num_params(False)
    assert all(g['initial_lr'] == 1e-3 for g in optimizer.param_groups)


def test_crop_block_size():
    model = tiny().eval()
    idx = torch.randint(0, 37, (1, 8))
    before, _ = model(idx)
    model.crop_block_size(8)
    after, _ = model(idx)
    assert model.transformer.wpe.weight.shape[0] == 8 and torch.allclose(before, after)


def test_bad_config_values():
    with pytest.raises(ValueError, match='activation'):
        GPTConfig(activation='swish')
    with pytest.raises(ValueError, match='divisible'):
        GPTConfig(n_embd=30, n_head=4)


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing each block in the backward pass replays its dropout draws: the gradients are those of the plain
    forward, dropout included; evaluation and generation (no grad) never recompute."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.2, bias=True))
    idx = torch.randint(0, 64, (4, 16))
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        _, loss = model(idx, idx)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    # and it saves memory: the forward pass keeps far fewer bytes for the backward pass
    def saved_bytes(checkpointing):
        model.activation_checkpointing = checkpointing
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            model(idx, idx)
        return sum(sizes)
    assert saved_bytes(True) < saved_bytes(False) / 2
