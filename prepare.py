"""
Prepare your own corpus for training: a text file, a folder of text files, or a Hugging Face dataset,
cleaned, deduplicated, split into train and val by document, and tokenised with any tokenizer kind.

    python prepare.py --input=book.txt                          # a BPE trained on it -> data/book
    python prepare.py --input=texts/ --tokenizer=tiktoken       # GPT-2's BPE, one document per file
    python prepare.py config/prepare_pt_wiki_bpe.py             # a corpus's settings in a config file
    python prepare.py --input=texts/ --topic_labels=texts/topics.jsonl --max_per_topic=500   # see classify_topics.py
    python train.py --dataset=book                              # the tokenizer comes from the dataset

Documents stream through in batches. Worker processes clean and tokenise them; this process drops exact
duplicates, sends each document to train or val by a hash of its text (so the split is the same on every
run, whatever the order of batches or the number of workers) and appends the ids to train.bin and val.bin
through temporary files, renamed into place at the end, meta.json last. Memory stays bounded: of each
document only its hash is kept (~70 bytes, for the duplicate check; none with --dedup=False). char, word
and bpe tokenizers are trained first, in a pass over the train documents.

`python prepare.py --help` lists every setting.
"""
import collections
import hashlib
import itertools
import multiprocessing
import os
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from tqdm import tqdm

from cleaning import CLEANING_OPTIONS, clean
from configurator import configure, fail
from dataset import DatasetError, DatasetWriter, decode_utf8, input_files, make_dataset_folder, token_dtype, unicode_form
from tokenizer import TokenizerError, load_tokenizer, make_tokenizer
from topics import TopicsError, cap_per_topic, read_labels

# -----------------------------------------------------------------------------
# input: text files, or a Hugging Face dataset
input = ''  # a text file, or a folder: every file in it (and below) matching input_glob, in sorted order
input_glob = '*.txt'  # which files of an input folder to read
document = ''  # what one document of a text input is: 'file', 'paragraph' (blank-line separated) or 'line'; '' = 'file' for a folder, 'paragraph' for a file
encoding_errors = 'strict'  # 'replace' turns bytes that are not UTF-8 into U+FFFD instead of stopping
topic_labels = ''  # a folder input: a file of each document's topic (classify_topics.py's topics.jsonl, synthesize.py's manifest.jsonl)
max_per_topic = 0  # with topic_labels: keep at most this many documents of each topic (unlabelled ones all stay); 0: all
topic_seed = 0  # with max_per_topic: which of a topic's documents are kept (a seeded hash of their paths)
hf_dataset = ''  # a Hugging Face dataset: a hub name ('google/wiki40b') or a local folder
hf_config = ''  # the dataset's configuration, if it has several ('ru')
hf_split = 'train'  # which of its splits to read
hf_revision = ''  # a branch, tag or commit of the dataset on the hub ('' = main)
hf_text_column = 'text'  # the column holding the documents
hf_streaming = False  # read the dataset as it downloads, without keeping a copy on disk
# cleaning, in this order
clean_wiki = False  # strip wiki40b's markers (_START_ARTICLE_, _NEWLINE_, ...) and wiki markup ([[links]], {{templates}}, '''bold''', <ref>s)
unescape_html = True  # turn HTML entities (&#234; &amp;) into the characters they stand for
normalize = 'NFC'  # Unicode normal form of the text: NFC (a character typed composed or decomposed is one token), NFKC, NFD, NFKD, or '' to keep it as it is
normalize_whitespace = True  # runs of spaces and tabs become one space, lines are trimmed, at most one blank line in a row (False for code, which it would flatten)
min_chars = 1  # drop documents shorter than this many characters, after cleaning
max_chars = 0  # drop documents longer than this many characters (0: no limit)
dedup = True  # drop exact duplicates of an earlier document (compared after cleaning)
val_fraction = 0.0  # share of the documents that go to val, picked by a hash of each document's text; 0 = auto: 1% of a large corpus, up to 10% of a small one, so that val holds about 100 KB of text
# tokenizer
tokenizer = 'bpe'  # char, word, bpe (these three are trained here), tiktoken or hf
vocab_size = 0  # bpe and word: the most tokens to keep; 0 = the kind's default (bpe 8192; word 65536, the most uint16 ids hold)
min_count = 1  # word: keep only words seen at least this many times in the training text (the rest become <unk>)
tokenizer_name = ''  # tiktoken: the encoding ('' = gpt2); hf: a hub name or a local folder
gguf_file = ''  # hf: read the tokenizer from this .gguf file in tokenizer_name
tokenizer_train_mb = 0.0  # bpe and word: train on at most this many MB of train documents (0: all)
# output and speed
out_dir = ''  # where train.bin, val.bin and meta.json go; '' = data/<name of the input>
num_proc = 0  # worker processes that clean and tokenise; 0 = one per CPU core
batch_mb = 1.0  # MB of text per batch sent to a worker
# -----------------------------------------------------------------------------

_TRAINED_KINDS = ('char', 'word', 'bpe')
_READ_CHUNK = 8 << 20  # bytes of a text file read at a time


# --- reading --------------------------------------------------------------------------------------------

def balance_topics(files):
    """The files left once each topic keeps at most max_per_topic of them; prints how many each topic kept."""
    try:
        labels = read_labels(topic_labels)
    except TopicsError as e:
        fail(e)
    kept, counts, unlabelled = cap_per_topic(files, labels, max_per_topic or len(files), topic_seed, input)
    if not counts:
        fail(f'{topic_labels} labels none of the {len(files):,} files in {input}: label this folder with '
             f'classify_topics.py --input={input}')
    print('documents per topic, kept of all: ' + ', '.join(f'{topic} {k:,} of {n:,}' for topic, (n, k) in counts.items())
          + (f'; {unlabelled:,} without a topic, all kept' if unlabelled else ''))
    return kept


def _line_chunks(f):
    # pieces of about _READ_CHUNK bytes that end at a newline: a UTF-8 character never spans two of them
    rest = b''
    while block := f.read(_READ_CHUNK):
        block = rest + block
        cut = block.rfind(b'\n') + 1
        rest = block[cut:]
        if cut:
            yield block[:cut]
    if rest:
        yield rest


_PARAGRAPH_BREAK = re.compile(r'\n(?:[^\S\n]*\n)+')  # one or more blank (or whitespace-only) lines


def read_text_documents(paths, unit, encoding_errors, progress):
    """The documents of text files: each whole file, each paragraph or each non-blank line."""
    for path in paths:
        with open(path, 'rb') as f:
            if unit == 'file':
                raw = f.read()
                progress.update(len(raw))
                text = decode_utf8(raw, path, encoding_errors).removeprefix('\ufeff')
                if text.strip():
                    yield text
                continue
            start_byte, start_line, carry = 0, 1, ''
            for raw in _line_chunks(f):
                text = decode_utf8(raw, path, encoding_errors, start_byte, start_line)
                if start_byte == 0:
                    text = text.removeprefix('\ufeff')
                start_byte += len(raw)
                start_line += raw.count(b'\n')
                progress.update(len(raw))
                if unit == 'line':
                    yield from (line for line in text.split('\n') if line and not line.isspace())
                else:  # the last paragraph may go on in the next chunk
                    *paragraphs, carry = _PARAGRAPH_BREAK.split(carry + text)
                    yield from (p for p in paragraphs if p and not p.isspace())
            if carry and not carry.isspace():
                yield carry


def load_hf_dataset(name, config, split, revision, streaming):
    try:
        import datasets
    except ImportError:
        raise DatasetError('reading a Hugging Face dataset needs the datasets package: pip install datasets') from None
    what = f"'{name}'" + (f" (config '{config}')" if config else '') + f", split '{split}'"
    try:
        if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in
                                       ('dataset_info.json', 'dataset_dict.json', 'state.json')):
            ds = datasets.load_from_disk(name)  # a folder written by save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"no split '{split}' (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config or None, split=split, revision=revision or None,
                                       streaming=streaming)
    except Exception as e:  # datasets raises many types (not found, offline, bad config or split): all mean this
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise DatasetError(f'cannot load Hugging Face dataset {what}: {lines[0][:300]}; check the name, '
                           f'--hf_config and --hf_split, or download it first / pass a local folder') from None
    return ds, what


def read_hf_documents(ds, what, column, progress):
    if ds.column_names is not None and column not in ds.column_names:
        raise DatasetError(f"Hugging Face dataset {what} has no column '{column}' (columns: "
                           f"{', '.join(ds.column_names)}): set --hf_text_column")
    for batch in ds.select_columns([column]).iter(batch_size=1000):
        texts = batch[column]
        progress.update(len(texts))
        for text in texts:
            if not isinstance(text, str):
                raise DatasetError(f"column '{column}' of {what} holds {type(text).__name__}, not text: "
                                   f"set --hf_text_column to a text column")
            if text and not text.isspace():
                yield text


def batches_of(documents, batch_chars):
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --- cleaning and tokenising in worker processes --------------------------------------------------------

_worker = {}  # this process's cleaning options, tokenizer and document separator


def init_worker(options, tokenizer):
    """tokenizer: a Tokenizer, or None to clean only."""
    _worker.update(options=options, tokenizer=tokenizer)
    if tokenizer is not None:
        # documents end with the end-of-text token; kinds without one (char, word) end them with a blank line
        eot = tokenizer.eot_id is not None
        _worker['separator'] = np.array([tokenizer.eot_id] if eot else tokenizer.encode('\n\n'), dtype=np.uint32)
        _worker['dtype'] = token_dtype(tokenizer.vocab_size)  # what goes to disk: half the bytes to send back
        _worker['separator_bytes'] = 0 if eot else 2


def end_with_parent(parent):
    """Linux: this process is killed when parent, the main process, dies: a SIGKILL or SIGTERM there skips the pool's
    shutdown, and the workers would live on under PID 1."""
    if sys.platform.startswith('linux'):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that took effect
        os._exit(1)


def start_worker(options, tokenizer, parent):
    """tokenizer: a Tokenizer (inherited through fork), its description (spawned workers rebuild it), or None.
    parent: the main process's pid."""
    end_with_parent(parent)
    # Ctrl-C reaches every process of the terminal's group: the main process stops the run and says so once,
    # the workers leave when it shuts the pool down instead of each printing a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one process per core already: the tokenizers library's own threads would only compete
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    init_worker(options, load_tokenizer(tokenizer) if isinstance(tokenizer, dict) else tokenizer)


def process_batch(docs):
    """Clean a batch of documents and drop those outside the length range; return a hash and the UTF-8
    size of each kept document, and either its text (no tokenizer) or its ids, separator included."""
    options, tokenizer = _worker['options'], _worker['tokenizer']
    texts, too_short, too_long = [], 0, 0
    for doc in docs:
        text = clean(doc, options)
        if len(text) < options['min_chars']:
            too_short += 1
        elif options['max_chars'] and len(text) > options['max_chars']:
            too_long += 1
        else:
            texts.append(text)
    data = [t.encode('utf-8') for t in texts]
    hashes = np.array([int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), 'little') for b in data],
                      dtype=np.uint64)
    result = dict(too_short=too_short, too_long=too_long, hashes=hashes,
                  bytes=np.fromiter(map(len, data), dtype=np.int64, count=len(data)))
    if tokenizer is None:
        result['texts'] = texts
        return result
    ids, counts = tokenizer.encode_flat(texts)
    separator = _worker['separator']
    ends = np.repeat(np.cumsum(counts), len(separator))  # after each document's last id
    result['ids'] = np.insert(ids, ends, np.tile(separator, len(counts))).astype(_worker['dtype'], copy=False)
    result['counts'] = counts + len(separator)
    result['bytes'] += _worker['separator_bytes']
    return result


def parallel_map(batches, num_workers, options, tokenizer):
    """process_batch over batches, results in order. A corpus of one batch, or num_workers=1, runs in this
    process: starting workers would take longer. Otherwise in worker processes started the platform's way:
    forked on Linux (instantly, inheriting the tokenizer), spawned elsewhere (each rebuilds the tokenizer
    from its description). At most two batches per worker are in flight: memory stays bounded however fast
    the input is read."""
    batches = iter(batches)
    head = list(itertools.islice(batches, 2))
    batches = itertools.chain(head, batches)
    if num_workers == 1 or len(head) < 2:
        init_worker(options, tokenizer)
        yield from map(process_batch, batches)
        return
    context = multiprocessing.get_context()
    if context.get_start_method() == 'fork':
        # without this the tokenizers library warns about the fork (each worker turns its threads off)
        os.environ.setdefault('TOKENIZERS_PARALLELISM', 'true')
    elif tokenizer is not None:
        tokenizer = tokenizer.describe()
    pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=start_worker,
                               initargs=(options, tokenizer, os.getpid()))
    try:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.submit(process_batch, batch))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


class Router:
    """Decides each document's fate: dropped by the workers (too short or too long), dropped here as a
    duplicate of an earlier one, or sent to train or val by its hash, which makes the split the same
    whatever the order of the documents, the batches and the workers. Counts what it decided."""

    def __init__(self, val_fraction, dedup, min_chars, max_chars):
        self.val_fraction, self.dedup, self.min_chars, self.max_chars = val_fraction, dedup, min_chars, max_chars
        self.seen = set()
        self.val_threshold = np.uint64(int(val_fraction * 2**32))
        self.read = self.too_short = self.too_long = self.duplicates = 0
        self.documents = {'train': 0, 'val': 0}

    def __call__(self, result):
        """Boolean masks over the batch's kept documents: (train, val)."""
        hashes = result['hashes']
        self.read += len(hashes) + result['too_short'] + result['too_long']
        self.too_short += result['too_short']
        self.too_long += result['too_long']
        keep = np.ones(len(hashes), dtype=bool)
        if self.dedup:
            seen = self.seen
            for i, h in enumerate(hashes.tolist()):
                if h in seen:
                    keep[i] = False
                else:
                    seen.add(h)
            self.duplicates += int((~keep).sum())
        is_val = (hashes >> np.uint64(32)) < self.val_threshold  # the upper half: independent of dedup's
        train, val = keep & ~is_val, keep & is_val
        self.documents['train'] += int(train.sum())
        self.documents['val'] += int(val.sum())
        return train, val

    def dropped(self):
        return ', '.join(f'{n:,} {why}' for n, why in [
            (self.too_short, 'empty' if self.min_chars == 1 else f'shorter than {self.min_chars} characters'),
            (self.too_long, f'longer than {self.max_chars} characters'), (self.duplicates, 'duplicates')] if n) or 'none'

    def check(self, source):
        """Fail unless both splits have documents."""
        train, val = self.documents['train'], self.documents['val']
        if not train + val:
            fail(f'empty corpus: {source} has no document to train on ({self.read:,} read; dropped {self.dropped()})')
        if not train or not val:
            fail(f"no document went to {'val' if train else 'train'}: {train + val:,} documents, val_fraction="
                 f"{self.val_fraction}; change --val_fraction, or split the text into more documents "
                 f"(--document=paragraph or line)")


# --- the script -----------------------------------------------------------------------------------------

def default_out_dir():
    if input:
        path = os.path.normpath(input)
        name = os.path.splitext(os.path.basename(path))[0] if os.path.isfile(path) else os.path.basename(path)
    else:
        name = os.path.basename(os.path.normpath(hf_dataset)) + (f'_{hf_config}' if hf_config else '')
    return os.path.join('data', name)


def check_settings():
    if bool(input) == bool(hf_dataset):
        fail('give the corpus as --input=PATH (a text file or folder) or --hf_dataset=NAME, one of the two')
    if document not in ('', 'file', 'paragraph', 'line'):
        fail(f"document={document!r}: use 'file', 'paragraph' or 'line'")
    if encoding_errors not in ('strict', 'replace', 'ignore'):
        fail(f"encoding_errors={encoding_errors!r}: use 'strict', 'replace' or 'ignore'")
    if not 0 <= val_fraction < 1:
        fail(f'val_fraction={val_fraction} must be between 0 and 1 (0: chosen from the corpus size)')
    if vocab_size < 0 or min_count < 1:
        fail(f'vocab_size={vocab_size} must not be negative (0: the default) and min_count={min_count} at least 1')
    if min_chars < 1 or max_chars < 0 or (max_chars and max_chars < min_chars):
        fail(f'min_chars={min_chars}, max_chars={max_chars}: need 1 <= min_chars <= max_chars (max_chars=0: no limit)')
    if num_proc < 0 or batch_mb <= 0 or tokenizer_train_mb < 0:
        fail('num_proc must be >= 0, batch_mb > 0 and tokenizer_train_mb >= 0')
    if topic_labels and (not os.path.isdir(input) or document not in ('', 'file')):
        fail('topic_labels needs a folder --input with one document per file (the labels name files)')
    if max_per_topic < 0 or (max_per_topic and not topic_labels):
        fail(f'max_per_topic={max_per_topic} needs --topic_labels=FILE (from classify_topics.py) and must not be negative')
    if tokenizer == 'hf' and not tokenizer_name:
        fail('tokenizer=hf needs --tokenizer_name: a Hugging Face hub name or a local folder')
    try:
        unicode_form(normalize)
    except DatasetError as e:
        fail(e)


AUTO_VAL_BYTES = 100e3  # the val text an automatic val_fraction aims at: enough for a steady val loss


def auto_val_fraction(total_bytes):
    """val_fraction=0: 1% of a large corpus, more of a small one (up to 10%) so val holds ~100 KB of text; 1% where
    the corpus's size is unknown before reading it (a Hugging Face dataset)."""
    if not total_bytes:
        return 0.01
    return round(min(0.1, max(0.01, AUTO_VAL_BYTES / total_bytes)), 4)


def tokenizer_options():
    return {'word': dict(vocab_size=vocab_size or 65536, min_count=min_count), 'bpe': dict(vocab_size=vocab_size or 8192),
            'tiktoken': dict(name=tokenizer_name or 'gpt2'),
            'hf': dict(name=tokenizer_name, gguf_file=gguf_file or None)}.get(tokenizer, {})


def peak_memory_mib():
    """Peak resident memory in MiB of this process and of its largest worker, or None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    this, worker = (resource.getrusage(who).ru_maxrss * scale / 2**20 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    try:  # Linux: ru_maxrss also counts what the launching process had, when it launched us with vfork
        with open('/proc/self/status') as f:
            this = next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmHWM:'))
    except (OSError, StopIteration, ValueError):
        pass
    return this, worker


def main(argv=None):
    """Ctrl-C (or SIGTERM) at any moment, before the writing starts too: one line, and nothing written."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the temporaries go, the workers stop
    try:
        prepare(argv)
    except KeyboardInterrupt:
        fail('interrupted: nothing was written')


def prepare(argv):
    config = configure(globals(), argv)
    check_settings()
    t0 = time.time()
    output = out_dir or default_out_dir()
    if os.path.exists(output) and not os.path.isdir(output):  # at once, before any work (make_dataset_folder says it later too)
        fail(f'out_dir {output} is a file: give a folder')
    options = dict(clean_wiki=clean_wiki, unescape_html=unescape_html, normalize=unicode_form(normalize),
                   normalize_whitespace=normalize_whitespace, min_chars=min_chars, max_chars=max_chars)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    workers = num_proc or cores

    # fail fast on a bad tokenizer: load a fixed one now, try a trained kind's options on a tiny text
    try:
        tok = None if tokenizer in _TRAINED_KINDS else make_tokenizer(tokenizer, **tokenizer_options())
        if tok is None:
            make_tokenizer(tokenizer, ['ab'], **tokenizer_options())
    except TokenizerError as e:
        fail(e)

    # the documents, read afresh by each pass
    if input:
        try:
            files = input_files(input, input_glob)
        except DatasetError as e:
            fail(e)
        if topic_labels:
            files = balance_topics(files)
        unit = document or ('file' if os.path.isdir(input) else 'paragraph')
        source = f'{input} ({len(files)} file{"s" * (len(files) > 1)}, one document per {unit})'
        total, bar_unit = sum(os.path.getsize(f) for f in files), 'B'

        def documents(progress):
            return read_text_documents(files, unit, encoding_errors, progress)
    else:
        try:
            ds, what = load_hf_dataset(hf_dataset, hf_config, hf_split, hf_revision, hf_streaming)
        except DatasetError as e:
            fail(e)
        source = f'Hugging Face dataset {what}'
        total, bar_unit = (None if hf_streaming else len(ds)), ' docs'

        def documents(progress):
            return read_hf_documents(ds, what, hf_text_column, progress)

    def batches(progress):
        return batches_of(documents(progress), int(batch_mb * 1e6))

    def progress_bar(description):
        return tqdm(total=total, unit=bar_unit, unit_scale=True, desc=description, dynamic_ncols=True)

    split_fraction = val_fraction or auto_val_fraction(total if bar_unit == 'B' else None)
    print(f'preparing {source} -> {output} (up to {workers} worker process{"es" * (workers > 1)})'
          + ('' if val_fraction else f'; val_fraction {split_fraction} (auto)'))
    try:
        created = make_dataset_folder(output)
    except DatasetError as e:
        fail(e)
    done = False
    try:
        # 1. train the tokenizer on the train documents (char: on all, so val has no unknown characters)
        if tok is None:
            route = Router(split_fraction, dedup, min_chars, max_chars)
            limit = tokenizer_train_mb * 1e6 if tokenizer != 'char' else 0
            trained_on = [0]  # bytes

            def training_texts():
                with progress_bar(f'reading for the {tokenizer} tokenizer') as progress:
                    for result in parallel_map(batches(progress), workers, options, None):
                        train, val = route(result)
                        use = train | val if tokenizer == 'char' else train
                        for text, size in zip(itertools.compress(result['texts'], use), result['bytes'][use]):
                            trained_on[0] += int(size)
                            yield text
                        if limit and trained_on[0] >= limit:
                            break
                if tokenizer in ('char', 'word'):
                    yield '\n\n'  # their document separator

            t1 = time.time()
            tok = make_tokenizer(tokenizer, training_texts(), **tokenizer_options())
            if not limit or not trained_on[0]:  # (a limit stops the pass early: the counts are partial)
                route.check(source)
            print(f'trained a {tokenizer} tokenizer of {tok.vocab_size:,} tokens on {trained_on[0] / 1e6:,.1f} MB '
                  f'in {time.time() - t1:.1f}s')

        # 2. clean, tokenise, route, write
        route = Router(split_fraction, dedup, min_chars, max_chars)
        size = {'train': 0, 'val': 0}  # UTF-8 bytes
        unknown = {'train': 0, 'val': 0}  # tokens that are the word tokenizer's <unk>
        with DatasetWriter(output, tok) as out:
            with progress_bar('tokenizing') as progress:
                for result in parallel_map(batches(progress), workers, options, tok):
                    for split, docs in zip(('train', 'val'), route(result)):
                        if docs.any():
                            ids = result['ids'] if docs.all() else result['ids'][np.repeat(docs, result['counts'])]
                            out.write(split, ids)
                            size[split] += int(result['bytes'][docs].sum())
                            if tok.unk_id is not None:
                                unknown[split] += int(np.count_nonzero(ids == tok.unk_id))
            route.check(source)
            tokens = out.tokens
            meta = out.commit(train_tokens=tokens['train'], val_tokens=tokens['val'],
                              # val's: train.py turns val loss into bits per byte with it
                              bytes_per_token=size['val'] / tokens['val'],
                              train_documents=route.documents['train'], val_documents=route.documents['val'],
                              train_bytes=size['train'], val_bytes=size['val'], source=source, prepare_config=config,
                              # eval.py --text cleans a text as the corpus was cleaned
                              cleaning={key: options[key] for key in CLEANING_OPTIONS},
                              **({'unknown_rate': {split: unknown[split] / max(1, tokens[split]) for split in unknown}}
                                 if tok.unk_id is not None else {}))
        done = True
    except (DatasetError, TokenizerError) as e:
        fail(e)
    except BrokenProcessPool:
        fail('a worker process died (out of memory?): try a smaller --num_proc or --batch_mb')
    except KeyboardInterrupt:
        fail('interrupted: nothing was written')
    finally:
        if not done and created and os.path.isdir(output) and not os.listdir(output):
            os.rmdir(output)

    kept = route.documents
    print(f"documents: {route.read:,} read, {kept['train'] + kept['val']:,} kept ({kept['train']:,} "
          f"train, {kept['val']:,} val); dropped {route.dropped()}")
    print(f"tokens: {tokens['train']:,} train, {tokens['val']:,} val ({meta['dtype']}); vocabulary "
          f"{tok.vocab_size:,}; {meta['bytes_per_token']:.2f} bytes per token")
    if 'unknown_rate' in meta:
        rate = meta['unknown_rate']
        hint = ('a larger --vocab_size keeps more words' if tok.vocab_size >= tokenizer_options()['vocab_size']
                else 'a smaller --min_count keeps more words' if min_count > 1
                else 'val has words the train text lacks; bpe and char tokenizers have no unknown tokens')
        print(f"<unk>: {rate['train']:.1%} of train tokens, {rate['val']:.1%} of val tokens ({hint})")
    memory = peak_memory_mib()
    memory = f'; peak memory {memory[0]:,.0f} MiB (largest worker {memory[1]:,.0f} MiB)' if memory else ''
    elapsed = time.time() - t0
    print(f"wrote {output}/train.bin, val.bin, meta.json in {elapsed:.1f}s "
          f"({(size['train'] + size['val']) / 1e6 / elapsed:.1f} MB/s){memory}")
    if tokens['val'] < 1024:
        print(f"note: val holds only {tokens['val']:,} tokens: train with a --block_size below that, or raise --val_fraction")
    name = os.path.basename(os.path.normpath(output))
    in_data = os.path.normpath(output) == os.path.join('data', name)  # train.py looks there first
    print(f'train on it: python train.py --dataset={name if in_data else output}')


if __name__ == '__main__':
    main()
