"""
Evaluate models: loss, perplexity and bits per byte, on a prepared dataset's split or on any text file, or
accuracy on a multiple-choice task. Several models are compared side by side in one table.

    python eval.py --out_dir=out-shakespeare-char                      # its own dataset's val.bin
    python eval.py --out_dir=out-shakespeare-char,out-other --text=sonnets.txt
    python eval.py --init_from=gpt2 --dataset=shakespeare              # GPT-2 itself, no checkpoint needed
    python eval.py --out_dir=out-shakespeare,gpt2 --dataset=shakespeare  # a fine-tune against its base
    python eval.py --out_dir=out-shakespeare-char --train_batches=True  # the val loss train.py printed (same device, dtype, threads)
    python eval.py --out_dir=out-a,out-b --samples=20                  # and the figures of 20 samples of each
    python eval.py --init_from=gpt2 --task=hellaswag --shots=10        # multiple-choice accuracy instead of the loss
    python eval.py --out_dir=out-a --task=data/tasks/shakespeare_mc.jsonl  # a task of your own, one JSON item a line

By default every token of the split (or file) is scored once: the tokens are cut into consecutive windows
of block_size, so a token is predicted from the earlier tokens of its window. train_batches=True instead
draws eval_iters random batches the way train.py's evaluation does (same seed, batch_size and
block_size), which reproduces the loss it reported for the checkpoint. Bits per byte are defined once
(dataset.bits_per_byte), as in train.py: the loss over the UTF-8 bytes of the original text the scored tokens
came from, so models with different tokenizers compare fairly; a lossy tokenizer's figure (word: whitespace
dropped, <unk>) is marked, as it is not charged for what it drops. Loss and perplexity are over the tokenizer's
vocabulary (a checkpoint's padding rows get no probability).

--task scores a multiple-choice task instead (multiple_choice.py says how): accuracy by summed log-likelihood
(acc), per character (acc_norm) and per token (acc_token), each with its standard error, and chance beside them.
"""
import math
import os
import sys
import time

import numpy as np
import torch

from checkpoint import CheckpointError, is_hf_source, load_model
from cleaning import NFC_ONLY, clean
from configurator import configure, fail
from dataset import (DatasetError, bits_per_byte, bytes_per_token, check_split, dataset_dir, decode_utf8, load_meta,
                     normalize_unicode, open_mask, open_split, sample_windows, unicode_form)
from generate import generate_tokens
from hf_gpt2 import GPT2_NAMES, HFError
from metrics import EVALS_NAME, log_eval
from multiple_choice import TaskError, accuracies, choice_logprobs, encode_pair, fewshot_context, load_task
from runtime import autocast, batch_to_device, resolve_device, resolve_dtype
from sample_quality import ngram_set, quality, self_perplexity
from tokenizer import TokenizerError, load_tokenizer, tokenizers_match

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (the checkpoints in out_dir), or gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder; comma-separated for several
out_dir = 'out'  # checkpoint folder; several, comma-separated, go side by side in one table (GPT-2 names and Hugging Face folders too)
checkpoint = 'best'  # of each checkpoint folder: 'best' (lowest val loss) or 'latest'
dataset = ''  # a prepared dataset (folder under data/ or a path); '' is the dataset each checkpoint was trained on
split = 'val'  # the dataset's split: 'val' or 'train'
text = ''  # a UTF-8 text file to evaluate on instead of a dataset
batch_size = 8  # windows per forward pass
block_size = 0  # tokens per window; 0 is each model's block_size
max_tokens = 0  # score only the first max_tokens tokens; 0 scores them all
train_batches = False  # draw random batches exactly as train.py's evaluation does (its seed, batch_size, block_size)
eval_iters = 0  # with train_batches: batches to draw; 0 is the checkpoint's eval_iters
drop_unknown = False  # drop text characters the vocabulary lacks instead of stopping with an error (the table says how many)
encoding_errors = 'strict'  # --text that is not UTF-8: 'strict' stops with an error, 'replace' or 'ignore' its bad bytes
normalize = 'NFC'  # Unicode normal form of the samples' prompt, of task items, and of --text for a model whose dataset recorded no cleaning (else --text gets that cleaning); '' keeps them as they are
progress = True  # a progress bar per model (on stderr)
samples = 0  # > 0: also generate this many samples per model and print their figures (sample_quality.py): variety, repetition, copying from train, self-perplexity
sample_tokens = 200  # tokens per sample (at most the model's block_size, with the prompt)
start = '\n'  # the samples' prompt
temperature = 0.8  # the samples' temperature (top_k 200, as sample.py)
memorization_mb = 10.0  # copied 8-grams are looked up in the first this many MB of the model's training text
task = ''  # multiple-choice accuracy instead of the loss: a JSONL file ({"context", "choices", "label"} a line), or hellaswag, arc_easy, piqa (through `datasets`)
task_split = ''  # a named task's split; '' is the one lm-evaluation-harness reports (hellaswag, piqa: validation; arc_easy: test)
shots = 0  # k-shot: solved examples before each item, drawn by seed from the task's train split (a JSONL task: its other items)
shots_from = ''  # a JSONL file to draw the shots from instead
max_examples = 0  # score only the task's first max_examples items; 0 scores them all
seed = 1337  # the same seed gives the same samples and the same k-shot prompts
device = 'auto'  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where supported, else float16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float16'
# -----------------------------------------------------------------------------
configure(globals())

if split not in ('train', 'val'):
    fail(f"split={split!r}: use 'val' or 'train'")
if text and dataset:
    fail('pass either --text or --dataset, not both')
if text and train_batches:
    fail('train_batches draws from a dataset split: it cannot be combined with --text')
if batch_size < 1 or block_size < 0 or max_tokens < 0 or eval_iters < 0:
    fail('batch_size must be at least 1; block_size, max_tokens and eval_iters must not be negative')
try:
    normalize = unicode_form(normalize)
except DatasetError as e:
    fail(e)
if task and (text or dataset or train_batches):
    fail('--task scores a multiple-choice task instead of the loss: drop --text, --dataset and --train_batches')
if shots < 0 or max_examples < 0:
    fail('shots and max_examples must not be negative')
if (task_split or shots_from) and not task:
    fail('task_split and shots_from go with --task')
if samples < 0 or sample_tokens < 1 or not 0 < temperature < math.inf or memorization_mb < 0:
    fail('samples and memorization_mb must not be negative, sample_tokens must be at least 1, temperature positive and finite')
try:
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
except ValueError as e:
    fail(e)
# the same precision handling as train.py, so train_batches reproduces its numbers on the same device
ctx = autocast(device, dtype)

entries = [e.strip() for e in (out_dir if init_from == 'resume' else init_from).split(',') if e.strip()]
if not entries:
    fail('no model given: pass --out_dir=FOLDER or --init_from=gpt2')
for entry in entries:
    if init_from == 'resume' and not os.path.exists(entry) and entry not in GPT2_NAMES:
        fail(f'--out_dir={entry} does not exist: pass --out_dir=FOLDER, the out_dir of a train.py run (several: '
             f'comma-separated), or --init_from=gpt2 for GPT-2\'s weights')


if not text and not dataset and not task:
    for entry in entries:
        if is_hf_source(entry):
            fail(f'{entry} was not trained here, so it has no dataset of its own: pass --dataset=NAME or --text=FILE')


def load(entry):
    """(model, tokenizer, the checkpoint's JSON or None) of one table entry."""
    try:
        model, description, ckpt = load_model(entry, device, which=checkpoint)
    except (CheckpointError, HFError) as e:
        fail(e)
    if description is None:
        fail(f'{entry} has no tokenizer (no tokenizer files beside its weights): cannot read text for it')
    try:
        return model.eval(), load_tokenizer(description, entry), ckpt
    except TokenizerError as e:
        fail(e)


def text_cleaning(entry, tokenizer, ckpt):
    """The cleaning prepare.py recorded for the dataset the model was trained on (meta.json's 'cleaning'), so that
    --text reads like the corpus did; without one (a dataset of data/*/prepare.py, weights not trained here, a
    dataset no longer at hand), --normalize alone, as before, and a note once."""
    name = ckpt['config'].get('dataset') if ckpt else None
    why = 'it was not trained here'
    if name:
        folder = dataset_dir(name)
        try:
            meta = load_meta(folder)
            if 'cleaning' in meta and tokenizers_match(tokenizer.describe(), meta['tokenizer']):
                return meta['cleaning']
            why = (f'{folder} now holds a dataset of another tokenizer' if 'cleaning' in meta
                   else f'its dataset {folder} recorded none')
        except DatasetError:
            why = f'its dataset {folder} is not at hand'
    if not cleaning_notes:
        print(f'note: --text gets Unicode form {normalize or "(none)"} (--normalize) alone for {entry}: {why}, so the '
              f"cleaning its corpus had (HTML entities, whitespace) is unknown", file=sys.stderr)
    cleaning_notes.append(entry)
    return dict(NFC_ONLY, normalize=normalize)


cleaning_notes = []  # the models whose --text got --normalize alone: the note is printed once


def text_tokens(entry, tokenizer, ckpt):
    """The text file's token ids, cleaned as the model's corpus was; the UTF-8 bytes of the text they encode per
    token; and with drop_unknown, (characters dropped, characters of the cleaned text)."""
    if not os.path.isfile(text):
        fail(f'text file {text} not found')
    with open(text, 'rb') as f:
        try:
            content = decode_utf8(f.read(), text, encoding_errors)
        except DatasetError as e:
            fail(e)
    content = clean(content, text_cleaning(entry, tokenizer, ckpt))
    dropped = None
    if drop_unknown:
        kept = tokenizer.drop_unknown(content)
        dropped, content = (len(content) - len(kept), len(content)), kept
    try:
        ids = tokenizer.encode(content)
    except TokenizerError as e:
        fail(f'{text}: {e}')
    return np.array(ids, dtype=np.int64), len(content.encode('utf-8')) / max(1, len(ids)), dropped


def split_tokens(entry, tokenizer, ckpt):
    """The dataset split's token ids (a memmap), its loss mask (a chat dataset's, else None), its folder and meta."""
    name = dataset or (ckpt['config'].get('dataset') if ckpt else None)
    if not name:
        fail(f'{entry} was not trained here, so it has no dataset of its own: pass --dataset=NAME or --text=FILE')
    folder = dataset_dir(name)
    try:
        meta = load_meta(folder)
        check_split(folder, split, meta)
        data = open_split(folder, split, meta)
        mask = open_mask(folder, split, meta)
    except DatasetError as e:
        fail(e)
    if not tokenizers_match(tokenizer.describe(), meta['tokenizer']):
        fail(f'{folder} was tokenized with another tokenizer than {entry} uses: evaluate it on a dataset prepared with its tokenizer')
    return data, mask, folder, meta


@torch.no_grad()
def full_pass(model, ids, block, name, mask=None):
    """Sum of the losses (nats) of predicting ids[1:], in consecutive windows of block tokens, and their count.
    With a chat dataset's mask, only the targets it marks count (the assistant's tokens, as in training)."""
    n_targets = len(ids) - 1
    starts = list(range(0, n_targets, block))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_targets, unit='tok', desc=name, leave=False, file=sys.stderr, dynamic_ncols=True)
    total, scored = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        T = min(block, n_targets - chunk[0])  # only the last window of all can be shorter
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)  # -1: a padded position, ignored by the loss
        for row, s in enumerate(chunk):
            window = torch.from_numpy(np.asarray(ids[s:s + T + 1], dtype=np.int64))
            x[row, :len(window) - 1], y[row, :len(window) - 1] = window[:-1], window[1:]
            if mask is not None:
                y[row, :len(window) - 1][torch.from_numpy(mask[s + 1:s + len(window)] == 0)] = -1
        count = int((y >= 0).sum())
        if count:  # (a window of a chat's user turns alone has nothing to score)
            with ctx:
                _, loss = model(x.to(device), y.to(device))
            total += loss.item() * count
            scored += count
        if bar is not None:
            bar.update(sum(min(T, n_targets - s) for s in chunk))
    if bar is not None:
        bar.close()
    return total, scored


@torch.no_grad()
def like_train(model, mask, folder, meta, cfg, name):
    """The mean loss of train.py's estimate_loss() for this split: same seed, batches and averaging."""
    iters = eval_iters or cfg['eval_iters']
    rng = np.random.default_rng([cfg['seed'], 0, 1 if split == 'val' else 0])
    losses = torch.zeros(iters)
    batches = range(iters)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=name, leave=False, file=sys.stderr, dynamic_ncols=True)
    for k in batches:
        x, y = batch_to_device(sample_windows(open_split(folder, split, meta), cfg['block_size'], cfg['batch_size'], rng,
                                              mask), device)
        with ctx:
            _, loss = model(x, y)
        losses[k] = loss.item()
    return losses.mean().item(), iters * cfg['batch_size'] * cfg['block_size']


@torch.no_grad()
def sample_figures(model, tokenizer, ckpt, entry):
    """The figures of `samples` samples of the model (sample_quality.quality, and its self-perplexity)."""
    try:
        prompt = tokenizer.encode(normalize_unicode(start, normalize)) or [tokenizer.eot_id or 0]
    except TokenizerError as e:
        fail(f'--start for {entry}: {e}')
    n_new = min(sample_tokens, model.config.block_size - len(prompt))
    torch.manual_seed(seed)
    idx = torch.tensor([prompt] * samples, dtype=torch.long, device=device)
    with ctx:
        steps = list(generate_tokens(model, idx, n_new, temperature, 200, vocab_size=tokenizer.vocab_size))
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(samples)]
    rows = [r[:r.index(tokenizer.eot_id)] if tokenizer.eot_id in r else r for r in rows]  # a sample ends at end-of-text
    figures = quality([tokenizer.decode(r) for r in rows], train_ngrams(tokenizer, ckpt))
    with ctx:
        figures['self-perplexity'] = self_perplexity(model, prompt, rows)
    return figures


train_ngram_sets = {}  # dataset folder -> its train text's 8-grams: decoded once for all the models trained on it


def train_ngrams(tokenizer, ckpt):
    """The 8-grams of the first memorization_mb MB of the model's training text, or None where it is not at hand."""
    name = dataset or (ckpt['config'].get('dataset') if ckpt else None)
    if not name:
        return None
    try:
        folder = dataset_dir(name)
        meta = load_meta(folder)
        if not tokenizers_match(tokenizer.describe(), meta['tokenizer']):
            return None
        if folder not in train_ngram_sets:
            n = int(memorization_mb * 1e6 / (bytes_per_token(meta, 'train') or 4))
            ids = np.asarray(open_split(folder, 'train', meta)[:n], dtype=np.int64)
            train_ngram_sets[folder] = ngram_set(tokenizer.decode(ids))
    except DatasetError:
        return None
    return train_ngram_sets[folder]


def loss_row(model, tokenizer, ckpt, entry):
    """(entry, data, tokens, loss, perplexity, bits/byte) of one model on the text or dataset split. On a chat
    dataset the tokens are the assistant's, the only ones its loss counts (as train.py's)."""
    mask = None
    if text:
        ids, bpt, dropped = text_tokens(entry, tokenizer, ckpt)
        # what was dropped is not scored: its share says how far the figures are from the whole text's
        source = text if dropped is None else (f'{text}, dropped {dropped[0]:,} of {dropped[1]:,} characters '
                                               f'({dropped[0] / max(1, dropped[1]):.2%})')
    else:
        ids, mask, folder, meta = split_tokens(entry, tokenizer, ckpt)
        source = f'{folder} {split}' + (' (replies)' if mask is not None else '')
        bpt = bytes_per_token(meta, split)  # the original text's bytes per token, as train.py divides by
    if max_tokens:
        ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        fail(f'{source} holds {len(ids)} token(s) for {entry}: nothing to predict')
    if int(ids.max()) >= model.config.vocab_size:
        fail(f'{source} holds token id {int(ids.max())}, outside the vocabulary of {entry} ({model.config.vocab_size})')
    if train_batches:
        if ckpt is None:
            fail(f'{entry} was not trained by train.py: train_batches needs its training config')
        cfg = ckpt['config']
        loss, n = like_train(model, mask, folder, meta, cfg, entry)
    else:
        block = min(block_size or model.config.block_size, model.config.block_size)
        total, n = full_pass(model, ids, block, entry, mask)
        if not n:
            fail(f'{source} holds no assistant token to score for {entry}: pass more --max_tokens')
        loss = total / n
    bpb = f'{bits_per_byte(loss, bpt):.4f}' if bpt else 'n/a'
    if not tokenizer.lossless:
        bpb += '*'  # see the note under the table
    return entry, source, n, loss, math.exp(loss), bpb


def normalized(item):
    """A task item in the Unicode form prepare.py gives corpora, so it reads like the text the model was trained on."""
    return item._replace(context=normalize_unicode(item.context, normalize),
                         choices=[normalize_unicode(c, normalize) for c in item.choices])


def task_prompts():
    """The task's items to score (the first max_examples) and each one's context after its k-shot examples: built
    once, so every model is asked the same."""
    try:
        items, pool = load_task(task, task_split, shots, shots_from)
        items = [normalized(item) for item in items]
        pool = None if pool is None else [normalized(item) for item in pool]
        scored = items[:max_examples or len(items)]
        return scored, [fewshot_context(items, pool, i, shots, seed) for i in range(len(scored))]
    except TaskError as e:
        fail(e)


def task_row(model, tokenizer, entry):
    """(entry, task, n, shots, accuracies(...)) of one model on the task."""
    items, contexts = task_items, task_contexts
    pairs = []
    for i, (item, context) in enumerate(zip(items, contexts)):
        context = tokenizer.drop_unknown(context) if drop_unknown else context
        for choice in item.choices:
            choice = tokenizer.drop_unknown(choice) if drop_unknown else choice
            try:
                pairs.append(encode_pair(tokenizer, context, choice))
            except (TaskError, TokenizerError) as e:
                fail(f'{task} item {i + 1} for {entry}: {e}')
    top = max(max(c + ch) for c, ch in pairs)
    if top >= model.config.vocab_size:
        fail(f'{task} encodes to token id {top}, outside the vocabulary of {entry} ({model.config.vocab_size})')
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(pairs), unit='choice', desc=entry, leave=False, file=sys.stderr, dynamic_ncols=True)
    block = min(block_size or model.config.block_size, model.config.block_size)
    try:
        with ctx:
            flat = choice_logprobs(model, pairs, block, batch_size, tokenizer.vocab_size, device, bar)
    except TaskError as e:
        fail(f'{task} for {entry}: {e}')
    if bar is not None:
        bar.close()
    scores, counts, k = [], [], 0
    for item in items:
        scores.append(flat[k:k + len(item.choices)])
        counts.append([len(ch) for _, ch in pairs[k:k + len(item.choices)]])
        k += len(item.choices)
    return entry, task, len(items), shots, accuracies(items, scores, counts)


def record(entry, ckpt):
    """Append what was just measured of entry, a checkpoint folder of train.py's, to its evals.jsonl, for its report
    page (report.py); a folder that cannot be written to (read-only) gets a note instead."""
    measured = dict(iter=ckpt['iter_num'], date=time.strftime('%Y-%m-%d %H:%M:%S'), checkpoint=checkpoint)
    if task:
        _, name, n, k, figures = task_rows[-1]
        measured.update(task=name, items=n, shots=k,
                        **{key: figures[key] for key in ('acc', 'acc_norm', 'acc_token', 'chance')})
    else:
        _, source, n, loss, ppl, bpb = rows[-1]
        measured.update(data=source, tokens=n, train_batches=train_batches, loss=loss, perplexity=ppl,
                        bits_per_byte=None if bpb == 'n/a' else float(bpb.rstrip('*')),  # as printed, 4 decimals
                        lossy=bpb.endswith('*'))
    if samples:
        measured.update(samples=samples, sample_figures=figure_rows[-1][1], start=start, temperature=temperature)
    try:
        log_eval(entry, measured)
    except OSError as e:
        print(f'note: cannot record this evaluation in {os.path.join(entry, EVALS_NAME)}: {e.strerror}',
              file=sys.stderr)


if task:
    task_items, task_contexts = task_prompts()
rows, task_rows, figure_rows = [], [], []
for entry in entries:
    model, tokenizer, ckpt = load(entry)
    if task:
        task_rows.append(task_row(model, tokenizer, entry))
    else:
        rows.append(loss_row(model, tokenizer, ckpt, entry))
    if samples:
        figure_rows.append((entry, sample_figures(model, tokenizer, ckpt, entry)))
    del model
    if ckpt is not None and os.path.isdir(entry):  # one of train.py's folders, not GPT-2's weights
        record(entry, ckpt)


def print_table(cells, left):
    """Rows of strings in columns, the first `left` of them left-aligned."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        print('  '.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def with_error(figure):
    """A (mean, standard error) pair as 'mean ± error' (one item has no error)."""
    mean, stderr = figure
    return f'{mean:.4f} ± {stderr:.4f}' if not math.isnan(stderr) else f'{mean:.4f}'


if rows:
    print_table([('model', 'data', 'tokens', 'loss', 'perplexity', 'bits/byte')] + [
        (e, s, f'{n:,}', f'{loss:.4f}', f'{ppl:.3f}', bpb) for e, s, n, loss, ppl, bpb in rows], 2)
if task_rows:
    print_table([('model', 'task', 'items', 'shots', 'acc', 'acc_norm', 'acc_token', 'chance')] + [
        (e, t, f'{n:,}', str(k), with_error(f['acc']), with_error(f['acc_norm']), with_error(f['acc_token']),
         f"{f['chance']:.4f}") for e, t, n, k, f in task_rows], 2)
if any(bpb.endswith('*') for *_, bpb in rows):
    print('* a lossy tokenizer (word: whitespace dropped, unknown words as <unk>): its loss leaves out what it drops, '
          'so its bits per byte do not compare with other tokenizers')
if figure_rows:
    names = list(figure_rows[0][1])
    cells = [('model', 'samples', *names)]
    for entry, figures in figure_rows:
        cells.append((entry, str(samples), *('n/a' if figures[k] is None else f'{figures[k]:.3f}' if isinstance(
            figures[k], float) else str(figures[k]) for k in names)))
    print()
    print_table(cells, 1)
