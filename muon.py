"""
The optimizers: configure_optimizers() builds AdamW, or Muon (MomentUm Orthogonalized by Newton-Schulz,
Keller Jordan 2024) and AdamW in one optimizer, for a GPT.

Muon takes SGD-momentum's update for a weight matrix and replaces it with the nearest (semi-)orthogonal
matrix, computed by a few Newton-Schulz iterations. It suits the 2-D hidden weights of the transformer
blocks; embeddings, the lm_head and the 1-D gains/biases stay on AdamW. Putting both in one
torch.optim.Optimizer keeps the training loop to one optimizer, one state_dict and one lr schedule.

References: https://kellerjordan.github.io/posts/muon/ , github.com/KellerJordan/Muon, KellerJordan/modded-nanogpt
"""
import inspect

import torch
from torch import Tensor

from runtime import native_bfloat16


def newton_schulz_dtype(device):
    """What the orthogonalisation computes in on device: bfloat16 where the device has it in hardware (runtime's
    rule, the one that picks train.py's dtype), float32 elsewhere."""
    device = torch.device(device)
    return torch.bfloat16 if device.type == 'cuda' and native_bfloat16(device) else torch.float32


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """
    Approximately orthogonalise G (the U @ V^T of its SVD) with a quintic Newton-Schulz iteration.
    The coefficients are tuned to push small singular values up fast rather than to converge exactly,
    so the result has singular values in roughly [0.7, 1.2], which is as good for training and cheaper.
    Works on the last two dims, so a batch of matrices (leading dims) is fine.
    """
    assert G.ndim >= 2, "Newton-Schulz needs a matrix (or a batch of them)"
    a, b, c = (3.4445, -4.7750, 2.0315)
    # bfloat16 on a GPU that computes it natively: the iteration is robust to it and tensor cores make it fast.
    # Elsewhere (CPUs, T4, V100) bfloat16 matmuls are emulated (slow), so stay in float32 there.
    X = G.bfloat16() if newton_schulz_dtype(G.device) == torch.bfloat16 else G.float()
    # iterate on the wide orientation so X @ X^T is the smaller (rows x rows) Gram matrix
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    # the iteration only converges for singular values <= 1; the Frobenius norm bounds the spectral norm
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """
    One optimizer, two update rules, chosen per param group by group['use_muon']:
      Muon groups:  lr, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0, and optionally parts: one
                    number per param, how many matrices it stacks by rows (a fused q/k/v projection is 3), each
                    of which is orthogonalised on its own
      AdamW groups: lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0
    Every group must give 'lr'. State is plain per-parameter tensors, so state_dict()/load_state_dict()
    round-trip exactly (checkpoint resume).

    Under DDP no extra communication is needed: DDP has already all-reduced (averaged) the gradients,
    so every rank computes the identical update from identical params, grads and state. Under FSDP a process
    holds rows of each matrix only, and orthogonalising needs the whole matrix: the momentum stays sharded,
    the update is gathered, every process orthogonalises it and keeps its own rows. (modded-nanogpt and
    nanochat instead give each process its share of the matrices and gather the results; gathering each
    matrix is simpler, at the price of every process repeating the Newton-Schulz work of every matrix.)
    AdamW's rule is elementwise, so it runs on shards as they are. Gradient accumulation works too, since
    step() only reads the accumulated .grad.
    """

    muon_defaults = dict(momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0)
    adamw_defaults = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})

    def add_param_group(self, param_group):
        # the two rules need different hyperparameters, so fill defaults per group kind
        # (torch's single `defaults` dict can't express that)
        if 'use_muon' not in param_group or 'lr' not in param_group:
            raise ValueError("each param group needs 'use_muon' (True/False) and 'lr'; see muon_param_groups()")
        defaults = self.muon_defaults if param_group['use_muon'] else self.adamw_defaults
        for k, v in defaults.items():
            param_group.setdefault(k, v)
        super().add_param_group(param_group)
        params = self.param_groups[-1]['params']
        if param_group['use_muon'] and any(p.ndim < 2 for p in params):
            raise ValueError("Muon is for weight matrices; put 1-D gains/biases in a use_muon=False (AdamW) group")
        parts = param_group.get('parts')
        if parts is not None and (len(parts) != len(params) or any(p.size(0) % n for p, n in zip(params, parts))):
            raise ValueError("a Muon group's 'parts' needs one number per param, dividing its number of rows")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group['use_muon']:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group):
        lr, momentum, wd = group['lr'], group['momentum'], group['weight_decay']
        for p, parts in zip(group['params'], group.get('parts') or [1] * len(group['params'])):
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(g)
            buf = state['momentum_buffer']
            buf.mul_(momentum).add_(g)
            # nesterov: look ahead along the momentum. (Keller's code uses the EMA form buf.lerp_(g, 1-momentum),
            # which only rescales the update by (1-momentum); the orthogonalisation removes that scale.)
            update = g.add(buf, alpha=momentum) if group['nesterov'] else buf
            sharded = hasattr(p, 'device_mesh')  # a DTensor: FSDP's shard of the matrix (this process's rows)
            if sharded:  # orthogonalise the whole matrix
                update = update.full_tensor()
            # conv-style weights (>2-D) are treated as (out, in * kernel) matrices; a stack of `parts` matrices (the
            # fused query/key/value projection) as a batch of them, each orthogonalised on its own
            update = update.reshape(parts, update.size(0) // parts, -1)
            update = zeropower_via_newtonschulz5(update, steps=group['ns_steps'])
            # an orthogonal update has RMS ~ 1/sqrt(max(rows, cols)); this keeps tall matrices' RMS comparable
            update *= max(1, update.size(-2) / update.size(-1)) ** 0.5
            update = update.reshape(p.shape)
            if sharded:  # every process has the whole update: each keeps its rows, no scatter
                from torch.distributed.tensor import distribute_tensor  # 0.5 s to import: only FSDP runs pay it
                update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
            p.mul_(1 - lr * wd)  # decoupled weight decay, as in AdamW
            p.add_(update, alpha=-lr)

    def _adamw_step(self, group):
        lr, (beta1, beta2), eps, wd = group['lr'], group['betas'], group['eps'], group['weight_decay']
        for p in group['params']:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if 'step' not in state:
                state['step'] = 0
                state['exp_avg'] = torch.zeros_like(p)
                state['exp_avg_sq'] = torch.zeros_like(p)
            state['step'] += 1
            exp_avg, exp_avg_sq, t = state['exp_avg'], state['exp_avg_sq'], state['step']
            # same operations, in the same order, as torch.optim.AdamW (single-tensor path)
            p.mul_(1 - lr * wd)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** t
            bias_correction2 = 1 - beta2 ** t
            denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def muon_param_groups(named_params, muon_lr, adam_lr, weight_decay, betas, muon_momentum=0.95, parts=None):
    """
    Split a GPT's parameters into the three groups MuonWithAdamW wants:
      Muon:                 2-D weights inside the transformer blocks (name contains '.h.'); parts maps the
                            names of fused ones to how many matrices they stack
      AdamW + weight decay: other matrices (wte, wpe, lm_head)
      AdamW, no decay:      1-D gains and biases (decaying them only hurts, as in nanoGPT)
    Each group stores 'initial_lr' so the trainer can set group['lr'] = group['initial_lr'] * lr_schedule(it).
    """
    muon, muon_parts, decay, no_decay = [], [], [], []
    seen = set()
    for name, p in named_params:
        # a tied lm_head/wte is one tensor: give it to one group only
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim >= 2 and '.h.' in name:
            muon.append(p)
            muon_parts.append((parts or {}).get(name, 1))
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        dict(params=muon, use_muon=True, lr=muon_lr, momentum=muon_momentum, parts=muon_parts),
        dict(params=decay, use_muon=False, lr=adam_lr, betas=betas, weight_decay=weight_decay),
        dict(params=no_decay, use_muon=False, lr=adam_lr, betas=betas, weight_decay=0.0),
    ]
    for g in groups:
        g['initial_lr'] = g['lr']
    return groups


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer='adamw', muon_lr=0.02,
                         muon_momentum=0.95):
    """The optimizer of a GPT. optimizer='adamw': AdamW everywhere. 'muon': Muon (at muon_lr) for the blocks' weight
    matrices, AdamW (at learning_rate) for embeddings, head, gains and biases. Every param group keeps its
    'initial_lr', which the trainer's schedule scales."""
    if optimizer == 'muon':
        groups = muon_param_groups(model.named_parameters(), muon_lr, learning_rate, weight_decay, betas,
                                   muon_momentum, model.fused_matrices())
        return MuonWithAdamW(groups)
    if optimizer != 'adamw':
        raise ValueError(f"optimizer={optimizer!r} is not one of adamw, muon")
    # weight decay on matrices (Linear weights, embeddings) only: biases and norm gains stay free
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    # the fused CUDA kernel is faster than the default foreach implementation
    fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))
    for group in adamw.param_groups:
        group['initial_lr'] = learning_rate
    return adamw
