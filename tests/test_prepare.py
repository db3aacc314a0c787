"""The general prepare.py: cleaning, reading each kind of input, the document-level split, what lands in
train.bin/val.bin/meta.json (checked against an independent computation), and bad input. Offline: the
corpora are written here; Hugging Face datasets and tokenizers are built here and read from local folders."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_TEXT, assert_clean_error, run as run_script
import cleaning
import prepare
from dataset import load_meta
from tokenizer import TokenizerError, load_tokenizer, make_tokenizer

TIKTOKEN_CACHE = ROOT.parent / 'shared' / 'data' / 'tiktoken_cache'
# offline, GPT-2's BPE files from ../shared, no progress bars (a failing script's stderr is its error line)
ENV = dict(HF_DATASETS_OFFLINE='1', TQDM_DISABLE='1', HF_DATASETS_DISABLE_PROGRESS_BARS='1',
           **({'TIKTOKEN_CACHE_DIR': str(TIKTOKEN_CACHE)} if TIKTOKEN_CACHE.is_dir() and 'TIKTOKEN_CACHE_DIR' not in os.environ else {}))


def run(script, *args, check=True):
    return run_script(script, *args, check=check, env=ENV)


def error_line(proc):
    """The one line a script prints on bad input: exit code 2, no traceback."""
    assert_clean_error(proc)
    assert proc.returncode == 2 and proc.stderr.startswith('error: '), proc.stderr
    return proc.stderr.strip()


def split_of(text, val_fraction):
    """The documented rule, computed independently: the upper 32 bits of the text's 64-bit BLAKE2b hash."""
    h = int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')
    return 'val' if (h >> 32) < int(val_fraction * 2**32) else 'train'


def load(folder):
    meta = json.loads((Path(folder) / 'meta.json').read_text(encoding='utf-8'))
    bins = {s: np.fromfile(Path(folder) / f'{s}.bin', dtype=meta['dtype']) for s in ('train', 'val')}
    return meta, bins


def documents_of(ids, tok):
    """Split a stream of ids at the end-of-text token and decode each document."""
    ends = np.flatnonzero(ids == tok.eot_id)
    assert ends.size and ends[-1] == len(ids) - 1, 'every document ends with the end-of-text token'
    return [tok.decode(doc[:-1]) for doc in np.split(ids, ends[:-1] + 1)]


WORDS = ['the', 'king', 'speaks', 'князь', 'Генуя', 'поместья', 'coração', 'ação', 'São', 'Paulo',
         '北京', '首都', 'você', 'hear', 'me', 'further', 'proceed', 'Лукка', 'língua', 'falada']


def sentences(n, seed):
    rng = np.random.default_rng(seed)
    return [' '.join(rng.choice(WORDS, size=rng.integers(4, 12))) + rng.choice(['.', '!', '?', ';'])
            for _ in range(n)]


# --- cleaning ------------------------------------------------------------------------------------------

def test_strip_wiki_wiki40b_markers():
    raw = ('\n_START_ARTICLE_\nЛев Толстой\n_START_SECTION_\nБиография\n_START_PARAGRAPH_\n'
           'Родился в Ясной Поляне._NEWLINE_Учился в Казани.\n_START_PARAGRAPH_\nВторой абзац.')
    expected = 'Лев Толстой\n\nБиография\n\nРодился в Ясной Поляне.\nУчился в Казани.\n\nВторой абзац.'
    assert cleaning.strip_wiki(raw).strip() == expected
    assert cleaning.normalize_spaces(cleaning.strip_wiki(raw)) == expected
    # a copy storing the article as a Python bytes literal decodes to the same text
    assert cleaning.strip_wiki(repr(raw.encode('utf-8'))).strip() == expected


def test_strip_wiki_markup_keeps_what_a_reader_sees():
    raw = ("== História ==\n'''São Paulo''' é a [[cidade]] mais populosa do [[Brasil|país]].<ref>IBGE, 2020</ref> "
           "{{Info/Cidade|nome={{lang|pt|SP}}}}Fundada em 1554.<ref name=\"a\"/> [[Ficheiro:SP.jpg|thumb|Vista]]"
           "<br/>Ver [https://example.org o sítio].<!-- comentário --> __NOTOC__")
    assert cleaning.normalize_spaces(cleaning.strip_wiki(raw)) == \
        'História\nSão Paulo é a cidade mais populosa do país. Fundada em 1554. Ver o sítio.'
    plain = "D'Artagnan disse: 2 < 3 e x == y."  # single quotes, a lone '<' and '==' mid-line stay
    assert cleaning.strip_wiki(plain) == plain


@pytest.mark.parametrize('raw, expected', [
    ('  Hello   world \n\n\n\n  next\tline\u00a0here  ', 'Hello world\n\nnext line here'),
    ('line one\r\nline two\r\n', 'line one\nline two'),
    ('already clean\n\ntext', 'already clean\n\ntext'),
    ('     — Eh bien, mon prince.\n     Так говорила', '— Eh bien, mon prince.\nТак говорила'),
    (' \t \n ', ''),
])
def test_normalize_spaces(raw, expected):
    assert cleaning.normalize_spaces(raw) == expected


def test_clean_order_and_switches():
    options = dict(clean_wiki=True, unescape_html=True, normalize_whitespace=True, min_chars=1, max_chars=0)
    assert cleaning.clean("G&#234;nes  et  '''Lucques'''&nbsp;!", options) == 'Gênes et Lucques !'
    options.update(clean_wiki=False, unescape_html=False, normalize_whitespace=False)
    assert cleaning.clean(" G&#234;nes  '''x''' ", options) == " G&#234;nes  '''x''' "


def test_default_cleaning_is_what_the_readme_says_and_each_step_switches_off(tmp_path):
    """By default: HTML entities unescaped, Unicode NFC (a decomposed 'é' is the composed one), whitespace
    normalised; wiki markup only when asked. Each step off gives the text back as it was."""
    corpus = tmp_path / 'corpus.txt'
    raw = ''.join(f"{i} G&#234;nes  et\tLucques: cafe\u0301 ''ok''\n\n" for i in range(30))  # 30 documents
    corpus.write_text(raw, encoding='utf-8')
    run('prepare.py', f'--input={corpus}', f'--out_dir={tmp_path / "a"}', '--tokenizer=char', '--num_proc=1', '--dedup=False',
        '--val_fraction=0.3')
    meta = load_meta(tmp_path / 'a')
    assert meta['prepare_config']['normalize'] == 'NFC'
    # recorded for eval.py --text, which cleans a text as this corpus was cleaned
    assert meta['cleaning'] == dict(clean_wiki=False, unescape_html=True, normalize='NFC', normalize_whitespace=True)
    assert set(meta['tokenizer']['chars']) == set("0123456789 Gênes et Lucques: café ''ok''\n")  # documents joined by blank lines
    run('prepare.py', f'--input={corpus}', f'--out_dir={tmp_path / "b"}', '--tokenizer=char', '--num_proc=1', '--dedup=False',
        '--val_fraction=0.3', '--unescape_html=False', "--normalize=", '--normalize_whitespace=False')
    assert set(load_meta(tmp_path / 'b')['tokenizer']['chars']) == set(raw)
    assert load_meta(tmp_path / 'b')['cleaning'] == dict(clean_wiki=False, unescape_html=False, normalize='',
                                                         normalize_whitespace=False)
    assert cleaning.clean('cafe\u0301', dict(clean_wiki=False, unescape_html=False, normalize='NFC',
                                            normalize_whitespace=False)) == 'caf\u00e9'
    assert_clean_error(run('prepare.py', f'--input={corpus}', '--normalize=NFX', check=False), "normalize='NFX'")


def test_encode_flat_matches_encode_batch(monkeypatch):
    texts = ['Ну, князь.', '', 'coração 北京', 'the king speaks <|endoftext|>']
    toks = [make_tokenizer('char', texts), make_tokenizer('word', texts), make_tokenizer('bpe', texts, vocab_size=300)]
    if TIKTOKEN_CACHE.is_dir():
        monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(TIKTOKEN_CACHE))
    try:
        toks.append(make_tokenizer('tiktoken', name='gpt2'))
    except TokenizerError:
        assert not TIKTOKEN_CACHE.is_dir()  # only without GPT-2's files (and a network) is it left out
    for tok in toks:
        flat, counts = tok.encode_flat(texts)
        lists = tok.encode_batch(texts)
        assert flat.dtype == np.uint32 and counts.tolist() == [len(ids) for ids in lists], tok
        assert flat.tolist() == [i for ids in lists for i in ids], tok
        empty, no_counts = tok.encode_flat([])
        assert empty.size == 0 and no_counts.size == 0


# --- what prepare writes ---------------------------------------------------------------------------------

def paragraph_corpus():
    """(file text, the documents prepare must keep, in order, after cleaning, dropping and dedup)."""
    raw, kept = [], []
    for i, s in enumerate(sentences(40, seed=0)):
        raw.append(f'   {i}: {s}\t(  fim )  ')  # indented, tabs, runs of spaces
        kept.append(f'{i}: {s} ( fim )')
    raw += ['Hi', kept[3], 'ab ' * 200, f'  {kept[5]}  ', '&#234; stays: not unescaped']  # short, dup, long, dup
    kept += ['&#234; stays: not unescaped']
    return '\n \n'.join(raw) + '\n', kept


PARAGRAPH_SETTINGS = ['--tokenizer=bpe', '--vocab_size=300', '--val_fraction=0.3', '--min_chars=5', '--max_chars=400',
                      '--normalize_whitespace=True', '--unescape_html=False']  # a default step, switched off


@pytest.fixture(scope='module')
def paragraph_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp('paragraphs')
    text, kept = paragraph_corpus()
    (folder / 'corpus.txt').write_text(text, encoding='utf-8')
    out = folder / 'out'
    result = run('prepare.py', f'--input={folder / "corpus.txt"}', f'--out_dir={out}', '--num_proc=1', *PARAGRAPH_SETTINGS)
    return folder, out, kept, result


def test_prepare_writes_what_an_independent_computation_expects(paragraph_dataset):
    folder, out, kept, result = paragraph_dataset
    meta, bins = load(out)
    tok = load_tokenizer(meta['tokenizer'])
    assert meta['tokenizer']['kind'] == 'bpe' and meta['vocab_size'] == tok.vocab_size == 300
    assert meta['dtype'] == 'uint16'
    docs = {'train': [d for d in kept if split_of(d, 0.3) == 'train'], 'val': [d for d in kept if split_of(d, 0.3) == 'val']}
    assert docs['train'] and docs['val']
    for split in ('train', 'val'):
        expected = [i for d in docs[split] for i in tok.encode(d) + [tok.eot_id]]
        assert bins[split].tolist() == expected, split
        assert documents_of(bins[split], tok) == docs[split]
        assert meta[f'{split}_documents'] == len(docs[split]) and meta[f'{split}_tokens'] == len(expected)
    val_bytes = sum(len(d.encode('utf-8')) for d in docs['val'])
    assert meta['bytes_per_token'] == pytest.approx(val_bytes / len(bins['val']))
    # the trained BPE travels in meta.json, and beside it as tokenizer.json for other tools
    assert (out / 'tokenizer.json').read_text(encoding='utf-8') == meta['tokenizer']['tokenizer_json']
    assert not [p for p in out.iterdir() if '.tmp' in p.name]
    # the summary counts what happened
    assert f'documents: 45 read, {len(kept)} kept' in result.stdout
    assert 'dropped 1 shorter than 5 characters, 1 longer than 400 characters, 2 duplicates' in result.stdout


def test_split_is_the_same_whatever_the_order_batches_and_workers(paragraph_dataset, tmp_path):
    folder, out, kept, _ = paragraph_dataset
    args = [f'--input={folder / "corpus.txt"}', '--num_proc=2', '--batch_mb=0.0005', *PARAGRAPH_SETTINGS]
    # many tiny batches over two worker processes, forked (Linux) or spawned (macOS, Windows: they rebuild
    # the tokenizer from its description): byte-identical files
    run('prepare.py', *args, f'--out_dir={tmp_path / "forked"}')
    spawn = "import multiprocessing, sys; multiprocessing.set_start_method('spawn'); import prepare; prepare.main(sys.argv[1:])"
    result = subprocess.run([sys.executable, '-c', spawn, *args, f'--out_dir={tmp_path / "spawned"}'], cwd=ROOT,
                            env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for name in ('train.bin', 'val.bin', 'tokenizer.json'):
        for workers in ('forked', 'spawned'):
            assert (tmp_path / workers / name).read_bytes() == (out / name).read_bytes(), (workers, name)
    # the documents in reverse order: the same documents go to val (with a char tokenizer, whose vocabulary
    # does not depend on the order)
    reverse = tmp_path / 'reverse.txt'
    reverse.write_text('\n\n'.join(reversed(kept)), encoding='utf-8')
    forward = tmp_path / 'forward.txt'
    forward.write_text('\n\n'.join(kept), encoding='utf-8')
    vals = []
    for path in (forward, reverse):
        run('prepare.py', f'--input={path}', f'--out_dir={tmp_path / path.stem}', '--tokenizer=char',
            '--val_fraction=0.3', '--num_proc=1')
        meta, bins = load(tmp_path / path.stem)
        tok = load_tokenizer(meta['tokenizer'])
        vals.append(set(tok.decode(bins['val']).split('\n\n')) - {''})
    assert vals[0] == vals[1] == {d for d in kept if split_of(d, 0.3) == 'val'}


def test_folder_input_with_char_tokenizer_and_line_documents(tmp_path):
    texts = {'a.txt': 'Ну, князь.\n', 'sub/b.txt': 'coração\n\n\n   ação  \n', 'c.txt': 'Gênes et Lucques.\r\n',
             'skip.md': 'not me'}
    for name, text in texts.items():
        (tmp_path / 'in' / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'in' / name).write_text(text, encoding='utf-8', newline='')
    # one document per file: sorted paths, the .md file left out
    run('prepare.py', f'--input={tmp_path / "in"}', f'--out_dir={tmp_path / "files"}', '--tokenizer=char',
        '--val_fraction=0.5', '--dedup=False', '--normalize_whitespace=True')
    meta, bins = load(tmp_path / 'files')
    tok = load_tokenizer(meta['tokenizer'])
    docs = ['Ну, князь.', 'Gênes et Lucques.', 'coração\n\nação']  # a.txt, c.txt, sub/b.txt
    assert set(tok.chars) == set(''.join(docs) + '\n')  # trained on all documents and the separator
    for split in ('train', 'val'):
        assert tok.decode(bins[split]) == ''.join(d + '\n\n' for d in docs if split_of(d, 0.5) == split)
    assert meta['bytes_per_token'] == pytest.approx(
        sum(len(d.encode()) + 2 for d in docs if split_of(d, 0.5) == 'val') / len(bins['val']))
    # one document per line
    run('prepare.py', f'--input={tmp_path / "in"}', f'--out_dir={tmp_path / "lines"}', '--tokenizer=char',
        '--val_fraction=0.5', '--document=line', '--normalize_whitespace=True')
    meta, bins = load(tmp_path / 'lines')
    tok = load_tokenizer(meta['tokenizer'])
    lines = ['Ну, князь.', 'Gênes et Lucques.', 'coração', 'ação']
    assert sorted(tok.decode(np.concatenate([bins['train'], bins['val']])).split('\n\n')[:-1]) == sorted(lines)


@pytest.fixture(scope='module')
def hf_tokenizer_folder(tmp_path_factory):
    """A byte-level BPE with an end-of-text token, saved as a hub tokenizer is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(sentences(200, seed=1), trainers.BpeTrainer(
        vocab_size=400, special_tokens=['<eos>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder = tmp_path_factory.mktemp('hf_tokenizer')
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<eos>').save_pretrained(folder)
    return folder


def test_hf_dataset_with_the_ru_wiki_gemma_config(tmp_path, hf_tokenizer_folder):
    """The Russian Wikipedia config, with a local wiki40b-like dataset and a local hf tokenizer in place of
    the hub's: the wiki markers go, stubs shorter than min_chars go, the documents end with eos."""
    from datasets import Dataset, DatasetDict
    articles = [f'\n_START_ARTICLE_\nСтатья {i}\n_START_PARAGRAPH_\n{s}_NEWLINE_{t}'
                for i, (s, t) in enumerate(zip(sentences(30, seed=2), sentences(30, seed=3)))]
    articles.append('\n_START_ARTICLE_\nЗаготовка\n_START_PARAGRAPH_\nКоротко.')  # a stub
    DatasetDict(train=Dataset.from_dict({'text': articles, 'wikidata_id': ['Q1'] * len(articles)})
                ).save_to_disk(tmp_path / 'wiki')
    run('prepare.py', 'config/prepare_ru_wiki_gemma.py', f'--hf_dataset={tmp_path / "wiki"}', '--hf_config=',
        f'--tokenizer_name={hf_tokenizer_folder}', '--min_chars=90', '--val_fraction=0.3', f'--out_dir={tmp_path / "ru"}')
    meta, bins = load(tmp_path / 'ru')
    tok = load_tokenizer(meta['tokenizer'])
    assert meta['tokenizer'] == {'kind': 'hf', 'name': str(hf_tokenizer_folder), 'tokenizer_file': 'tokenizer.json',
                                 'eos_token': '<eos>'} and tok.eot_id == 0
    expected = [f'Статья {i}\n\n{s}\n{t}' for i, (s, t) in enumerate(zip(sentences(30, seed=2), sentences(30, seed=3)))]
    expected = [d for d in expected if len(d) >= 90]  # the stub goes too
    assert 15 < len(expected) < 25
    for split in ('train', 'val'):
        assert documents_of(bins[split], tok) == [d for d in expected if split_of(d, 0.3) == split]
    assert meta['prepare_config']['clean_wiki'] is True


def test_a_hugging_face_tokenizer_travels_with_the_dataset_and_the_checkpoint(tmp_path, hf_tokenizer_folder):
    """Prepared with a tokenizer from a folder that is then deleted (another machine, a hub that is not there):
    its tokenizer.json, beside meta.json and copied into the checkpoint folder, is what train, sample and eval read."""
    from conftest import TINY_TEXT, TINY_TRAIN
    folder, corpus, data, out = tmp_path / 'tok', tmp_path / 'corpus.txt', tmp_path / 'data', tmp_path / 'out'
    shutil.copytree(hf_tokenizer_folder, folder)
    corpus.write_text(TINY_TEXT, encoding='utf-8')
    run('prepare.py', f'--input={corpus}', '--tokenizer=hf', f'--tokenizer_name={folder}', f'--out_dir={data}',
        '--val_fraction=0.2', '--num_proc=1')
    reference = load_tokenizer(load_meta(data)['tokenizer'])
    shutil.rmtree(folder)
    tok = load_tokenizer(load_meta(data)['tokenizer'], data)
    assert tok.encode(TINY_TEXT[:500]) == reference.encode(TINY_TEXT[:500]) and tok.eot_id == reference.eot_id
    with pytest.raises(TokenizerError):
        load_tokenizer(load_meta(data)['tokenizer'])  # without the dataset's folder, the name alone is gone
    run_script('train.py', f'--dataset={data}', f'--out_dir={out}', *TINY_TRAIN, '--max_iters=2', '--eval_interval=2')
    assert (out / 'tokenizer.json').read_bytes() == (data / 'tokenizer.json').read_bytes()
    shutil.move(str(data), str(tmp_path / 'moved'))  # the checkpoint needs its own copy only
    sample = run_script('sample.py', f'--out_dir={out}', '--start=ROMEO:', '--num_samples=1', '--max_new_tokens=5')
    assert sample.stdout.startswith('ROMEO:')
    table = run_script('eval.py', f'--out_dir={out}', f'--text={corpus}', '--max_tokens=200').stdout
    assert len(table.strip().splitlines()) == 2


def test_a_gguf_file_named_as_the_tokenizer_is_read_from_its_folder(tmp_path, monkeypatch):
    """--tokenizer_name=path/to/model.gguf works (it used to say 'no such folder'): the folder and gguf_file."""
    import transformers
    calls = []
    monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained',
                        lambda name, **kw: calls.append((name, kw)) or (_ for _ in ()).throw(OSError('stop here')))
    (tmp_path / 'gemma.gguf').write_bytes(b'GGUF')
    with pytest.raises(TokenizerError):
        make_tokenizer('hf', name=str(tmp_path / 'gemma.gguf'))
    assert calls == [(str(tmp_path), {'trust_remote_code': False, 'gguf_file': 'gemma.gguf'})]


def test_word_vocabulary_settings_unknown_rate_and_an_automatic_val_split(tmp_path):
    """--min_count and --vocab_size shape the word vocabulary as documented (checked against a count made here), the
    share of <unk> is reported and recorded, and val_fraction=0 (the default) gives a small corpus a usable val split
    (10% for one of a few KB, where 1% would be a handful of paragraphs)."""
    from collections import Counter
    import re as regex
    docs = [f'{i}: ' + ' '.join(sentences(3, seed=i)) for i in range(300)]
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n\n'.join(docs) + '\n', encoding='utf-8')
    proc = run('prepare.py', f'--input={corpus}', '--tokenizer=word', '--min_count=3', f'--out_dir={tmp_path / "w"}',
               '--num_proc=1')
    meta, bins = load(tmp_path / 'w')
    assert 'val_fraction 0.1 (auto)' in proc.stdout and meta['prepare_config']['val_fraction'] == 0.0
    val_docs = [d for d in docs if split_of(d, 0.1) == 'val']
    assert meta['val_documents'] == len(val_docs) > 15
    counts = Counter(w for d in docs if split_of(d, 0.1) == 'train' for w in regex.findall(r'\w+|[^\w\s]', d))
    counts['\n'] = 2  # the document separator, seen once in training ('\n\n')
    tok = load_tokenizer(meta['tokenizer'])
    assert set(tok.vocab[1:]) == {w for w, n in counts.items() if n >= 3}
    for split in ('train', 'val'):
        rate = float(np.count_nonzero(bins[split] == 0)) / len(bins[split])
        assert meta['unknown_rate'][split] == pytest.approx(rate) and rate > 0
    assert f"<unk>: {meta['unknown_rate']['train']:.1%} of train tokens" in proc.stdout
    capped = run('prepare.py', f'--input={corpus}', '--tokenizer=word', '--vocab_size=50', f'--out_dir={tmp_path / "c"}',
                 '--num_proc=1')
    assert load_meta(tmp_path / 'c')['vocab_size'] == 50 and 'a larger --vocab_size keeps more words' in capped.stdout


def test_streamed_hf_dataset_is_read_the_same_way():
    """--hf_streaming gives an IterableDataset: documents, blanks skipped, and the column check, as for a Dataset."""
    from datasets import Dataset

    class Progress:
        def __init__(self):
            self.n = 0

        def update(self, n):
            self.n += n

    ds = Dataset.from_dict({'text': ['Ну', ' \n', 'coração'], 'id': [1, 2, 3]})
    for version in (ds, ds.to_iterable_dataset()):
        progress = Progress()
        assert list(prepare.read_hf_documents(version, 'x', 'text', progress)) == ['Ну', 'coração']
        assert progress.n == 3
        with pytest.raises(prepare.DatasetError, match="no column 'body' .columns: text, id.: set --hf_text_column"):
            list(prepare.read_hf_documents(version, 'x', 'body', progress))


# --- bad input: one line, exit code 2, nothing left behind ---------------------------------------------

def test_empty_corpus(tmp_path):
    (tmp_path / 'empty.txt').write_text(' \n\n \t\n', encoding='utf-8')
    for kind in ('bpe', 'char', 'tiktoken'):
        line = error_line(run('prepare.py', f'--input={tmp_path / "empty.txt"}', f'--out_dir={tmp_path / "out"}',
                              f'--tokenizer={kind}', check=False))
        assert 'empty corpus' in line or ('tiktoken' in line and not TIKTOKEN_CACHE.is_dir()), line
        assert not (tmp_path / 'out').exists()
    (tmp_path / 'short.txt').write_text('ab\n\ncd\n', encoding='utf-8')
    for kind in ('char', 'bpe'):
        line = error_line(run('prepare.py', f'--input={tmp_path / "short.txt"}', f'--out_dir={tmp_path / "out"}',
                              '--min_chars=10', f'--tokenizer={kind}', check=False))
        assert line.startswith('error: empty corpus') and '(2 read; dropped 2 shorter than 10 characters)' in line
    assert not (tmp_path / 'out').exists()


def test_single_document_cannot_be_split(tmp_path):
    (tmp_path / 'one.txt').write_text('One paragraph only, no blank line in it.\nSecond line.\n', encoding='utf-8')
    line = error_line(run('prepare.py', f'--input={tmp_path / "one.txt"}', f'--out_dir={tmp_path / "out"}',
                          '--tokenizer=char', check=False))
    assert 'no document went to' in line and '--document=' in line
    assert not (tmp_path / 'out').exists()


def test_not_utf8_says_where_and_replace_works(tmp_path):
    good = 'Ну, князь.\n\nGênes et Lucques.\n\n'
    (tmp_path / 'latin1.txt').write_bytes(good.encode('utf-8') * 3 + 'Gênes, São Paulo\n'.encode('latin-1'))
    line = error_line(run('prepare.py', f'--input={tmp_path / "latin1.txt"}', f'--out_dir={tmp_path / "out"}',
                          '--tokenizer=char', check=False))
    offset = len(good.encode('utf-8') * 3) + 1
    assert f'latin1.txt is not UTF-8: byte {offset} (line 13)' in line and '--encoding_errors=replace' in line
    assert not (tmp_path / 'out').exists()
    run('prepare.py', f'--input={tmp_path / "latin1.txt"}', f'--out_dir={tmp_path / "out"}', '--tokenizer=char',
        '--encoding_errors=replace', '--val_fraction=0.5')
    meta, _ = load(tmp_path / 'out')
    assert '\ufffd' in meta['tokenizer']['chars']


def test_unknown_tokenizer_kind_and_missing_hf_tokenizer(tmp_path):
    (tmp_path / 'a.txt').write_text('some text\n\nmore text\n', encoding='utf-8')
    line = error_line(run('prepare.py', f'--input={tmp_path / "a.txt"}', '--tokenizer=bep', check=False))
    assert "unknown tokenizer kind 'bep'" in line and "did you mean 'bpe'" in line
    line = error_line(run('prepare.py', f'--input={tmp_path / "a.txt"}', '--tokenizer=hf', '--tokenizer_name=no-such-org/tok',
                          f'--out_dir={tmp_path / "out"}', check=False))
    assert "cannot load Hugging Face tokenizer 'no-such-org/tok'" in line and 'pass a local folder' in line
    line = error_line(run('prepare.py', f'--input={tmp_path / "a.txt"}', '--tokenizer=bpe', '--vocab_size=100', check=False))
    assert 'vocab_size must be at least 257' in line
    assert not (tmp_path / 'out').exists() and not (ROOT / 'data' / 'a').exists()


def test_bad_sources(tmp_path, hf_tokenizer_folder):
    cases = [
        ([], 'give the corpus as --input'),
        ([f'--input={tmp_path}/missing.txt'], 'missing.txt not found'),
        ([f'--input={tmp_path}', '--input_glob=*.xyz'], 'no files matching *.xyz'),
        ([f'--hf_dataset={tmp_path}/no_dataset'], f"cannot load Hugging Face dataset '{tmp_path}/no_dataset'"),
        (['--input=a.txt', '--hf_dataset=x'], 'one of the two'),
        (['--input=a.txt', '--document=page'], "use 'file', 'paragraph' or 'line'"),
        (['--input=a.txt', '--val_fraction=1.5'], 'between 0 and 1'),
        (['--input=a.txt', '--tokenizer=hf'], 'needs --tokenizer_name'),
    ]
    for args, message in cases:
        assert message in error_line(run('prepare.py', *args, f'--out_dir={tmp_path / "out"}', check=False)), args
    from datasets import Dataset
    Dataset.from_dict({'body': ['a document']}).save_to_disk(tmp_path / 'ds')
    line = error_line(run('prepare.py', f'--hf_dataset={tmp_path / "ds"}', f'--out_dir={tmp_path / "out"}', check=False))
    assert "has no column 'text' (columns: body): set --hf_text_column" in line
    assert not (tmp_path / 'out').exists()


def test_failed_prepare_leaves_the_previous_dataset_intact(paragraph_dataset, tmp_path):
    folder, out, _, _ = paragraph_dataset
    target = tmp_path / 'kept'
    run('prepare.py', f'--input={folder / "corpus.txt"}', f'--out_dir={target}', '--tokenizer=char', '--val_fraction=0.3')
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    (tmp_path / 'bad.txt').write_bytes('Gênes\n\n'.encode('utf-8') * 1000 + b'\xff\n')
    error_line(run('prepare.py', f'--input={tmp_path / "bad.txt"}', f'--out_dir={target}', '--tokenizer=char', check=False))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


# ----------------------------------------------------------------------------- data/shakespeare_char/prepare.py

def test_prepare_writes_splits_and_tokenizer(char_dataset):
    meta = load_meta(char_dataset)
    assert meta['dtype'] == 'uint16' and meta['vocab_size'] == len(set(TINY_TEXT))
    tokenizer = load_tokenizer(meta['tokenizer'])
    n = int(0.9 * len(TINY_TEXT))
    for split, expected in (('train', TINY_TEXT[:n]), ('val', TINY_TEXT[n:])):
        ids = np.fromfile(char_dataset / f'{split}.bin', dtype=np.uint16)
        assert tokenizer.decode(ids) == expected
        assert meta[f'{split}_tokens'] == len(expected)


def test_prepare_without_network_or_input_says_how_to_supply_the_text(tmp_path):
    # an unreachable proxy makes the download fail at once, as it does offline
    proxy = {'https_proxy': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9'}
    proc = run_script('data/shakespeare_char/prepare.py', f'--out_dir={tmp_path}', check=False, env=proxy)
    assert_clean_error(proc, 'cannot download', f'{tmp_path}/input.txt', '--input=PATH')
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_prepare_rejects_empty_and_non_utf8_text(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    assert_clean_error(run_script('data/shakespeare_char/prepare.py', f'--input={empty}', f'--out_dir={tmp_path}/a', check=False), 'empty')
    latin1 = tmp_path / 'latin1.txt'
    latin1.write_bytes('first line\nol\u00e1 mundo\n'.encode('latin-1'))
    proc = run_script('data/shakespeare_char/prepare.py', f'--input={latin1}', f'--out_dir={tmp_path}/b', check=False)
    assert_clean_error(proc, 'not UTF-8', 'line 2', '--encoding_errors=replace')
    run_script('data/shakespeare_char/prepare.py', f'--input={latin1}', f'--out_dir={tmp_path}/b', '--encoding_errors=replace')
    assert '\ufffd' in load_meta(tmp_path / 'b')['tokenizer']['chars']


@pytest.mark.parametrize('out_dir, message', [
    ('/proc/version/data', 'cannot create out_dir /proc/version/data: Not a directory; give a folder you can write to'),
    ('/proc/data', 'cannot create out_dir /proc/data: '),  # the kernel's own folder: no new entries
])
def test_an_out_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, out_dir, message):
    """A traceback from os.makedirs before (NotADirectoryError, FileNotFoundError)."""
    (tmp_path / 'input.txt').write_text(TINY_TEXT)
    with pytest.raises(SystemExit) as exit:
        prepare.main([f'--input={tmp_path / "input.txt"}', '--tokenizer=char', '--num_proc=1', f'--out_dir={out_dir}'])
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and error.count('\n') == 0 and message in error, error
