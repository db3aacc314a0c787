"""
A prepared dataset on disk: a folder holding train.bin and val.bin (flat arrays of token ids, memmapped
during training) and meta.json, which says how to read them and which tokenizer made them.

meta.json keys: tokenizer (the tokenizer's description, see tokenizer.py), vocab_size, dtype ('uint16'
or 'uint32'), and whatever statistics the prepare script recorded (train_tokens, val_tokens,
bytes_per_token, ...).
"""
import json
import os

import numpy as np

META_NAME = 'meta.json'


class DatasetError(Exception):
    """A dataset that is missing or inconsistent; the message says how to fix it."""


def token_dtype(vocab_size):
    # uint16 halves disk and memory for every vocabulary up to 65,536 ids (GPT-2's 50,257 included);
    # larger vocabularies (Gemma's 262,144) need uint32
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def atomic_write_bytes(path, write):
    """Call write(file) on a temporary file beside path, then rename it over path: a crash mid-write
    never leaves a truncated file under the real name."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode('utf-8')))


class SplitWriter:
    """Appends token ids to one split's .bin file as they come, so memory stays bounded whatever the
    corpus size. The ids go to a temporary file beside it; commit() puts that in place. Leaving the
    `with` block without commit() (an error, Ctrl-C) removes the temporary file: nothing half-written
    is left behind."""

    def __init__(self, folder, split, dtype):
        self.folder, self.dtype, self.tokens = folder, np.dtype(dtype), 0
        self.path = os.path.join(folder, f'{split}.bin')
        self.tmp = f'{self.path}.tmp{os.getpid()}'
        self._file = open(self.tmp, 'wb')

    def write(self, ids):
        ids = np.asarray(ids)
        if ids.size and ids.max() > np.iinfo(self.dtype).max:
            raise DatasetError(f'token id {ids.max()} does not fit {self.dtype.name}')
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += ids.size

    def commit(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        # the folder's meta.json describes the old .bin files: remove it first, so a crash before the new
        # one is written leaves a dataset that says it is incomplete, never one that mixes old and new
        meta = os.path.join(self.folder, META_NAME)
        if os.path.exists(meta):
            os.remove(meta)
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_split(folder, split, ids, dtype):
    """Write one split's token ids as a flat binary array."""
    with SplitWriter(folder, split, dtype) as writer:
        writer.write(ids)
        writer.commit()


def save_meta(folder, tokenizer, **stats):
    """Record the tokenizer and the on-disk dtype beside the .bin files. Written last by every prepare
    script, so a dataset whose meta.json exists is complete."""
    meta = dict(tokenizer=tokenizer.describe(), vocab_size=tokenizer.vocab_size,
                dtype=np.dtype(token_dtype(tokenizer.vocab_size)).name, **stats)
    if 'tokenizer_json' in meta['tokenizer']:
        # a trained BPE also as tokenizer.json, for other tools; our scripts read the copy in meta.json
        tokenizer_json = meta['tokenizer']['tokenizer_json']
        atomic_write_bytes(os.path.join(folder, 'tokenizer.json'), lambda f: f.write(tokenizer_json.encode('utf-8')))
    atomic_write_json(os.path.join(folder, META_NAME), meta)
    return meta


def prepare_command(folder):
    """The command that (re)creates the dataset in folder, for error messages."""
    script = os.path.join(folder, 'prepare.py')
    if os.path.exists(script):
        return f'python {script}'
    config = os.path.join('config', f'prepare_{os.path.basename(os.path.normpath(folder))}.py')
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), config)):
        return f'python prepare.py {config}'
    return f'python prepare.py --input=YOUR_TEXT --out_dir={folder}'


def load_meta(folder):
    path = os.path.join(folder, META_NAME)
    if not os.path.exists(path):
        raise DatasetError(f"no prepared dataset in {folder} (missing {META_NAME}): run `{prepare_command(folder)}` first")
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def open_split(folder, split, meta):
    """Memmap one split read-only. A fresh memmap per call is cheap, and it avoids the memory growth
    of one long-lived np.memmap (https://stackoverflow.com/questions/45132940)."""
    path = os.path.join(folder, f'{split}.bin')
    if not os.path.exists(path):
        raise DatasetError(f'missing {path}: run `{prepare_command(folder)}` again')
    return np.memmap(path, dtype=np.dtype(meta['dtype']), mode='r')


def dataset_dir(name):
    """The folder of a dataset setting: a folder under data/, or else a path to a prepared folder."""
    under_data = os.path.join('data', name)
    return name if os.path.isdir(name) and not os.path.isdir(under_data) else under_data


def sample_windows(data, block_size, batch_size, rng):
    """batch_size windows of block_size + 1 consecutive tokens at random offsets of data, as an int64
    (batch_size, block_size + 1) array: inputs are [:, :-1], their next tokens [:, 1:]. Training and
    eval.py both draw through here, so the same rng state gives the same batches."""
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    return data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64)


def read_text(input_path, url, cache_path, encoding_errors='strict'):
    """The corpus text: from input_path if given, else from cache_path, downloading url there first.
    Without a network, say how to supply the file instead; an empty file is an error too."""
    path = input_path or cache_path
    if not input_path and not os.path.exists(cache_path):
        import urllib.request
        print(f'downloading {url} to {cache_path}')
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = response.read()
        except OSError as e:
            raise DatasetError(f'cannot download {url} ({e}); download it yourself to {cache_path}, '
                               f'or pass --input=PATH to use a local text file') from None
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        atomic_write_bytes(cache_path, lambda f: f.write(data))
    if not os.path.isfile(path):
        raise DatasetError(f'input file {path} not found')
    with open(path, 'rb') as f:
        text = decode_utf8(f.read(), path, encoding_errors)
    if not text:
        raise DatasetError(f'{path} is empty: nothing to train on')
    return text


def decode_utf8(raw, path, encoding_errors='strict', start_byte=0, start_line=1):
    """raw (a piece of path starting at byte start_byte, line start_line) as text; bytes that are not
    UTF-8 raise a DatasetError saying where they are."""
    try:
        return raw.decode('utf-8', errors=encoding_errors)
    except UnicodeDecodeError as e:
        line = start_line + raw.count(b'\n', 0, e.start)
        raise DatasetError(f'{path} is not UTF-8: byte {start_byte + e.start} (line {line}) is '
                           f'{raw[e.start:e.start + 1]!r}; convert it, or pass --encoding_errors=replace '
                           f'to replace bad bytes') from None


def write_text_dataset(out_dir, tokenizer, text, val_fraction=0.1):
    """The simplest dataset: one text, its first (1 - val_fraction) for train and the rest for val,
    tokenised as one document each. Prints and returns the meta."""
    n = int((1 - val_fraction) * len(text))
    ids = {'train': tokenizer.encode(text[:n]), 'val': tokenizer.encode(text[n:])}
    dtype = token_dtype(tokenizer.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    for split, split_ids in ids.items():
        print(f'{split} has {len(split_ids):,} tokens')
        write_split(out_dir, split, split_ids, dtype)
    # measured on val, the split whose loss the logs convert to bits per byte
    return save_meta(out_dir, tokenizer, train_tokens=len(ids['train']), val_tokens=len(ids['val']),
                     bytes_per_token=len(text[n:].encode('utf-8')) / max(1, len(ids['val'])))
