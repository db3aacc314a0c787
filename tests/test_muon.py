"""Tests for muon.py: Newton-Schulz, the Muon and AdamW halves, training, resume, param grouping, and Muon through
train.py (resume, gradient accumulation, DDP) against uninterrupted and single-batch runs."""

import io
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from conftest import TINY_TRAIN, assert_clean_error, final_weights, run, torchrun, val_losses  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from muon import MuonWithAdamW, configure_optimizers, muon_param_groups, zeropower_via_newtonschulz5  # noqa: E402


class TinyGPTish(nn.Module):
    """Not a real GPT: just nanoGPT's parameter names and shapes, with a forward that uses all of them."""

    def __init__(self, vocab_size=16, block_size=8, n_embd=16, n_layer=2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([nn.ModuleDict(dict(
                ln_1=nn.LayerNorm(n_embd),
                attn=nn.ModuleDict(dict(c_attn=nn.Linear(n_embd, 3 * n_embd), c_proj=nn.Linear(n_embd, n_embd))),
                mlp=nn.ModuleDict(dict(c_fc=nn.Linear(n_embd, 4 * n_embd), c_proj=nn.Linear(4 * n_embd, n_embd))),
            )) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in nanoGPT

    def forward(self, idx, targets):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.size(1)))
        for block in t.h:
            q, k, v = block.attn.c_attn(block.ln_1(x)).chunk(3, dim=-1)
            x = x + block.attn.c_proj(q * torch.sigmoid(k) * v)
            x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(x)))
        logits = self.lm_head(t.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def make_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = TinyGPTish()
    groups = muon_param_groups(model.named_parameters(), muon_lr=0.02, adam_lr=3e-3,
                               weight_decay=0.1, betas=(0.9, 0.95))
    groups[0]['weight_decay'] = 0.01  # exercise Muon's weight decay too
    return model, MuonWithAdamW(groups)


def reference_newtonschulz5(G, steps=5):
    # written out independently of muon.py, for one float32 matrix
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = G.shape[0] > G.shape[1]
    X = G.T if tall else G
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    return X.T if tall else X


# -----------------------------------------------------------------------------
# Newton-Schulz

@pytest.mark.parametrize('shape', [(64, 32), (32, 64)])
def test_newtonschulz_orthogonalises(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * 10  # the scale must not matter: NS normalises first
    X = zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.5, s
    # and it is the direction of G (same singular vectors), not just any orthogonal matrix
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert F.cosine_similarity(X.flatten(), (U @ Vh).flatten(), dim=0) > 0.9
    torch.testing.assert_close(X, reference_newtonschulz5(G), rtol=1e-4, atol=1e-5)


def test_newtonschulz_batch_equals_per_matrix():
    torch.manual_seed(0)
    G = torch.randn(3, 48, 24)
    X = zeropower_via_newtonschulz5(G)
    for i in range(3):
        torch.testing.assert_close(X[i], zeropower_via_newtonschulz5(G[i]), rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# the two update rules against independent references

def test_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    params = [torch.randn(8, 4), torch.randn(4), torch.randn(3, 5)]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = MuonWithAdamW([
        dict(params=ours[:2], use_muon=False, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        dict(params=ours[2:], use_muon=False, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
    ])
    ref = torch.optim.AdamW([
        dict(params=theirs[:2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        dict(params=theirs[2:], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
    ])
    for _ in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b, p0 in zip(ours, theirs, params):
        assert not torch.equal(a, p0)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_muon_step_matches_reference():
    torch.manual_seed(0)
    rows, cols, lr, momentum, wd = 48, 16, 0.02, 0.95, 0.1
    W0 = torch.randn(rows, cols)
    grads = [torch.randn(rows, cols) for _ in range(3)]

    p = W0.clone().requires_grad_()
    opt = MuonWithAdamW([dict(params=[p], use_muon=True, lr=lr, momentum=momentum, weight_decay=wd)])
    for g in grads:
        p.grad = g.clone()
        opt.step()

    W, buf = W0.clone(), torch.zeros(rows, cols)
    for g in grads:
        buf = momentum * buf + g
        nesterov = g + momentum * buf
        update = reference_newtonschulz5(nesterov) * (rows / cols) ** 0.5  # tall matrix: scale sqrt(3)
        W = W * (1 - lr * wd) - lr * update
    torch.testing.assert_close(p.detach(), W, rtol=1e-5, atol=1e-6)


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match='Muon is for weight matrices'):
        MuonWithAdamW([dict(params=[nn.Parameter(torch.zeros(4))], use_muon=True, lr=0.02)])
    with pytest.raises(ValueError, match='use_muon'):
        MuonWithAdamW([dict(params=[nn.Parameter(torch.zeros(4))], lr=0.02)])


# -----------------------------------------------------------------------------
# end to end

def test_training_lowers_loss():
    # regress a random teacher MLP; Muon on the weight matrices, AdamW on biases and the 64->1 head
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        y = teacher(x)
    student = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    matrices = [student[0].weight, student[2].weight]
    others = [p for p in student.parameters() if all(p is not m for m in matrices)]
    opt = MuonWithAdamW([dict(params=matrices, use_muon=True, lr=0.02, initial_lr=0.02),
                         dict(params=others, use_muon=False, lr=3e-3, initial_lr=3e-3)])
    steps, losses = 150, []
    for it in range(steps):
        for group in opt.param_groups:  # linear decay: Muon's steps have a fixed size, so lr must shrink to settle
            group['lr'] = group['initial_lr'] * (1 - it / steps)
        loss = F.mse_loss(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # ~1e-5 of the start with Muon; AdamW alone on the rest (Muon frozen or its sign flipped) stays above 1e-2
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])


def test_resume_equals_uninterrupted_run():
    torch.manual_seed(1)
    batches = [(torch.randint(0, 16, (4, 8)), torch.randint(0, 16, (4, 8))) for _ in range(6)]

    def train(model, opt, start, stop):
        for it in range(start, stop):
            idx, targets = batches[it]
            for group in opt.param_groups:  # the trainer's lr schedule, as train.py will do it
                group['lr'] = group['initial_lr'] * (0.5 + 0.1 * it)
            loss = model(idx, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    model, opt = make_model_and_optimizer()
    train(model, opt, 0, 6)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = make_model_and_optimizer()
    train(model, opt, 0, 3)
    buffer = io.BytesIO()
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict()), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, opt = make_model_and_optimizer(seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(checkpoint['model'])
    opt.load_state_dict(checkpoint['optimizer'])
    train(model, opt, 3, 6)

    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_muon_param_groups_split():
    model = TinyGPTish(n_layer=2)
    groups = muon_param_groups(model.named_parameters(), muon_lr=0.02, adam_lr=6e-4,
                               weight_decay=0.1, betas=(0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    muon, decay, no_decay = [sorted(names[id(p)] for p in g['params']) for g in groups]

    assert muon == sorted(f'transformer.h.{i}.{m}.weight' for i in range(2)
                          for m in ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'])
    # wte is tied to lm_head, so named_parameters() lists the tensor once, under its first name
    assert decay == ['transformer.wpe.weight', 'transformer.wte.weight']
    assert 'transformer.h.0.ln_1.weight' in no_decay and 'transformer.h.1.attn.c_attn.bias' in no_decay
    assert 'transformer.ln_f.weight' in no_decay and 'transformer.ln_f.bias' in no_decay
    assert all(p.ndim == 1 for p in groups[2]['params'])
    assert len(muon) + len(decay) + len(no_decay) == len(list(model.parameters()))

    assert [g['use_muon'] for g in groups] == [True, False, False]
    assert [g['lr'] for g in groups] == [0.02, 6e-4, 6e-4]
    assert [g['initial_lr'] for g in groups] == [g['lr'] for g in groups]
    assert groups[0]['momentum'] == 0.95
    assert groups[1]['weight_decay'] == 0.1 and groups[2]['weight_decay'] == 0.0
    assert groups[1]['betas'] == (0.9, 0.95)

    # a duplicate (e.g. an untied listing of the same tensor) still lands in one group only
    groups = muon_param_groups(list(model.named_parameters()) + [('lm_head.weight', model.lm_head.weight)],
                               0.02, 6e-4, 0.1, (0.9, 0.95))
    MuonWithAdamW(groups)  # torch raises if a tensor appears in two groups


@pytest.mark.parametrize('parts,rows,cols', [(3, 48, 16), (2, 64, 24)], ids=['qkv', 'swiglu'])
def test_fused_matrices_are_orthogonalised_part_by_part(parts, rows, cols):
    """A fused projection stacks `parts` matrices by rows (queries, keys, values; SwiGLU's gate and value). With
    momentum 0 and lr 1 the step is the update itself: each part must be orthogonal on its own (singular values
    near 1, as Newton-Schulz leaves them), scaled for its own shape, as the reference computes part by part."""
    torch.manual_seed(0)
    W0, g = torch.randn(parts * rows, cols), torch.randn(parts * rows, cols)
    p = W0.clone().requires_grad_()
    opt = MuonWithAdamW([dict(params=[p], use_muon=True, lr=1.0, momentum=0.0, parts=[parts])])
    p.grad = g.clone()
    opt.step()
    update = (W0 - p.detach()).view(parts, rows, cols)
    for i in range(parts):
        part = g.view(parts, rows, cols)[i]
        torch.testing.assert_close(update[i], reference_newtonschulz5(part) * (rows / cols) ** 0.5, rtol=1e-4, atol=1e-5)
        s = torch.linalg.svdvals(update[i] / (rows / cols) ** 0.5)
        assert s.min() > 0.5 and s.max() < 1.5, (i, s.min(), s.max())
    with pytest.raises(ValueError, match="'parts'"):
        MuonWithAdamW([dict(params=[nn.Parameter(torch.zeros(10, 4))], use_muon=True, lr=0.02, parts=[3])])


def test_gpt_names_its_fused_matrices_for_muon():
    for activation, expected in (('gelu', {'attn.c_attn.weight': 3}),
                                 ('swiglu', {'attn.c_attn.weight': 3, 'mlp.c_fc.weight': 2})):
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, activation=activation))
        assert model.fused_matrices() == {f'transformer.h.{i}.{k}': n for i in range(2) for k, n in expected.items()}
        muon = configure_optimizers(model, 0.0, 1e-3, (0.9, 0.95), 'cpu', 'muon').param_groups[0]
        names = {id(p): n for n, p in model.named_parameters()}
        assert {names[id(p)]: n for p, n in zip(muon['params'], muon['parts']) if n > 1} == model.fused_matrices()


# -----------------------------------------------------------------------------
# Muon through train.py: resume, gradient accumulation, a changed optimizer on resume

MUON_TRAIN = [*TINY_TRAIN, '--optimizer=muon', '--muon_lr=0.03', '--activation=relu2', '--position=rotary',
              '--norm=rmsnorm', '--qk_norm=True', '--tie_weights=False', '--zero_init_proj=True',
              '--logit_softcap=15.0', '--lr_decay_iters=12', '--eval_interval=6', '--always_save_checkpoint=True']


def test_muon_resume_equals_uninterrupted_run(char_dataset, tmp_path):
    data = f'--dataset={char_dataset}'
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    first = run('train.py', *MUON_TRAIN, data, f'--out_dir={whole}', '--max_iters=12')
    run('train.py', *MUON_TRAIN, data, f'--out_dir={split}', '--max_iters=6')
    # resuming with another optimizer would silently start a different run: it is refused
    proc = run('train.py', *MUON_TRAIN, data, f'--out_dir={split}', '--init_from=resume', '--max_iters=12',
               '--optimizer=adamw', check=False)
    assert_clean_error(proc, "optimizer='muon'", '--optimizer=muon')
    resumed = run('train.py', *MUON_TRAIN, data, f'--out_dir={split}', '--init_from=resume', '--max_iters=12')

    losses = val_losses(first.stdout)
    assert losses[-1] < losses[0] - 0.5, losses
    assert val_losses(resumed.stdout)[-1] == losses[-1]
    (ckpt_a, a), (ckpt_b, b) = final_weights(whole), final_weights(split)
    assert ckpt_a['iter_num'] == ckpt_b['iter_num'] == 12 and ckpt_b['config']['optimizer'] == 'muon'
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_muon_gradient_accumulation_equals_one_big_batch(char_dataset, tmp_path):
    """4 micro-batches of 2 rows draw the same rows as one batch of 8 (the same sampler stream), so the
    averaged gradient and Muon's update agree up to float rounding."""
    data = f'--dataset={char_dataset}'
    run('train.py', *MUON_TRAIN, data, f'--out_dir={tmp_path / "big"}', '--max_iters=6', '--batch_size=8',
        '--gradient_accumulation_steps=1')
    run('train.py', *MUON_TRAIN, data, f'--out_dir={tmp_path / "accum"}', '--max_iters=6', '--batch_size=2',
        '--gradient_accumulation_steps=4')
    (_, big), (_, accum) = final_weights(tmp_path / 'big'), final_weights(tmp_path / 'accum')
    for key in big:
        torch.testing.assert_close(accum[key], big[key], rtol=1e-4, atol=1e-5, msg=key)
    # and the weights did move: equal because the runs agree, not because nothing happened
    init = tiny_model_like(tmp_path / 'big')
    assert any(not torch.allclose(big[k], init[k]) for k in big if k in init)


def tiny_model_like(out_dir):
    """The initial weights of the run in out_dir: the same config and seed, nothing trained."""
    ckpt = json.loads((out_dir / 'checkpoint.json').read_text())
    torch.manual_seed(ckpt['config']['seed'])
    return GPT(GPTConfig(**ckpt['model_args'])).state_dict()


def test_muon_under_ddp_stops_every_process_at_the_target(char_dataset, tmp_path):
    """Two CPU processes (gloo) with Muon: DDP averages the gradients, each process applies the same
    Muon update. Only the master evaluates, so reaching target_val_loss must stop the other one too
    (else it would wait forever in the next all-reduce)."""
    out = tmp_path / 'ddp'
    proc = torchrun(2, 'train.py', f'--dataset={char_dataset}', f'--out_dir={out}', *MUON_TRAIN,
                    '--gradient_accumulation_steps=2', '--max_iters=100000', '--lr_decay_iters=100000',
                    '--eval_interval=5', '--target_val_loss=3.0', timeout=300)
    losses = val_losses(proc.stdout)
    assert losses[-1] <= 3.0 < min(losses[:-1]), losses
    assert 'tokens per iteration will be: 512' in proc.stdout  # 2 processes x 1 micro-step x 8 x 32
    stop = 5 * (len(losses) - 1)
    assert f'reached target val loss 3.0 at step {stop}' in proc.stdout
    ckpt, _ = final_weights(out)
    assert ckpt['iter_num'] == stop and ckpt['config']['optimizer'] == 'muon'
