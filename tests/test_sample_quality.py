"""sample_quality.py's figures against examples computed by hand, self-perplexity against a token-by-token
computation, and eval.py --samples end to end."""
import math

import pytest
import torch
from torch.nn import functional as F

from conftest import TINY_TRAIN, run
from model import GPT, GPTConfig
from sample_quality import (copied_share, distinct, longest_repeat, ngram_set, quality, repeated_share,
                            self_perplexity, words)


def test_figures_of_a_hand_made_example():
    a = 'a b a b a b c'.split()
    b = 'c d'.split()
    # unigrams a b a b a b c c d: 4 distinct of 9; bigrams ab ba ab ba ab bc cd: 4 of 7
    assert distinct([a, b], 1) == pytest.approx(4 / 9) and distinct([a, b], 2) == pytest.approx(4 / 7)
    assert distinct([b], 3) is None  # no trigram at all
    # 4-grams of a: abab baba abab babc: the third repeats the first
    assert repeated_share(a) == pytest.approx(1 / 4) and repeated_share(b) is None
    assert longest_repeat(a) == 4  # 'a b a b' at 0 and at 2 (they overlap)
    assert longest_repeat('x y z'.split()) == 0 and longest_repeat([]) == 0
    assert longest_repeat('the cat sat . the cat sat down'.split()) == 3
    train = ngram_set('one two three four five six seven eight nine', n=8)  # two 8-grams
    sample = 'zero one two three four five six seven eight'.split()  # 8-grams: zero..seven, one..eight
    assert copied_share([sample], train) == pytest.approx(1 / 2)
    assert words("Gênes, l'été!") == ['Gênes', ',', 'l', "'", 'été', '!']
    figures = quality(['a b a b a b c', 'c d'])
    assert figures['distinct-1'] == pytest.approx(4 / 9) and figures['repeated 4-grams'] == pytest.approx(1 / 4)
    assert figures['longest repeat'] == 4 and figures['copied 8-grams'] is None


def test_self_perplexity_is_the_mean_loss_of_the_sampled_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20)).eval()
    prompt, samples = [3, 4], [[5, 6, 7], [], [8]]
    nll = []
    with torch.no_grad():
        for sample in samples:
            for i in range(len(sample)):  # one token at a time, from the plain forward pass of what precedes it
                context = torch.tensor([prompt + sample[:i]])
                nll.append(-F.log_softmax(model(context)[0][0, -1], dim=-1)[sample[i]].item())
    assert self_perplexity(model, prompt, samples) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert self_perplexity(model, prompt, [[], []]) is None


def test_eval_prints_the_figures_of_each_models_samples(char_dataset, tmp_path):
    out = tmp_path / 'out'
    # a block of 64: samples of 56 characters hold a dozen words, so 8-grams of words to look up in the training text
    run('train.py', f'--dataset={char_dataset}', f'--out_dir={out}', *TINY_TRAIN, '--block_size=64', '--max_iters=30',
        '--eval_interval=30')
    # the same model twice in one table: seeded, it draws the same samples and gets the same figures
    proc = run('eval.py', f'--out_dir={out},{out}', '--device=cpu', '--samples=3', '--sample_tokens=56', '--start=ROMEO:')
    header, row, again = proc.stdout.strip().splitlines()[-3:]
    assert header.split() == ['model', 'samples', 'distinct-1', 'distinct-2', 'distinct-3', 'distinct-4', 'repeated',
                              '4-grams', 'longest', 'repeat', 'copied', '8-grams', 'self-perplexity']
    cells = row.split()
    assert cells[:2] == [str(out), '3'] and all(0 <= float(c) <= 1 for c in cells[2:7] + cells[8:9])
    assert float(cells[9]) > 1 and row == again
