"""The code paths GPU users take, run on the CPU, where PyTorch has them too: torch.compile (inductor) for
training and sampling, bfloat16 autocast for train, sample and eval, and float16 with a GradScaler. Each is
compared with the plain float32 eager run."""
import re

import pytest
import torch
from conftest import TINY_TRAIN, assert_no_near_tie, decoder_of, run

from safetensors.torch import load_file

from checkpoint import load_model, read_checkpoint, save_checkpoint
from model import GPT, GPTConfig
from tokenizer import load_tokenizer, make_tokenizer

TRAIN = [*TINY_TRAIN, '--max_iters=8', '--eval_interval=4', '--warmup_iters=2', '--seed=7']


def iteration_losses(stdout):
    return [float(m) for m in re.findall(r'^iter \d+: loss ([\d.]+)', stdout, re.M)]


def evaluations(stdout):
    """The train and val losses of every evaluation, in one flat list."""
    return [float(x) for m in re.findall(r'^step \d+: train loss ([\d.]+), val loss ([\d.]+)', stdout, re.M) for x in m]


def train(dataset, out, *args):
    return run('train.py', f'--dataset={dataset}', f'--out_dir={out}', *TRAIN, *args).stdout


@pytest.fixture(scope='module')
def eager(char_dataset, tmp_path_factory):
    return train(char_dataset, tmp_path_factory.mktemp('eager'), '--dtype=float32')


@pytest.mark.slow
def test_compiled_training_follows_eager(char_dataset, tmp_path, eager):
    compiled = train(char_dataset, tmp_path, '--compile=True', '--dtype=float32')
    assert 'compiling the model' in compiled
    ours, theirs = iteration_losses(compiled), iteration_losses(eager)
    assert len(ours) == 8
    # the forward pass: the first loss and the first evaluation are the same up to float32 rounding (inductor
    # fuses and reorders the arithmetic)
    assert ours[0] == pytest.approx(theirs[0], abs=1e-3)
    assert evaluations(compiled)[:2] == pytest.approx(evaluations(eager)[:2], abs=1e-3)
    # training: AdamW's first steps move every weight by about lr whatever its gradient's size, so a rounding-level
    # gradient flips some steps; the runs stay within a percent (a wrong backward pass lands far outside)
    assert ours == pytest.approx(theirs, rel=0.01) and evaluations(compiled) == pytest.approx(evaluations(eager), rel=0.01)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_mixed_precision_training_follows_float32(char_dataset, tmp_path, eager, dtype):
    """Autocast computes the matmuls in 16 bits and keeps float32 weights; float16 also scales the loss (a
    GradScaler), whose state the checkpoint keeps for resume. Losses stay within 16-bit rounding of float32's."""
    mixed = train(char_dataset, tmp_path, f'--dtype={dtype}')
    assert iteration_losses(mixed) == pytest.approx(iteration_losses(eager), abs=0.02)
    assert evaluations(mixed) == pytest.approx(evaluations(eager), abs=0.02)
    ckpt = read_checkpoint(tmp_path)
    scaler = ckpt['training_state']['scaler']
    if dtype == 'float16':
        assert scaler['scale'] == 65536.0 and scaler['_growth_tracker'] == 8  # 8 steps, no overflow yet
    else:
        assert not scaler  # bfloat16 has float32's range: no scaling
    assert {v.dtype for v in load_file(tmp_path / ckpt['model_file']).values()} == {torch.float32}


@pytest.fixture(scope='module')
def sharp_checkpoint(tmp_path_factory):
    """A checkpoint whose next-token choices are clear-cut (sharp logits; greedy_has_no_near_tie checks it where two
    decoding paths' texts are compared): whatever differs between the paths then shows in the text."""
    text = "ROMEO: Shall I compare thee to a summer's day?\nJULIET: Thou art more lovely.\n"
    tokenizer = make_tokenizer('char', text)
    args = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, position='rotary', qk_norm=True,
                norm='rmsnorm', bias=False, tie_weights=False)
    torch.manual_seed(4)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    out = tmp_path_factory.mktemp('sharp')
    save_checkpoint(out, model, None, 1, 0.0, args, {}, tokenizer.describe())
    return out


def greedy_has_no_near_tie(out, prompt, n):
    """Greedy decoding of prompt by the checkpoint in out, as sample.py does it, has no near-tie at any of its n steps
    (conftest.assert_no_near_tie): two decoding paths of other arithmetic (compiled, eager) must give the same text."""
    model, description, _ = load_model(out)
    tokenizer = load_tokenizer(description)
    decoder = decoder_of(model.eval(), torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=n)
    for step in range(n):
        logits = decoder.next_logits()[:, :tokenizer.vocab_size]
        assert_no_near_tie(logits, f' (step {step})')
        decoder.append(logits.argmax(-1))


def greedy(out, *args):
    return run('sample.py', f'--out_dir={out}', '--device=cpu', '--start=ROMEO:', '--temperature=0', '--num_samples=2',
               '--max_new_tokens=70', *args).stdout  # 70 tokens: past block_size, the window jumps


def test_bfloat16_sampling_runs_with_and_without_the_cache(sharp_checkpoint):
    """sample.py's bfloat16 path end to end (test_generate.py compares its logits with the no-cache path's):
    two greedy samples of 70 new characters each, the first streamed, the second printed after it."""
    for use_cache in (True, False):
        out = greedy(sharp_checkpoint, '--dtype=bfloat16', f'--use_cache={use_cache}')
        samples = out.split('\n---------------\n')
        assert len(samples) == 3 and samples[2] == '', out
        assert all(s.startswith('ROMEO:') and len(s) == len('ROMEO:') + 70 for s in samples[:2]), out


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_text_from_a_few_graphs(sharp_checkpoint):
    proc = run('sample.py', f'--out_dir={sharp_checkpoint}', '--device=cpu', '--start=ROMEO:', '--temperature=0',
               '--num_samples=2', '--max_new_tokens=70', '--compile=True', env={'TORCH_LOGS': 'recompiles'})
    # inductor fuses and reorders the arithmetic: logits within ~3e-6 of eager's; the closest choice is 1.4e-3 apart
    greedy_has_no_near_tie(sharp_checkpoint, 'ROMEO:', 70)
    assert proc.stdout == greedy(sharp_checkpoint)
    # the prefill, the one-token step, a full cache, and the refill after a window jump: no graph per token
    assert proc.stderr.count('Recompiling function') <= 3, proc.stderr


def test_bfloat16_evaluation_follows_float32(char_dataset, tmp_path):
    train(char_dataset, tmp_path)
    table = {dtype: run('eval.py', f'--out_dir={tmp_path}', '--device=cpu', f'--dtype={dtype}').stdout
             for dtype in ('float32', 'bfloat16')}
    loss = {dtype: float(t.strip().splitlines()[1].split()[-3]) for dtype, t in table.items()}
    # bfloat16 matmuls keep 8 bits of mantissa: the mean loss moves by a few thousandths
    assert loss['bfloat16'] == pytest.approx(loss['float32'], abs=0.01) and loss['float32'] < 4.0
