"""
A prepared dataset on disk: a folder holding train.bin and val.bin (flat arrays of token ids, memmapped
during training) and meta.json, which says how to read them and which tokenizer made them.

meta.json keys: tokenizer (the tokenizer's description, see tokenizer.py), vocab_size, dtype ('uint16'
or 'uint32'), and whatever statistics the prepare script recorded (train_tokens, val_tokens,
bytes_per_token, ...); prepare.py's also the cleaning it gave the text (cleaning: clean_wiki,
unescape_html, normalize, normalize_whitespace), which eval.py gives a --text.

A chat dataset (prepare_chat.py) also holds train.mask.bin and val.mask.bin: one uint8 per token, 1 where the token
is the assistant's (a reply's text and its end-of-turn), the only targets its loss counts; meta.json says chat: true,
and its tokenizer description carries the chat template (special_tokens).

Nothing in a dataset is trusted, as nothing in a checkpoint is: load_meta checks meta.json field by field (and the
size and form of the tokenizer.json it names) before anything is built from it, open_split and open_mask check the
files' sizes against it, and check_split samples the ids against vocab_size: a damaged or crafted dataset gives one
line naming the file and the field.
"""
import json
import math
import os
import pathlib
import unicodedata

import numpy as np

from atomic_write import atomic_write_bytes, fsync_dir, remove_dead_temporaries
from tokenizer import KINDS, TOKENIZER_FILE

META_NAME = 'meta.json'
UNICODE_FORMS = ('NFC', 'NFKC', 'NFD', 'NFKD')


class DatasetError(Exception):
    """A dataset that is missing or inconsistent; the message says how to fix it."""


def token_dtype(vocab_size):
    # uint16 halves disk and memory for every vocabulary up to 65,536 ids (GPT-2's 50,257 included);
    # larger vocabularies (Gemma's 262,144) need uint32
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class DatasetWriter:
    """Writes a dataset: token ids appended to each split as they come (memory stays bounded whatever the
    corpus size), then meta.json (and a trained BPE's tokenizer.json). Every file goes to a temporary name
    beside its own, and commit() puts them in place only once all are complete, meta.json last. A full disk,
    an error or Ctrl-C before that leaves the folder's previous dataset as it was, and no temporary behind.

        with DatasetWriter(folder, tokenizer) as out:
            out.write('train', ids)
            ...
            meta = out.commit(train_tokens=..., **stats)
    """

    SPLITS = ('train', 'val')

    def __init__(self, folder, tokenizer, masks=False):
        """masks: a chat dataset, whose write() calls also give each token's loss mask."""
        self.folder, self.tokenizer, self.masks = folder, tokenizer, masks
        self.dtype = np.dtype(token_dtype(tokenizer.vocab_size))
        self.tokens = dict.fromkeys(self.SPLITS, 0)
        self._temporaries = {}  # final path -> its temporary
        # what a killed writer left (SIGTERM or SIGKILL skip the cleaning in __exit__)
        remove_dead_temporaries(folder, lambda name: name in (META_NAME, TOKENIZER_FILE) or name.endswith('.bin'))
        self._files = {}
        for split in self.SPLITS:
            self._files[split] = open(self._temporary(f'{split}.bin'), 'wb')
            if masks:
                self._files[f'{split}.mask'] = open(self._temporary(f'{split}.mask.bin'), 'wb')

    def _temporary(self, name):
        path = os.path.join(self.folder, name)
        self._temporaries[path] = f'{path}.tmp{os.getpid()}'
        return self._temporaries[path]

    def write(self, split, ids, mask=None):
        ids = np.asarray(ids)
        if ids.size and ids.max() > np.iinfo(self.dtype).max:
            raise DatasetError(f'token id {ids.max()} does not fit {self.dtype.name}')
        if self.masks != (mask is not None) or (mask is not None and len(mask) != ids.size):
            raise DatasetError('a chat dataset takes one mask value per token, other datasets none')
        self._files[split].write(ids.astype(self.dtype, copy=False).tobytes())
        if mask is not None:
            self._files[f'{split}.mask'].write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.tokens[split] += ids.size

    def commit(self, **stats):
        """Finish every file, then put them all in place; returns the meta."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = dict(tokenizer=self.tokenizer.describe(), vocab_size=self.tokenizer.vocab_size, dtype=self.dtype.name,
                    lossless=self.tokenizer.lossless, **({'chat': True} if self.masks else {}), **stats)
        files = {}
        if self.tokenizer.own_file() is not None:
            # tokenizer.json: a Hugging Face tokenizer's own copy, which load_tokenizer(meta['tokenizer'], folder) reads
            # first, so the dataset needs neither the hub nor the tokenizer's folder (a trained BPE's is for other
            # tools: meta.json holds it too)
            files[TOKENIZER_FILE] = self.tokenizer.own_file()
        files[META_NAME] = json.dumps(meta, indent=2, ensure_ascii=False).encode('utf-8')
        for name, data in files.items():
            with open(self._temporary(name), 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        # everything is on disk: swap. The old meta.json goes first, so a crash in the middle leaves a dataset
        # that says it is incomplete, never one that mixes old and new files
        meta_path = os.path.join(self.folder, META_NAME)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for path, tmp in sorted(self._temporaries.items(), key=lambda item: item[0] == meta_path):
            os.replace(tmp, path)
        fsync_dir(self.folder)
        return meta

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass  # a full disk can fail the close too: the temporary goes all the same
        for tmp in self._temporaries.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(error, OSError):  # a full disk, a quota, a folder that went away: one line for the user
            raise DatasetError(f'cannot write the dataset to {self.folder}: {error.strerror or error}; '
                               f'what was there before is unchanged') from None


def write_dataset(folder, tokenizer, ids, **stats):
    """Write a dataset whose token ids are at hand: ids maps 'train' and 'val' to sequences. Returns the meta."""
    with DatasetWriter(folder, tokenizer) as out:
        for split, split_ids in ids.items():
            out.write(split, split_ids)
        return out.commit(train_tokens=out.tokens['train'], val_tokens=out.tokens['val'], **stats)


def prepare_command(folder):
    """The command that (re)creates the dataset in folder, for error messages: prepare_chat.py's for a chat dataset
    (its loss masks tell, even where meta.json is damaged)."""
    if any(os.path.exists(os.path.join(folder, f'{split}.mask.bin')) for split in ('train', 'val')):
        return f'python prepare_chat.py --input=YOUR_CONVERSATIONS.jsonl --tokenizer_from=YOUR_MODEL --out_dir={folder}'
    script = os.path.join(folder, 'prepare.py')
    if os.path.exists(script):
        return f'python {script}'
    config = os.path.join('config', f'prepare_{os.path.basename(os.path.normpath(folder))}.py')
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), config)):
        return f'python prepare.py {config}'
    return f'python prepare.py --input=YOUR_TEXT --out_dir={folder}'


META_LIMIT = 256 * 2**20  # bytes: a trained vocabulary makes meta.json a few MB; far more is no meta.json of ours
TOKENIZER_FILE_LIMIT = 256 * 2**20  # bytes: Gemma's tokenizer.json, among the largest, is 33 MB
MAX_VOCAB_SIZE = 2**24  # 64x Gemma's 262,144: a larger vocabulary is a damaged meta.json, not a tokenizer
ID_DTYPES = ('uint16', 'uint32')
ID_SAMPLES, ID_SAMPLE_TOKENS = 16, 2**16  # ids checked against vocab_size: this many runs of this many tokens
# the statistics prepare scripts record, each optional: key -> (its types, what it must be)
META_STATS = {
    'train_tokens': (int, 'a whole number'), 'val_tokens': (int, 'a whole number'),
    'train_bytes': (int, 'a whole number'), 'val_bytes': (int, 'a whole number'),
    'bytes_per_token': ((int, float), 'a number'),
    'lossless': (bool, 'true or false'), 'chat': (bool, 'true or false'),
}
# prepare.py's cleaning options (cleaning.py), which eval.py applies to a --text: each one there when 'cleaning' is
CLEANING_FIELDS = {'clean_wiki': (bool, 'true or false'), 'unescape_html': (bool, 'true or false'),
                   'normalize': (str, 'a Unicode normal form'), 'normalize_whitespace': (bool, 'true or false')}


def _damaged(path, folder, what):
    return DatasetError(f'{path} is damaged: {what}; prepare the dataset again (`{prepare_command(folder)}`)')


def _read_json(path, folder, limit):
    """A JSON object from path, its size checked before it is read (a huge or crafted file is refused, not parsed)."""
    try:
        if not os.path.isfile(path):
            raise _damaged(path, folder, 'it is not a file')
        if os.path.getsize(path) > limit:
            raise _damaged(path, folder, f'it holds {os.path.getsize(path):,} bytes, more than {limit:,}')
        with open(path, 'rb') as f:
            value = json.loads(f.read().decode('utf-8'))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, or a 5,000-digit number
        raise _damaged(path, folder, f'it is not UTF-8 JSON ({type(e).__name__}: {str(e)[:100]})') from None
    if not isinstance(value, dict):
        raise _damaged(path, folder, f'it holds a JSON {type(value).__name__}, not an object')
    return value


def _check_field(path, folder, meta, key, kinds, what, required=False, name=None):
    name = name or key  # how the message names the field
    if key not in meta:
        if required:
            raise _damaged(path, folder, f'it lacks {name!r}')
        return
    value, kinds = meta[key], kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON's true is no number
        raise _damaged(path, folder, f'{name} must be {what}, not {value!r:.60}')
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and value >= 0):
        raise _damaged(path, folder, f'{name} must not be negative, not {value!r:.60}')


def load_meta(folder):
    """meta.json of the dataset in folder, checked field by field (and the tokenizer.json it names, for size and
    form), before anything is built from it: a damaged or crafted dataset gives one DatasetError naming the file and
    the field, never a traceback or a huge allocation."""
    path = os.path.join(folder, META_NAME)
    if not os.path.exists(path):
        raise DatasetError(f"no prepared dataset in {folder} (missing {META_NAME}): run `{prepare_command(folder)}` first")
    meta = _read_json(path, folder, META_LIMIT)
    _check_field(path, folder, meta, 'tokenizer', dict, 'an object (the tokenizer\'s description)', required=True)
    kind = meta['tokenizer'].get('kind')
    if kind not in KINDS:
        raise _damaged(path, folder, f"tokenizer.kind must be one of {', '.join(KINDS)}, not {kind!r:.60}")
    _check_field(path, folder, meta, 'dtype', str, f"one of {', '.join(ID_DTYPES)}", required=True)
    if meta['dtype'] not in ID_DTYPES:
        raise _damaged(path, folder, f"dtype must be one of {', '.join(ID_DTYPES)}, not {meta['dtype']!r:.60}")
    _check_field(path, folder, meta, 'vocab_size', int, 'a whole number', required=True)
    largest = min(MAX_VOCAB_SIZE, np.iinfo(meta['dtype']).max + 1)
    if not 1 <= meta['vocab_size'] <= largest:
        raise _damaged(path, folder, f"vocab_size must be in [1, {largest:,}] (dtype {meta['dtype']}), "
                                     f"not {meta['vocab_size']:,}")
    for key, (kinds, what) in META_STATS.items():
        _check_field(path, folder, meta, key, kinds, what)
    _check_field(path, folder, meta, 'cleaning', dict, "an object (prepare.py's cleaning options)")
    cleaning = meta.get('cleaning', {})
    for key, (kinds, what) in CLEANING_FIELDS.items():
        _check_field(path, folder, cleaning, key, kinds, what, required='cleaning' in meta, name=f'cleaning.{key}')
    if cleaning.get('normalize', '') not in UNICODE_FORMS + ('',):
        raise _damaged(path, folder, f"cleaning.normalize must be one of {', '.join(UNICODE_FORMS)} or '', "
                                     f"not {cleaning['normalize']!r:.60}")
    own = meta['tokenizer'].get('tokenizer_file')
    if own is not None:
        if not isinstance(own, str) or os.path.basename(own) != own or own in ('', '.', '..'):
            raise _damaged(path, folder, f'tokenizer.tokenizer_file must be a file name in its folder, not {own!r:.60}')
        own_path = os.path.join(folder, own)
        if os.path.exists(own_path) and 'model' not in _read_json(own_path, folder, TOKENIZER_FILE_LIMIT):
            raise _damaged(own_path, folder, "it is no Hugging Face tokenizer.json (no 'model')")
    return meta


def open_split(folder, split, meta):
    """Memmap one split read-only, after checking that its size fits meta's dtype. A fresh memmap per call is cheap,
    and it avoids the memory growth of one long-lived np.memmap (https://stackoverflow.com/questions/45132940)."""
    path = os.path.join(folder, f'{split}.bin')
    if not os.path.exists(path):
        raise DatasetError(f'missing {path}: run `{prepare_command(folder)}` again')
    dtype = np.dtype(meta['dtype'])
    if not os.path.isfile(path):
        raise _damaged(path, folder, 'it is not a file')
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        raise _damaged(path, folder, f'it holds {size:,} bytes, not a whole number of {dtype.name} token ids' if size
                       else 'it is empty')
    tokens = meta.get(f'{split}_tokens')
    if tokens is not None and tokens != size // dtype.itemsize:
        raise _damaged(path, folder, f'it holds {size // dtype.itemsize:,} {dtype.name} ids, {META_NAME} says {split}_tokens={tokens:,}')
    return np.memmap(path, dtype=dtype, mode='r')


def open_mask(folder, split, meta):
    """A chat dataset's loss mask of one split, memmapped like open_split; None for other datasets."""
    if not meta.get('chat'):
        return None
    path = os.path.join(folder, f'{split}.mask.bin')
    if not os.path.exists(path):
        raise DatasetError(f'missing {path}: prepare the chat dataset again (`{prepare_command(folder)}`)')
    ids = os.path.getsize(os.path.join(folder, f'{split}.bin')) // np.dtype(meta['dtype']).itemsize
    if not os.path.isfile(path) or os.path.getsize(path) != ids:
        raise DatasetError(f'{path} is damaged: it must hold one byte per token of {split}.bin ({ids:,}); prepare the '
                           f'chat dataset again (`{prepare_command(folder)}`)')
    return np.memmap(path, dtype=np.uint8, mode='r')


def check_split(folder, split, meta):
    """Check a split once before training or evaluating on it: its files' sizes (open_split, open_mask) and its ids,
    sampled (ID_SAMPLES runs spread over the file), below vocab_size. Returns its length in tokens."""
    data = open_split(folder, split, meta)
    open_mask(folder, split, meta)
    starts = np.linspace(0, max(0, len(data) - ID_SAMPLE_TOKENS), ID_SAMPLES).astype(np.int64)
    largest = max(int(data[s:s + ID_SAMPLE_TOKENS].max()) for s in np.unique(starts))
    if largest >= meta['vocab_size']:
        raise _damaged(os.path.join(folder, f'{split}.bin'), folder,
                       f"it holds token id {largest}, outside vocab_size={meta['vocab_size']} of {META_NAME}")
    return len(data)


def dataset_dir(name):
    """The folder of a dataset setting: a folder under data/, or else a path to a prepared folder."""
    under_data = os.path.join('data', name)
    return name if os.path.isdir(name) and not os.path.isdir(under_data) else under_data


def bytes_per_token(meta, split='val'):
    """UTF-8 bytes of the original text per token of a split, as prepared (None for a dataset prepared without it)."""
    if meta.get(f'{split}_bytes') and meta.get(f'{split}_tokens'):
        return meta[f'{split}_bytes'] / meta[f'{split}_tokens']
    return meta.get('bytes_per_token') if split == 'val' else None


def bits_per_byte(mean_loss, bytes_per_token):
    """Bits per byte: the mean loss per token (in nats) over the UTF-8 bytes of the original text the tokens came
    from. One definition for train.py and eval.py; it compares models across tokenizers, unless one of them is lossy
    (drops part of the text, as the word tokenizer does: it is not charged for what it drops)."""
    return mean_loss / math.log(2) / bytes_per_token


MASK_REDRAWS = 20  # times a window with no assistant target is drawn again


def sample_windows(data, block_size, batch_size, rng, mask=None):
    """batch_size windows of block_size + 1 consecutive tokens at random offsets of data, as an int64
    (batch_size, block_size + 1) array: inputs are [:, :-1], their next tokens [:, 1:]. Training and
    eval.py both draw through here, so the same rng state gives the same batches.
    With a chat dataset's mask (open_mask): an (inputs, targets) pair of (batch_size, block_size) arrays, whose
    targets are -1 (ignored by the loss) where the mask is 0. Windows are packed: they start anywhere in the
    concatenated conversations, across their boundaries. A window with no assistant target would add nothing to
    the loss (and a batch of them a NaN): it is drawn again, up to MASK_REDRAWS times."""
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    if mask is None:
        return data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64)
    targets_at = np.arange(1, block_size + 1)
    for _ in range(MASK_REDRAWS):
        empty = ~mask[ix[:, None] + targets_at].any(axis=1)
        if not empty.any():
            break
        ix[empty] = rng.integers(0, len(data) - block_size, size=int(empty.sum()))
    keep = mask[ix[:, None] + targets_at].astype(bool)
    if not keep.any():
        raise DatasetError(f'no window of {block_size} tokens drawn holds an assistant token: the replies are too '
                           f'rare in this chat dataset; use a larger --block_size')
    rows = data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64)
    return np.ascontiguousarray(rows[:, :-1]), np.where(keep, rows[:, 1:], -1)  # contiguous, as pinned copies need


def count_targets(windows):
    """How many targets a batch of sample_windows' windows holds for the loss: every next token, or a chat
    dataset's reply tokens alone."""
    if isinstance(windows, tuple):
        return int((windows[1] != -1).sum())
    return windows.shape[0] * (windows.shape[1] - 1)


def input_files(path, pattern):
    """The text files of an input: the file itself, or every file matching pattern in the folder and below it,
    sorted (prepare.py, synthesize.py and classify_topics.py read corpora this way)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DatasetError(f'input {path} not found: give a text file or a folder of them')
    files = sorted(str(p) for p in pathlib.Path(path).rglob(pattern) if p.is_file())
    if not files:
        raise DatasetError(f'no files matching {pattern} in {path}: set --input_glob (e.g. --input_glob="*.md")')
    return files


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


def unicode_form(form):
    """A normalize setting as normalize_unicode takes it ('nfc' is 'NFC', '' is none); DatasetError otherwise."""
    if form.upper() not in UNICODE_FORMS + ('',):
        raise DatasetError(f"normalize={form!r}: use NFC, NFKC, NFD, NFKD, or '' to keep the text as it is")
    return form.upper()


def normalize_unicode(text, form='NFC'):
    """text in Unicode normal form `form` ('' leaves it as it is). NFC composes 'e' + U+0301 into 'é', so a
    character typed either way is the same token; most text already is NFC, and that check is cheap."""
    if not form or unicodedata.is_normalized(form, text):
        return text
    return unicodedata.normalize(form, text)


def decode_utf8(raw, path, encoding_errors='strict', start_byte=0, start_line=1):
    """raw (a piece of path starting at byte start_byte, line start_line) as text; bytes that are not
    UTF-8 raise a DatasetError saying where they are (encoding_errors='strict'), or are replaced or dropped."""
    if encoding_errors not in ('strict', 'replace', 'ignore'):
        raise DatasetError(f"encoding_errors={encoding_errors!r}: use 'strict', 'replace' or 'ignore'")
    try:
        return raw.decode('utf-8', errors=encoding_errors)
    except UnicodeDecodeError as e:
        line = start_line + raw.count(b'\n', 0, e.start)
        raise DatasetError(f'{path} is not UTF-8: byte {start_byte + e.start} (line {line}) is '
                           f'{raw[e.start:e.start + 1]!r}; convert it, or pass --encoding_errors=replace '
                           f'to replace bad bytes') from None


def make_dataset_folder(folder):
    """Create folder for a dataset (the prepare scripts' out_dir), unless there; returns whether it was created.
    DatasetError where it is a file or cannot be created (under /proc, read-only, no permission)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DatasetError(f'out_dir {folder} is a file: give a folder')
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DatasetError(f'cannot create out_dir {folder}: {e.strerror}; give a folder you can write to') from None
    return created


def write_text_dataset(out_dir, tokenizer, text, val_fraction=0.1):
    """The simplest dataset: one text, its first (1 - val_fraction) for train and the rest for val,
    tokenised as one document each. Prints and returns the meta."""
    n = int((1 - val_fraction) * len(text))
    ids = {'train': tokenizer.encode(text[:n]), 'val': tokenizer.encode(text[n:])}
    os.makedirs(out_dir, exist_ok=True)
    for split, split_ids in ids.items():
        print(f'{split} has {len(split_ids):,} tokens')
    size = {'train': len(text[:n].encode('utf-8')), 'val': len(text[n:].encode('utf-8'))}
    # measured on val, the split whose loss the logs convert to bits per byte
    return write_dataset(out_dir, tokenizer, ids, bytes_per_token=size['val'] / max(1, len(ids['val'])),
                         train_bytes=size['train'], val_bytes=size['val'])