"""
Multiple-choice evaluation the way the literature scores it (GPT-3's paper, lm-evaluation-harness): the model
reads each item's context, the log-likelihood of every choice given that context is summed over the choice's
tokens, and the item counts as right when its labelled choice scores highest. Three rankings, as lm-eval reports:
- acc: the summed log-likelihood, which favours short choices;
- acc_norm: divided by the choice's length in characters (lm-eval's acc_norm; the space that joins a choice to
  its context is not counted), which compares across tokenizers;
- acc_token: divided by its number of tokens (GPT-3's normalisation).
Accuracy comes with its standard error (lm-eval's: the sample standard deviation over the items / sqrt(n)), and
chance, the mean of 1 / number of choices, beside it.

A task is a JSONL file, one item per line: {"context": "...", "choices": ["...", "..."], "label": 0}. The model
scores context + choice as written, so a choice that follows a word starts with its space; the tokens are split
between them by lm-eval's rule (encode_pair). hellaswag,
arc_easy and piqa load through `datasets` (online, or from its cache) mapped to that form with lm-eval's prompts.
k-shot prompts put k solved examples (context + right choice), separated by blank lines, before the item's
context; they are drawn from the task's train split (a JSONL task: its other items, or a file of its own) by a
random generator seeded with (seed, item's index), so every model and every run sees the same prompts, and an
item never sees itself or an example with its own context.
"""
import json
import math
import os
import re
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F


class TaskError(Exception):
    """A task that cannot be loaded or scored; the message says what to do."""


class Item(NamedTuple):
    context: str
    choices: list  # of str
    label: int  # index of the right choice


# ---------------------------------------------------------------------------- loading

def _hellaswag_text(text):
    """lm-eval's cleaning of HellaSwag (WikiHow's '[title]' and '[header]' markup)."""
    text = text.strip().replace(' [title]', '. ')
    text = re.sub(r'\[.*?\]', '', text)
    return text.replace('  ', ' ')


def hellaswag_item(row):
    context = _hellaswag_text(row['activity_label'] + ': ' + row['ctx_a'] + ' ' + row['ctx_b'].capitalize())
    return Item(context, [' ' + _hellaswag_text(e) for e in row['endings']], int(row['label']))


def arc_item(row):
    return Item(f"Question: {row['question']}\nAnswer:", [' ' + c for c in row['choices']['text']],
                row['choices']['label'].index(row['answerKey']))


def piqa_item(row):
    return Item(f"Question: {row['goal']}\nAnswer:", [' ' + row['sol1'], ' ' + row['sol2']], int(row['label']))


# name: (Hugging Face dataset, its config, the split lm-eval reports, the split shots come from, row -> Item)
NAMED_TASKS = {
    'hellaswag': ('Rowan/hellaswag', None, 'validation', 'train', hellaswag_item),
    'arc_easy': ('allenai/ai2_arc', 'ARC-Easy', 'test', 'train', arc_item),
    'piqa': ('baber/piqa', None, 'validation', 'train', piqa_item),
}


def read_jsonl(path):
    """The items of a JSONL task file, each checked; TaskError naming the line otherwise."""
    if not os.path.isfile(path):
        raise TaskError(f'task file {path} not found: pass a JSONL file (one {{"context", "choices", "label"}} '
                        f'object per line) or one of {", ".join(NAMED_TASKS)}')
    items = []
    with open(path, 'rb') as f:
        for number, raw in enumerate(f, 1):
            where = f'{path} line {number}'
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError as e:
                raise TaskError(f'{where} is not UTF-8 (byte {e.start} of the line is {raw[e.start:e.start + 1]!r}): '
                                f'convert the file to UTF-8') from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f'{where} is not JSON ({e.msg}): write one object per line') from None
            if not isinstance(row, dict) or not isinstance(row.get('context'), str):
                raise TaskError(f'{where}: needs a "context" string, a "choices" list of strings and a "label" index')
            choices, label = row.get('choices'), row.get('label')
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise TaskError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
                raise TaskError(f'{where}: "label" must be the index of the right choice, 0 to {len(choices) - 1}')
            items.append(Item(row['context'], choices, label))
    if not items:
        raise TaskError(f'{path} holds no items: write one {{"context", "choices", "label"}} object per line')
    return items


def load_named(name, split):
    """A named task's split through `datasets`, as Items."""
    path, config, _, _, to_item = NAMED_TASKS[name]
    try:
        import datasets
    except ImportError:
        raise TaskError(f'{name} loads through the datasets package: pip install datasets') from None
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # datasets raises many types (offline, not found, no such split): all mean this
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TaskError(f"cannot load {name} (Hugging Face dataset {path}, split '{split}'): {first}; it needs "
                        f"the network once (then datasets' cache), or pass a JSONL task file") from None
    return [to_item(row) for row in rows]


def load_task(task, split='', shots=0, shots_from=''):
    """(items to score, pool of solved examples for k-shot prompts, or None where the pool is the items
    themselves). task: a JSONL path or a name in NAMED_TASKS; split: a named task's split ('' is lm-eval's)."""
    if task in NAMED_TASKS:
        _, _, default_split, shots_split, _ = NAMED_TASKS[task]
        items = load_named(task, split or default_split)
        pool = load_named(task, shots_split) if shots and not shots_from else None
    elif task.endswith('.jsonl') or os.path.exists(task):
        if split:
            raise TaskError(f'task_split is for the named tasks ({", ".join(NAMED_TASKS)}): a JSONL file is one split')
        items, pool = read_jsonl(task), None
    else:
        raise TaskError(f'unknown task {task!r}: pass a JSONL file (one {{"context", "choices", "label"}} object '
                        f'per line) or one of {", ".join(NAMED_TASKS)}')
    if shots and shots_from:
        pool = read_jsonl(shots_from)
    return items, pool


# ---------------------------------------------------------------------------- k-shot prompts

def shot_indices(items, pool, index, shots, seed):
    """Which examples of pool (the items themselves where pool is None) go before item `index`: `shots` of them,
    uniformly without replacement, never the item itself nor one with the same context."""
    examples = items if pool is None else pool
    context = items[index].context
    rng = np.random.default_rng([seed, index])
    seen, chosen = set(), []
    while len(chosen) < shots and len(seen) < len(examples):
        j = int(rng.integers(len(examples)))
        if j not in seen:
            seen.add(j)
            if not (pool is None and j == index) and examples[j].context != context:
                chosen.append(j)
    if len(chosen) < shots:
        raise TaskError(f'shots={shots} needs {shots} examples besides the item, but only {len(chosen)} are there: '
                        f'pass fewer shots or more examples (shots_from)')
    return chosen


def fewshot_context(items, pool, index, shots, seed):
    """Item `index`'s context after `shots` solved examples, lm-eval's layout: blank lines between them."""
    examples = items if pool is None else pool
    solved = [examples[j].context + examples[j].choices[examples[j].label]
              for j in shot_indices(items, pool, index, shots, seed)]
    return '\n\n'.join(solved + [items[index].context])


# ---------------------------------------------------------------------------- scoring

def encode_pair(tokenizer, context, choice):
    """(context ids, choice ids), lm-evaluation-harness's rule, so figures compare with the harness's: whitespace
    that ends the context goes with the choice (BPEs attach a space to the word after it), the context ids are the
    context's own tokens, and the choice ids are the tokens of context + choice past as many tokens as the context
    has. Where the context's last token merges with the choice's first characters ('Fra' + 'nce.' encodes as
    'France.'), the model reads the context's own tokens ('Fra'), and the merged token is not scored, only those
    past the context's length. Char tokenizers split exactly at the boundary. An empty context becomes the
    end-of-text token (lm-eval)."""
    context_ids = tokenizer.encode(context.rstrip())
    choice_ids = tokenizer.encode(context + choice)[len(context_ids):]
    if not choice_ids:
        raise TaskError(f'choice {choice!r} encodes to no tokens after its context: it cannot be scored')
    if not context_ids:
        if tokenizer.eot_id is None:
            raise TaskError(f'an empty context before {choice!r}, and a {tokenizer.kind} tokenizer has no end-of-text '
                            f'token to stand for it: give the item a context')
        context_ids = [tokenizer.eot_id]
    return context_ids, choice_ids


@torch.no_grad()
def choice_logprobs(model, pairs, block_size, batch_size=8, vocab_size=None, device='cpu', progress=None):
    """The summed log-probability of each pair's choice ids given its context ids (a list of (context ids,
    choice ids)), in float32 over the first vocab_size logits (the tokenizer's vocabulary). Contexts longer than
    block_size lose their start. progress: a tqdm-like bar to update per pair, or None."""
    for _, choice_ids in pairs:
        if len(choice_ids) > block_size:
            raise TaskError(f'a choice of {len(choice_ids)} tokens does not fit the model\'s context of {block_size}')
    sequences = [(context + choice)[-(block_size + 1):] for context, choice in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(sequences[i]))  # similar lengths together: less padding
    scores = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = len(sequences[rows[0]]) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: not a choice token
        for r, i in enumerate(rows):
            seq, n_choice = sequences[i], len(pairs[i][1])
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, len(seq) - 1 - n_choice:len(seq) - 1] = torch.tensor(seq[-n_choice:])
        y = y.to(device)
        wanted = y >= 0
        # only the choices' positions go through log_softmax (in float32): a few rows of the logits, not all
        logits = model(x.to(device))[0][wanted][:, :vocab_size].float()
        logprobs = F.log_softmax(logits, dim=-1).gather(1, y[wanted].unsqueeze(1)).squeeze(1)
        row_of = wanted.nonzero()[:, 0]
        sums = torch.zeros(len(rows), dtype=torch.float32, device=device).index_add_(0, row_of, logprobs).tolist()
        for r, i in enumerate(rows):
            scores[i] = sums[r]
        if progress is not None:
            progress.update(len(rows))
    return scores


# ---------------------------------------------------------------------------- figures

def mean_and_stderr(values):
    """The mean and lm-eval's standard error of it: sample standard deviation (n - 1) / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    stderr = math.sqrt(values.var(ddof=1) / n) if n > 1 else float('nan')
    return float(values.mean()), stderr


def accuracies(items, scores, token_counts):
    """{'acc', 'acc_norm', 'acc_token': (mean, standard error)} and 'chance', 'n'. scores[i][j]: item i's choice
    j's summed log-likelihood; token_counts[i][j]: its number of tokens. Ties go to the first choice (argmax)."""
    right = {'acc': [], 'acc_norm': [], 'acc_token': []}
    for item, s, t in zip(items, scores, token_counts):
        s = np.asarray(s, dtype=np.float64)
        chars = np.array([max(1, len(c.lstrip())) for c in item.choices], dtype=np.float64)
        right['acc'].append(np.argmax(s) == item.label)
        right['acc_norm'].append(np.argmax(s / chars) == item.label)
        right['acc_token'].append(np.argmax(s / np.asarray(t, dtype=np.float64)) == item.label)
    figures = {name: mean_and_stderr(v) for name, v in right.items()}
    figures['chance'] = float(np.mean([1 / len(item.choices) for item in items]))
    figures['n'] = len(items)
    return figures
