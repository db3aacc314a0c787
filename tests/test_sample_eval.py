"""sample.py and eval.py as a user runs them, on a tiny character-level model trained here: outputs
against plain forward passes, reproducibility, streaming and interactive prompts, train.py's own val loss,
and one clear line for each kind of bad input."""
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from checkpoint import load_model, read_checkpoint, save_checkpoint
from conftest import ROOT, TINY_TRAIN, assert_clean_error, assert_no_near_tie, run, run_all, script_env
from dataset import load_meta, open_split
from tokenizer import load_tokenizer

SEPARATOR = '\n---------------\n'
BLOCK = 32  # TINY_TRAIN's block_size
pytestmark = pytest.mark.usefixtures('torch_threads_here')


@pytest.fixture(scope='module')
def trained(char_dataset, tmp_path_factory):
    """A checkpoint of a tiny model after 20 iterations, and train.py's output."""
    out = tmp_path_factory.mktemp('sample_eval') / 'out'
    proc = run('train.py', f'--dataset={char_dataset}', f'--out_dir={out}', *TINY_TRAIN, '--max_iters=20',
               '--eval_interval=20', '--seed=3')
    return out, proc.stdout


@pytest.fixture(scope='module')
def loaded(trained):
    model, _, ckpt = load_model(trained[0])
    return model.eval(), load_tokenizer(ckpt['tokenizer'])


def greedy_reference(model, tokenizer, prompt, n):
    """Greedy decoding by plain forward passes over the whole sequence (it stays within block_size). sample.py decodes
    with a KV cache, other arithmetic: no step here may have a near-tie, so that its tokens must be these."""
    ids = tokenizer.encode(prompt)
    assert len(ids) + n <= BLOCK
    with torch.no_grad():
        for step in range(n):
            logits = model(torch.tensor([ids]))[0][0, -1, :tokenizer.vocab_size]
            assert_no_near_tie(logits, f' ({prompt!r}, step {step})')
            ids.append(int(logits.argmax()))
    return tokenizer.decode(ids)


def sample(out, *args, **kw):
    return run('sample.py', f'--out_dir={out}', '--device=cpu', *args, **kw)


def test_greedy_sample_is_the_models_argmax_and_interactive_matches(trained, loaded):
    out, _ = trained
    proc = sample(out, '--start=ROMEO:', '--temperature=0', '--num_samples=1', '--max_new_tokens=20')
    assert proc.stdout == greedy_reference(*loaded, 'ROMEO:', 20) + SEPARATOR
    inter = subprocess.run([sys.executable, str(ROOT / 'sample.py'), f'--out_dir={out}', '--device=cpu',
                            '--interactive=True', '--temperature=0', '--num_samples=1', '--max_new_tokens=20'],
                           input='ROMEO:\nJULIET:\n', capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env=script_env())
    assert inter.returncode == 0, inter.stderr
    assert inter.stdout == proc.stdout + greedy_reference(*loaded, 'JULIET:', 20) + SEPARATOR


def test_a_progress_bar_on_a_terminal_leaves_the_samples_whole(trained, loaded):
    """--progress=True on a terminal: the bar (on stderr) redraws its line, so the first sample is not streamed under
    it but printed, whole, once the bar is gone. (Before, the bar overwrote the streamed text, leaving a stray letter
    per redraw, and with one sample the user saw no text at all.)"""
    from conftest import run_in_terminal, screen
    code, output = run_in_terminal('sample.py', f'--out_dir={trained[0]}', '--device=cpu', '--progress=True',
                                   '--start=ROMEO:', '--temperature=0', '--num_samples=1', '--max_new_tokens=20')
    assert code == 0, output
    shown = '\n'.join(screen(output.replace('\r\n', '\n')))
    assert greedy_reference(*loaded, 'ROMEO:', 20) + SEPARATOR in shown + '\n', shown


def test_seed_reproduces_a_batch_of_samples(trained):
    out, _ = trained
    args = ['--start=JULIET:', '--num_samples=3', '--max_new_tokens=40', '--temperature=1.0', '--progress=True']
    first, again = sample(out, *args, '--seed=7'), sample(out, *args, '--seed=7')
    other = sample(out, *args, '--seed=8')
    assert first.stdout == again.stdout and first.stdout != other.stdout
    samples = first.stdout.split(SEPARATOR)
    assert samples[-1] == '' and len(samples) == 4  # three samples, each followed by the separator
    assert all(s.startswith('JULIET:') and len(s) > len('JULIET:') for s in samples[:3])
    assert len(set(samples[:3])) == 3  # the rows of the batch are sampled independently


def test_prompt_file_stop_string_beams_and_long_prompt(trained, loaded, tmp_path):
    out, _ = trained
    model, tokenizer = loaded
    full = greedy_reference(model, tokenizer, 'ROMEO:', 20)[len('ROMEO:'):]
    stop = full[5:7]
    prompt_file = tmp_path / 'prompt.txt'
    prompt_file.write_text('ROMEO:', encoding='utf-8')
    proc = sample(out, f'--start=FILE:{prompt_file}', '--temperature=0', '--num_samples=1', '--max_new_tokens=20',
                  f'--stop=xyz|{stop}'.replace('\n', '\\n'))
    assert proc.stdout == 'ROMEO:' + full[:full.index(stop)] + SEPARATOR
    # beam search's two best beams, from a prompt longer than the model's block_size
    long_prompt = 'Thou art more lovely and more temperate. ' * 3
    beams = sample(out, f'--start={long_prompt}', '--num_beams=3', '--num_samples=2', '--max_new_tokens=10')
    assert f'note: the prompt has {len(long_prompt)} tokens' in beams.stderr and 'last 32' in beams.stderr
    samples = beams.stdout.split(SEPARATOR)
    assert len(samples) == 3 and all(s.startswith(long_prompt) for s in samples[:2]) and samples[0] != samples[1]


def test_bad_input_gets_one_clear_line(trained, tmp_path):
    out, _ = trained
    incomplete = tmp_path / 'incomplete'
    shutil.copytree(out, incomplete)
    os.remove(incomplete / read_checkpoint(out)['model_file'])
    base = ['sample.py', f'--out_dir={out}', '--device=cpu', '--max_new_tokens=5', '--num_samples=1']
    cases = [
        (base + ['--start=ROMEO: жёлтый'], ("'ж'", 'drop_unknown=True')),
        (base + ['--top_p=1.5'], ('top_p=1.5', '(0, 1]')),
        (base + ['--temperature=-0.5'], ('temperature=-0.5', 'negative')),
        (base + ['--num_beams=0'], ('num_beams=0',)),
        # the setting to change is named (before: "... missing does not exist: pass a checkpoint folder ...")
        (base + [f'--out_dir={tmp_path / "missing"}'], (f'--out_dir={tmp_path / "missing"} does not exist',)),
        (['eval.py', f'--out_dir={tmp_path / "missing"}'], (f'--out_dir={tmp_path / "missing"} does not exist',)),
        (base + [f'--out_dir={incomplete}'], ('missing', 'incomplete')),
        (base + ['--start=FILE:no/such/prompt.txt'], ('no/such/prompt.txt', 'not found')),
        (['eval.py', f'--out_dir={out}', '--device=cpu', f'--text={tmp_path / "none.txt"}'], ('none.txt', 'not found')),
    ]
    for (command, fragments), proc in zip(cases, run_all([c for c, _ in cases])):
        assert_clean_error(proc, *fragments)
    dropped = sample(out, '--start=ROMEO: жёлтый', '--drop_unknown=True', '--max_new_tokens=5', '--num_samples=1')
    assert dropped.stdout.startswith('ROMEO: ')
    assert "note: dropped 6 character(s) the vocabulary lacks: 'ж', 'й', 'л'" in dropped.stderr  # said, on stderr


def test_the_prompt_as_an_argument_or_as_prompt(trained):
    """`python sample.py "ROMEO:"` (an argument that is no config file) and --prompt= are --start=."""
    out, _ = trained
    greedy = ['--temperature=0', '--num_samples=1', '--max_new_tokens=12']
    base = ['sample.py', f'--out_dir={out}', '--device=cpu', *greedy]
    *procs, missing = run_all([base + args for args in (['--start=ROMEO:'], ['ROMEO:'], ['--prompt=ROMEO:'],
                                                        ['config/no_such_config.py'])])
    outputs = {p.stdout for p in procs}
    assert len(outputs) == 1 and outputs.pop().startswith('ROMEO:')
    assert_clean_error(missing, 'no_such_config.py', 'not found')


def parse_table(stdout):
    """eval.py's table as {model: (tokens, loss, perplexity, bits/byte)}, in order."""
    rows = {}
    for line in stdout.strip().splitlines()[1:]:
        cells = line.split()
        rows[cells[0]] = (int(cells[-4].replace(',', '')), *map(float, cells[-3:]))
    return rows


def test_eval_reproduces_the_val_loss_train_printed(trained):
    out, train_stdout = trained
    [line] = [l for l in train_stdout.splitlines() if l.startswith('step 20:')]
    val_loss, val_bpb = re.search(r'val loss (\S+), val bits/byte (\S+)', line).groups()
    proc = run('eval.py', f'--out_dir={out}', '--device=cpu', '--train_batches=True')
    [row] = proc.stdout.strip().splitlines()[1:]
    # exactly: the same weights, batches, shapes, averaging and thread count as train.py's evaluation
    assert row.split()[-3] == val_loss and row.split()[-1] == val_bpb, (line, row)
    assert abs(read_checkpoint(out)['best_val_loss'] - float(val_loss)) < 5e-5


def reference_loss(model, ids):
    """Sum of cross-entropies of ids[1:], predicted in consecutive windows of BLOCK tokens, and the count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, BLOCK):
            window = torch.tensor(np.asarray(ids[s:s + BLOCK + 1], dtype=np.int64))
            logits = model(window[None, :-1])[0][0]
            total += F.cross_entropy(logits, window[1:], reduction='sum').item()
            count += len(window) - 1
    return total, count


def test_eval_full_pass_and_text_file_side_by_side(trained, loaded, char_dataset, tmp_path):
    out, _ = trained
    model, tokenizer = loaded
    # a second checkpoint, different weights, for the side-by-side table
    other = tmp_path / 'other'
    ckpt = read_checkpoint(out)
    changed, _, _ = load_model(out)
    with torch.no_grad():
        changed.lm_head.weight.mul_(4.0)  # a loss that differs in the table's 3 decimals
    save_checkpoint(other, changed, None, 20, 0.0, ckpt['model_args'], ckpt['config'], ckpt['tokenizer'])
    text = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n" * 3
    text_file = tmp_path / 'text.txt'
    text_file.write_text(text, encoding='utf-8')
    proc = run('eval.py', f'--out_dir={out},{other}', '--device=cpu', f'--text={text_file}', '--batch_size=3',
               '--drop_unknown=True')
    # data/shakespeare_char/prepare.py records no cleaning: the text gets NFC alone, as before, and a note says so once
    assert proc.stderr.count('note: --text gets Unicode form NFC (--normalize) alone for ') == 1, proc.stderr
    rows = parse_table(proc.stdout)
    assert list(rows) == [str(out), str(other)]
    ids = tokenizer.encode(tokenizer.drop_unknown(text))
    for name, m in ((str(out), model), (str(other), changed.eval())):
        total, count = reference_loss(m, ids)
        tokens, loss, ppl, bpb = rows[name]
        # eval.py's batches of 3 windows, one window at a time here: float32 rounding, and printed to 4 decimals
        assert tokens == count and loss == pytest.approx(total / count, abs=1e-4)
        assert ppl == pytest.approx(math.exp(total / count), rel=1e-3)  # printed to 3 decimals
        scored_bytes = len(tokenizer.decode(ids[1:]).encode('utf-8'))
        assert bpb == pytest.approx(total / math.log(2) / scored_bytes, abs=1e-4)
    assert rows[str(out)][1] != rows[str(other)][1]
    # the default: every token of the checkpoint's own dataset's val.bin
    val = open_split(char_dataset, 'val', load_meta(char_dataset))
    total, count = reference_loss(model, val)
    [(tokens, loss, _, _)] = parse_table(run('eval.py', f'--out_dir={out}', '--device=cpu').stdout).values()
    assert tokens == count == len(val) - 1 and loss == pytest.approx(total / count, abs=1e-4)  # likewise


def test_bits_per_byte_are_over_the_original_text_and_a_lossy_tokenizer_is_marked(tmp_path):
    """One definition in train.py and eval.py: the loss over the UTF-8 bytes of the original text (eval.py divided by
    the bytes the tokens decode to, which for the word tokenizer is another text). A lossy tokenizer's figure is
    marked in both."""
    from conftest import TINY_TEXT
    from dataset import write_text_dataset
    from tokenizer import make_tokenizer
    data, out = tmp_path / 'words', tmp_path / 'out'
    text = TINY_TEXT.replace('  ', ' ')
    tokenizer = make_tokenizer('word', text)
    write_text_dataset(data, tokenizer, text)
    train = run('train.py', f'--dataset={data}', f'--out_dir={out}', *TINY_TRAIN, '--max_iters=6', '--eval_interval=6',
                '--block_size=16')
    assert '(word tokenizer, lossy: not comparable)' in [l for l in train.stdout.splitlines() if l.startswith('step 6:')][0]
    proc = run('eval.py', f'--out_dir={out}', '--device=cpu')
    row = proc.stdout.strip().splitlines()[1]
    assert proc.stdout.strip().splitlines()[-1].startswith('* a lossy tokenizer')
    model = load_model(out)[0].eval()
    val = np.asarray(open_split(data, 'val', load_meta(data)), dtype=np.int64)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val) - 1, 16):
            window = torch.tensor(val[s:s + 17])
            total += F.cross_entropy(model(window[None, :-1])[0][0], window[1:], reduction='sum').item()
            count += len(window) - 1
    val_text = text[int(0.9 * len(text)):]
    original_bytes = len(val_text.encode('utf-8')) * count / len(val)  # the scored tokens' share of the val text
    # marked lossy; eval.py's batches of 8 windows, one at a time here: float32 rounding, printed to 4 decimals
    assert row.split()[-1].endswith('*')
    assert float(row.split()[-1][:-1]) == pytest.approx(total / math.log(2) / original_bytes, abs=6e-5)
    # the bytes the old figure divided by: the decoded text, with spaces around punctuation and none of the tabs
    assert len(tokenizer.decode(val).encode('utf-8')) != len(val_text.encode('utf-8'))


def test_a_prompt_typed_decomposed_is_the_composed_text_the_model_knows(tmp_path):
    """'cafe' + U+0301 (as some keyboards and macOS file names give it) is 'café' after NFC, which prepare.py writes:
    the char model knows it, in a prompt and in eval.py's --text (before, U+0301 was named an unknown character)."""
    from dataset import write_text_dataset
    from tokenizer import make_tokenizer
    text = ''.join(f'{i}: un café, deux cafés.\n' for i in range(200))
    data, out = tmp_path / 'cafe', tmp_path / 'out'
    write_text_dataset(data, make_tokenizer('char', text), text)
    run('train.py', f'--dataset={data}', f'--out_dir={out}', *TINY_TRAIN, '--max_iters=2', '--eval_interval=2')
    proc = sample(out, 'un cafe\u0301', '--max_new_tokens=3', '--num_samples=1')
    assert proc.stdout.startswith('un caf\u00e9')
    (tmp_path / 'decomposed.txt').write_text('un cafe\u0301, deux cafe\u0301s.\n' * 20, encoding='utf-8')
    table = run('eval.py', f'--out_dir={out}', f'--text={tmp_path / "decomposed.txt"}', '--device=cpu').stdout
    assert table.strip().splitlines()[1].split()[2] == f'{len("un café, deux cafés.") * 20 + 19:,}'  # NFC: one per é
    assert_clean_error(sample(out, 'un cafe\u0301', '--normalize=', '--num_samples=1', check=False), "'\u0301'")


def test_eval_text_is_cleaned_as_prepare_cleaned_the_corpus_and_drops_are_counted(tmp_path):
    """--text gets the cleaning prepare.py recorded for the model's dataset (HTML entities, NFC, whitespace): a raw
    text scores as the same text cleaned by hand, the reference; --drop_unknown says how many characters it dropped
    (counted here one by one) and their share, beside the bits per byte they leave out."""
    import html
    import unicodedata
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text(''.join(f'{i} crème & café, à la carte.\n\n' for i in range(60)), encoding='utf-8')
    data, out = tmp_path / 'data', tmp_path / 'out'
    run('prepare.py', f'--input={corpus}', f'--out_dir={data}', '--tokenizer=char', '--num_proc=1', '--val_fraction=0.3')
    run('train.py', f'--dataset={data}', f'--out_dir={out}', *TINY_TRAIN, '--max_iters=2', '--eval_interval=2')
    model, _, ckpt = load_model(out)
    model, tokenizer = model.eval(), load_tokenizer(ckpt['tokenizer'])
    dirty = ''.join(f'  {i}  cr&egrave;me &amp; cafe\u0301,\t\u00e0 la  carte. \n\n\n' for i in range(12))
    by_hand = '\n'.join(' '.join(line.split()) for line in unicodedata.normalize('NFC', html.unescape(dirty)).split('\n'))
    by_hand = by_hand.replace('\n\n\n', '\n\n').strip()
    assert by_hand.startswith('0 crème & café, à la carte.\n\n1 crème') and '\n\n\n' not in by_hand
    (tmp_path / 'dirty.txt').write_text(dirty, encoding='utf-8')
    proc = run('eval.py', f'--out_dir={out}', f'--text={tmp_path / "dirty.txt"}', '--device=cpu')
    [(tokens, loss, _, bpb)] = parse_table(proc.stdout).values()
    total, count = reference_loss(model, tokenizer.encode(by_hand))
    # eval.py's batches of 8 windows, one window at a time here: float32 rounding, and printed to 4 decimals
    assert tokens == count and loss == pytest.approx(total / count, abs=1e-4)
    assert bpb == pytest.approx(total / math.log(2) / len(by_hand.encode('utf-8')) * len(by_hand) / count, abs=1e-4)
    # characters the corpus never had: dropped, counted, and their share given in the table's row
    odd = ''.join(f'{i} жёлтый crème € café!\n' for i in range(10))
    (tmp_path / 'odd.txt').write_text(odd, encoding='utf-8')
    proc = run('eval.py', f'--out_dir={out}', f'--text={tmp_path / "odd.txt"}', '--device=cpu', '--drop_unknown=True')
    cleaned = odd.strip()  # already NFC, no entities, single spaces
    unknown = sum(1 for c in cleaned if c not in tokenizer.describe()['chars'])
    assert unknown == 10 * 8  # жёлтый, '€' and '!' of each line
    [row] = proc.stdout.strip().splitlines()[1:]
    assert f'dropped {unknown} of {len(cleaned)} characters ({unknown / len(cleaned):.2%})' in row, row
