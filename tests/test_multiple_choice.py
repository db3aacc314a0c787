"""Multiple-choice evaluation (multiple_choice.py, eval.py --task): per-choice log-likelihoods against transformers
on an exported GPT-2-shaped model, the accuracies against hand computation, k-shot prompts, the named tasks'
mapping, and eval.py end to end on a checkpoint of ours and on a Hugging Face folder, with its one-line errors."""
import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from checkpoint import load_model
from conftest import TINY_TRAIN, assert_clean_error, run, run_all
from hf_gpt2 import export_model
from model import GPT, GPTConfig
from multiple_choice import (Item, TaskError, accuracies, arc_item, choice_logprobs, encode_pair, fewshot_context,
                             hellaswag_item, load_task, piqa_item, shot_indices)
from tokenizer import load_tokenizer, make_tokenizer

pytestmark = pytest.mark.usefixtures('torch_threads_here', 'hub_offline')

CORPUS = [f"Question: what does {who} say, {n} times? Answer: Shall I compare thee to a summer's day.\n"
          f"Привет, мир! Naïve café.\n\n" for n in range(30) for who in ('ROMEO', 'JULIET', 'the fool')]
# a hand-written task for a BPE: choices start with their space, one context ends with one (tokens must still
# split where transformers' context tokens end), one is in Cyrillic, one ends mid-word, so that its last token merges
# with the choice's first characters ('sum' + 'mer'), and the last is longer than block_size
BPE_TASK = [
    Item('Question: what does ROMEO say? Answer:', [' Shall I compare thee', ' Naïve café', ' 12 times'], 0),
    Item('Question: what does the fool say? Answer: ', ['Привет, мир!', 'Shall I', 'summer'], 2),
    Item('Привет,', [' мир!', ' café', ' day'], 0),
    Item('Shall I compare thee to a sum', ["mer's day", 'mit', ' fool'], 0),
    Item('ROMEO: ' * 12 + 'Shall I compare thee to a', [" summer's day", ' winter', ' fool'], 0),
]
BLOCK = 32


def hf_reference(folder, items):
    """Each choice's log-likelihood by transformers alone, lm-evaluation-harness's way (its _encode_pair and
    _loglikelihood_tokens): after moving the context's trailing whitespace onto the choice, the choice's tokens are
    those of context + choice past as many tokens as the context alone has, read after the context's own tokens (so
    where the context's last token merges with the choice's first characters, the merged token is not scored), and
    the sequence keeps its last block_size + 1 tokens. Also returns (context ids, choice ids) of each choice, and how
    many of them had such a merge."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    hf, tok = GPT2LMHeadModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    scores, splits, merged = [], [], 0
    for item in items:
        context = item.context.rstrip()
        row = []
        for choice in item.choices:
            choice = item.context[len(context):] + choice
            head = tok(context, add_special_tokens=False)['input_ids']
            whole = tok(context + choice, add_special_tokens=False)['input_ids']
            merged += whole[:len(head)] != head
            tail = whole[len(head):]
            splits.append((head, tail))
            seq = (head + tail)[-(BLOCK + 1):]
            with torch.no_grad():
                logprobs = F.log_softmax(hf(torch.tensor([seq[:-1]])).logits[0].double(), dim=-1)
            row.append(sum(logprobs[len(seq) - 1 - len(tail) + k, t].item() for k, t in enumerate(tail)))
        scores.append(row)
    return scores, splits, merged


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A random GPT-2-shaped model (tanh GELU, biases, learned positions; an untied, sharpened head and padding rows
    that would take probability if they were counted), exported with a BPE trained here, and its task file."""
    bpe = make_tokenizer('bpe', CORPUS, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=320, real_vocab_size=bpe.vocab_size, n_layer=2, n_head=2,
                          n_embd=32, activation='gelu_tanh', tie_weights=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
        model.lm_head.weight[bpe.vocab_size:] += 2.0
    folder = tmp_path_factory.mktemp('mc') / 'hf'
    assert export_model(model, bpe.describe(), str(folder)) == []
    task = folder.parent / 'bpe_task.jsonl'
    task.write_text(''.join(json.dumps(item._asdict(), ensure_ascii=False) + '\n' for item in BPE_TASK), encoding='utf-8')
    return folder, task, model, bpe


def assert_decisive(items, scores, token_counts):
    """No item's best two choices are nearly tied in any of accuracies()' three rankings (summed, per character, per
    token): then another code path's scores, equal to these but for float32 rounding (within 1e-4, as the test above
    finds), pick the same choices, and its accuracies are these exactly."""
    for item, s, t in zip(items, scores, token_counts):
        s = np.asarray(s, dtype=np.float64)
        chars = np.array([max(1, len(c.lstrip())) for c in item.choices], dtype=np.float64)
        for ranking in (s, s / chars, s / np.asarray(t, dtype=np.float64)):
            best, second = np.sort(ranking)[::-1][:2]
            assert best - second > 1e-3, f'near-tie in the test data: {item}, {ranking}'


def our_scores(model, tokenizer, items, batch_size=3):
    pairs = [encode_pair(tokenizer, item.context, choice) for item in items for choice in item.choices]
    flat = choice_logprobs(model, pairs, BLOCK, batch_size, tokenizer.vocab_size)
    scores, k = [], 0
    for item in items:
        scores.append(flat[k:k + len(item.choices)])
        k += len(item.choices)
    return scores, pairs


def test_choice_log_likelihoods_equal_transformers(exported):
    """Through checkpoint.load_model of the export, and the model in memory (padded vocabulary), batched 3 at a
    time over rows of different lengths: the same tokens and log-likelihoods as transformers computes alone."""
    folder, _, original, bpe = exported
    theirs, their_splits, merged = hf_reference(folder, BPE_TASK)
    assert merged >= 2  # 'sum' + "mer's day" and 'sum' + 'mit' (before, we scored the merged token: 'summ')
    model, description, _ = load_model(str(folder))
    tokenizer = load_tokenizer(description, str(folder))
    theirs = sum(theirs, [])
    for ours_model in (model.eval(), original):
        ours, pairs = our_scores(ours_model, tokenizer, BPE_TASK)
        assert [(list(c), list(ch)) for c, ch in pairs] == their_splits
        # sums of float32 log-probabilities, ours batched and transformers' one sequence at a time: float32 rounding
        assert sum(ours, []) == pytest.approx(theirs, abs=1e-4)
    assert len(sum(their_splits[-3], [])) > BLOCK + 1  # the long context was cut to fit
    assert len({round(s, 3) for s in theirs}) == len(theirs)  # the model tells the choices apart


def test_accuracies_against_hand_computation():
    items = [Item('', [' a', ' bbb'], 1), Item('', [' a', ' bb', ' ccc', ' d'], 0), Item('', ['x', 'y'], 0),
             Item('', ['xx', 'y'], 1)]
    scores = [[-1.0, -2.5],  # acc: choice 0 (wrong); per character (the joining space not counted) -1 vs -0.83:
              # choice 1 (right; counting the space, -0.5 vs -0.62 would pick choice 0); per token -1 vs -0.62: right
              [-1.0, -3.0, -6.0, -0.5],  # every ranking picks choice 3: wrong
              [-1.0, -1.0],  # a tie goes to the first choice: right
              [-4.0, -3.0]]  # acc right; per character -2 vs -3: wrong; per token (1 vs 3 tokens): -4 vs -1, right
    tokens = [[1, 4], [1, 2, 3, 1], [1, 1], [1, 3]]
    figures = accuracies(items, scores, tokens)
    # acc: wrong, wrong, right, right = 0.5; sample variance 1/3, so the error is sqrt(1/3 / 4)
    assert figures['acc'] == pytest.approx((0.5, math.sqrt(1 / 12)))
    assert figures['acc_norm'] == pytest.approx((0.5, math.sqrt(1 / 12)))  # right, wrong, right, wrong
    assert figures['acc_token'] == pytest.approx((0.75, 0.25))  # right, wrong, right, right: variance 0.25
    assert figures['chance'] == pytest.approx((1 / 2 + 1 / 4 + 1 / 2 + 1 / 2) / 4) and figures['n'] == 4


def test_shots_never_show_the_item_and_repeat_by_seed():
    items = [Item(f'c{i}:', [' yes', ' no'], i % 2) for i in range(12)] + [Item('c3:', [' no', ' yes'], 0)]
    for index in range(len(items)):
        picked = shot_indices(items, None, index, 10, seed=5)
        assert len(set(picked)) == 10 and index not in picked
        assert all(items[j].context != items[index].context for j in picked)  # item 12 repeats item 3's context
        assert picked == shot_indices(items, None, index, 10, seed=5)
    draws = {tuple(shot_indices(items, None, 0, 3, seed)) for seed in range(10)}
    assert len(draws) > 5  # the seed matters
    assert sorted(shot_indices(items, None, 0, 12, seed=1)) == list(range(1, 13))  # all the others
    assert sorted(shot_indices(items, None, 3, 11, seed=1)) == [j for j in range(12) if j != 3]  # not its twin
    with pytest.raises(TaskError, match='shots=12'):
        shot_indices(items, None, 3, 12, seed=1)
    # a separate pool (a train split): any example may be drawn, and the layout is lm-eval's
    pool = [Item('Q: 1+1?\nA:', [' 3', ' 2'], 1)]
    assert fewshot_context(items, pool, 4, 1, seed=0) == 'Q: 1+1?\nA: 2\n\nc4:'
    two = [Item('a', [' x', ' y'], 1), Item('b', [' z', ' w'], 0)]
    assert fewshot_context(two, None, 0, 1, seed=0) == 'b z\n\na'
    assert fewshot_context(two, None, 1, 0, seed=0) == 'b'


def test_named_tasks_map_like_lm_eval():
    """Rows shaped like the Hugging Face datasets', against the text lm-eval's prompts give for them."""
    row = dict(activity_label='Making a cake', ctx_a='A woman stirs flour.', ctx_b='she [title] adds eggs',
               endings=['then bakes it. [step]', ' pours  milk.'], label='1')
    assert hellaswag_item(row) == Item('Making a cake: A woman stirs flour. She. adds eggs',
                                       [' then bakes it. ', ' pours milk.'], 1)  # lm-eval strips first
    row = dict(question='Which is a gas?', choices={'text': ['ice', 'steam'], 'label': ['A', 'B']}, answerKey='B')
    assert arc_item(row) == Item('Question: Which is a gas?\nAnswer:', [' ice', ' steam'], 1)
    assert piqa_item(dict(goal='Open a jar', sol1='twist', sol2='bite', label=0)) == Item(
        'Question: Open a jar\nAnswer:', [' twist', ' bite'], 0)


def test_loading_refuses_bad_task_files(tmp_path):
    path = tmp_path / 't.jsonl'
    for text, message in (('{"context": "a", "choices": ["x"], "label": 0}', 'at least 2'),
                          ('{"context": "a", "choices": ["x", "y"], "label": 2}', '0 to 1'),
                          ('{"context": "a", "choices": ["x", ""], "label": 0}', 'non-empty'),
                          ('{"choices": ["x", "y"], "label": 0}', '"context"'),
                          ('{"context": "a", "choices": ["x", "y"], "label": true}', 'label'),
                          ('not json', 'not JSON'), ('', 'no items'),
                          ('{"context": "ol\u00e1", "choices": ["x", "y"], "label": 0}'.encode('latin-1').decode(
                              'utf-8', 'surrogateescape'), r"line 2 is not UTF-8 \(byte 15 of the line is b'\\xe1'\)")):
        path.write_text('{"context": "ok", "choices": ["x", "y"], "label": 1}\n' * bool(text) + text + '\n',
                        errors='surrogateescape')  # the bytes of a latin-1 file as they are
        with pytest.raises(TaskError, match=message):
            load_task(str(path))
    with pytest.raises(TaskError, match='task_split'):
        load_task(str(path), split='train')


def test_eval_py_on_a_checkpoint_and_an_export(exported, char_dataset, tmp_path):
    """eval.py --task on a checkpoint trained here (char tokenizer) against log-likelihoods summed by plain forward
    passes, and on the Hugging Face export against transformers; then bad tasks, one line each."""
    folder, bpe_task, _, _ = exported
    out = tmp_path / 'out'
    run('train.py', f'--dataset={char_dataset}', f'--out_dir={out}', *TINY_TRAIN, '--max_iters=6',
        '--eval_interval=6', '--eval_iters=1', '--seed=3')
    char_items = [Item('ROMEO:\nShall I compare', [' thee', ' thou', ' tehe'], 0),
                  Item('JULIET:\nThou art more', [' lovely', ' lvoely'], 0),
                  Item("thee to a summer's", [' day', ' dya', ' month', ' number'], 0),
                  Item('ROMEO:\n', ['Shall', 'Thou'], 1), Item('number 1', ['2?', '0?'], 0)]
    char_task = tmp_path / 'char_task.jsonl'
    char_task.write_text(''.join(json.dumps(i._asdict()) + '\n' for i in char_items))
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 5}\n')
    unknown = tmp_path / 'unknown.jsonl'
    unknown.write_text('{"context": "ROMEO", "choices": ["é", "y"], "label": 0}\n')
    char_proc, hf_proc, *errors = run_all([
        ('eval.py', f'--out_dir={out}', f'--task={char_task}', '--device=cpu', '--batch_size=4'),
        ('eval.py', f'--init_from={folder}', f'--task={bpe_task}', '--device=cpu'),
        ('eval.py', f'--out_dir={out}', f'--task={bad}'), ('eval.py', f'--out_dir={out}', '--task=hellaswag_typo'),
        ('eval.py', f'--out_dir={out}', '--task=arc_easy'), ('eval.py', f'--out_dir={out}', f'--task={unknown}')],
        at_once=3)
    assert char_proc.returncode == 0 and hf_proc.returncode == 0, char_proc.stderr + hf_proc.stderr
    assert_clean_error(errors[0], 'bad.jsonl line 1', '"label"')
    assert_clean_error(errors[1], "unknown task 'hellaswag_typo'", 'hellaswag, arc_easy, piqa')
    assert_clean_error(errors[2], 'cannot load arc_easy', 'JSONL')  # offline: the hub is out of reach
    assert_clean_error(errors[3], 'item 1', '--drop_unknown')

    model, description, _ = load_model(str(out))
    char = load_tokenizer(description)
    plain, tokens = [], []
    for item in char_items:  # whole sequences, one at a time; a char's token is its position (the choice's tokens
        row = []               # start after the context's trailing whitespace, lm-eval's convention)
        start = len(item.context.rstrip())
        for choice in item.choices:
            ids = char.encode(item.context + choice)
            with torch.no_grad():
                logprobs = F.log_softmax(model.eval()(torch.tensor([ids[:-1]]))[0][0, :, :char.vocab_size], dim=-1)
            row.append(sum(logprobs[k - 1, ids[k]].item() for k in range(start, len(ids))))
        plain.append(row)
        tokens.append([len(item.context + c) - start for c in item.choices])
    theirs, splits, _ = hf_reference(folder, BPE_TASK)
    tails = iter(len(tail) for _, tail in splits)
    their_tokens = [[next(tails) for _ in item.choices] for item in BPE_TASK]
    for proc, items, scores, counts in ((char_proc, char_items, plain, tokens), (hf_proc, BPE_TASK, theirs, their_tokens)):
        assert_decisive(items, scores, counts)  # eval.py scores in batches: its picks are these (closest: 0.014 apart)
        expected = accuracies(items, scores, counts)
        cells = proc.stdout.strip().splitlines()[1].split()
        assert cells[2:4] == [str(len(items)), '0'] and float(cells[-1]) == pytest.approx(expected['chance'], abs=1e-4)
        for k, name in enumerate(('acc', 'acc_norm', 'acc_token')):
            assert float(cells[4 + 3 * k]) == pytest.approx(expected[name][0], abs=1e-4)
            assert float(cells[6 + 3 * k]) == pytest.approx(expected[name][1], abs=1e-4)

