"""
One tokenizer interface for every script: prepare scripts build one with make_tokenizer() and store
tokenizer.describe() in the dataset's meta.json; train, sample and eval rebuild it with load_tokenizer().
A description is self-contained (a trained vocabulary travels inside it), so a checkpoint never decodes
with the wrong vocabulary.

Kinds:
- char:     one token per Unicode character seen in the training text (nanoGPT's shakespeare_char)
- word:     words and punctuation marks, with '<unk>' for the rest (see WordTokenizer for the rules)
- bpe:      byte-level BPE trained on the corpus with Hugging Face `tokenizers`; round-trips any text
- tiktoken: a fixed OpenAI encoding ('gpt2', 'cl100k_base', ...)
- hf:       any Hugging Face tokenizer, by hub name, local folder or .gguf file; its tokenizer.json is
            saved beside meta.json and in checkpoint folders (load_tokenizer(description, folder) reads that
            copy first), so a dataset or checkpoint needs neither the hub nor the original folder

Special-token strings inside user text ('<|endoftext|>', '</s>') are encoded as plain text by every kind:
a document cannot forge an end-of-text. Scripts put eot_id between documents themselves.
with_chat_template() adds a chat template (ChatTokenizer: role markers and an end-of-turn token, recorded in the
description's special_tokens) for chat fine-tuning (prepare_chat.py, sample.py --chat).
"""
import codecs
import difflib
import functools
import inspect
import itertools
import os
import re
from collections import Counter

import numpy as np

KINDS = ('char', 'word', 'bpe', 'tiktoken', 'hf')
TOKENIZER_FILE = 'tokenizer.json'  # a tokenizer's own file, beside meta.json and in checkpoint folders


class TokenizerError(Exception):
    """A tokenizer that cannot be built, loaded or used; the one-line message says what to do."""


class UnknownCharactersError(TokenizerError):
    """Text holds characters outside a char tokenizer's vocabulary. .chars lists them (distinct, sorted)."""

    def __init__(self, chars):
        self.chars = chars
        shown = ', '.join(repr(c) for c in chars[:10])
        more = f' and {len(chars) - 10} more' if len(chars) > 10 else ''
        super().__init__(f"{len(chars)} character(s) not in the tokenizer's vocabulary: {shown}{more}; "
                         f"pass --drop_unknown=True to drop them, or use a vocabulary trained on text that has them")


def _nearest(name, known):
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ''
    return f"{hint}(known: {', '.join(known)})"


def _first_line(error, limit=200):
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[:limit] + '...'


def _code_points(text):
    # one uint32 per character, without a Python loop over the text
    try:
        return np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
    except UnicodeEncodeError:  # lone surrogates (from surrogateescape-decoded files): keep them, slower path
        return np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)


def _from_code_points(codes):
    buffer = memoryview(np.ascontiguousarray(codes, dtype=np.uint32))  # decoded in place, no bytes copy
    try:
        return str(buffer, 'utf-32-le')
    except UnicodeDecodeError:
        return str(buffer, 'utf-32-le', 'surrogatepass')


def _cut_utf8_length(raw):
    """How many bytes at the end of raw start a UTF-8 character that the bytes after them could complete: 0 to 3."""
    decoder = codecs.getincrementaldecoder('utf-8')('replace')
    decoder.decode(raw[-4:], final=False)  # what is not final is held back: a valid start of a character
    return len(decoder.getstate()[0])


@functools.lru_cache(maxsize=1)
def _byte_decoder():
    """GPT-2's byte alphabet read backwards, {character: the byte it stands for}: a printable byte stands for
    itself, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('\u00a1'), ord('\u00ac') + 1),
                 *range(ord('\u00ae'), ord('\u00ff') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


class Tokenizer:
    """The interface. Subclasses set kind, vocab_size and eot_id, and implement encode, _decode, describe."""
    kind = None
    vocab_size = 0
    eot_id = None  # separates documents; None where the kind has no such token
    lossless = True  # decode(encode(text)) gives text back, so a loss per token covers all of the text's bytes

    def encode(self, text):
        raise NotImplementedError

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts):
        """All texts' ids in one uint32 array, and each text's number of ids: what prepare scripts write,
        built without a Python list per text where the kind allows it."""
        lists = self.encode_batch(texts)
        counts = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.uint32, count=int(counts.sum()))
        return flat, counts

    def decode(self, ids):
        """ids: a list, or a 1-D numpy array or torch tensor (any device), of token ids."""
        if hasattr(ids, 'detach'):  # a torch tensor, maybe on a GPU; numpy cannot read those directly
            ids = ids.detach().cpu().numpy()
        if isinstance(ids, list):
            try:  # fromiter builds an array from a long list of ints faster than asarray
                ids = np.fromiter(ids, dtype=np.int64, count=len(ids))
            except (TypeError, ValueError):
                raise TokenizerError('decode takes a flat sequence of integer token ids') from None
        ids = np.asarray(ids)
        if ids.size == 0:
            return ''
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TokenizerError(f'decode takes a 1-D sequence of integer token ids, '
                                 f'got shape {ids.shape} of {ids.dtype}')
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise TokenizerError(f'token id {lo if lo < 0 else hi} is outside this {self.kind} tokenizer '
                                 f'(ids 0..{self.vocab_size - 1}): the ids come from a different tokenizer')
        return self._decode(ids)

    def _decode(self, ids):
        raise NotImplementedError

    def decode_complete(self, ids):
        """decode(ids) less a character cut short at the end: a byte-level tokenizer's tokens can end inside a UTF-8
        character (its first byte of two, say), which decode shows as U+FFFD, as transformers does, though its rest
        may come with the next tokens. Only such a cut sequence goes: an invalid byte, a sequence that cannot
        complete, or a real U+FFFD stays. For a text that is still growing (streamed) or was cut at max_new_tokens."""
        text = self.decode(ids)
        tail = self._tail_bytes(np.array([int(i) for i in ids[-4:]], dtype=np.int64))
        if tail and _cut_utf8_length(tail) and text.endswith('\ufffd'):
            return text[:-1]  # the cut sequence, a valid start of a character, decodes as one U+FFFD
        return text

    def _tail_bytes(self, ids):
        """The UTF-8 bytes that the last ids (up to 4: a character has at most 4 bytes) decode from, or None where
        the kind decodes whole characters (char, word) or does not say (a Hugging Face tokenizer)."""
        return None

    def drop_unknown(self, text):
        """text minus the characters encode() would reject: nothing, for all kinds but char."""
        return text

    def own_file(self):
        """The tokenizer as a self-contained tokenizer.json (bytes) to store beside the data, or None."""
        return None

    unk_id = None  # the id of text the vocabulary lacks (word's '<unk>'); None where nothing is unknown

    def unknown_words(self, text):
        """The distinct words of text that encode() turns into unk_id, sorted: none, for all kinds but word."""
        return []

    def describe(self):
        raise NotImplementedError

    def __repr__(self):
        return f'<{self.kind} tokenizer, vocab_size={self.vocab_size}, eot_id={self.eot_id}>'


class CharTokenizer(Tokenizer):
    """Token id i is the character chars[i]. encode and decode look code points up in numpy arrays: on
    100 MB of text encode takes ~1.2 s (2.5x a dict lookup per character; most of it is building the
    returned list) and decoding a uint16 array ~0.3 s (10x a join)."""
    kind = 'char'

    def __init__(self, chars):
        if len(set(chars)) != len(chars) or not chars:
            raise TokenizerError('a char vocabulary must be a non-empty string of distinct characters')
        self.chars = chars
        self.vocab_size = len(chars)
        self._codes = _code_points(chars)
        # the table's last slot stays -1: clipping any larger code point onto it marks it unknown
        self._table = np.full(int(self._codes.max()) + 2, -1, dtype=np.int32)
        self._table[self._codes] = np.arange(len(chars), dtype=np.int32)

    @classmethod
    def train(cls, texts):
        seen = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise TokenizerError('cannot build a char tokenizer from empty text')
        return cls(''.join(sorted(seen)))

    def _lookup(self, text):
        codes = _code_points(text)
        if codes.max(initial=0) < len(self._table):
            return codes, self._table[codes]
        return codes, np.take(self._table, codes, mode='clip')

    def encode(self, text):
        codes, ids = self._lookup(text)
        unknown = ids < 0
        if unknown.any():
            raise UnknownCharactersError([chr(c) for c in np.unique(codes[unknown])])
        return ids.tolist()

    def _decode(self, ids):
        return _from_code_points(self._codes[ids])

    def drop_unknown(self, text):
        codes, ids = self._lookup(text)
        return text if (ids >= 0).all() else _from_code_points(codes[ids >= 0])

    def describe(self):
        return {'kind': 'char', 'chars': self.chars}


class WordTokenizer(Tokenizer):
    r"""Words and punctuation marks. What encode keeps and decode gives back:
    - a token is a run of word characters (regex \w+: letters of any script, digits, '_'), a single
      character that is neither word nor whitespace (punctuation, symbols), or a newline '\n';
    - every other whitespace (spaces, tabs, '\r') only separates tokens and is dropped;
    - nothing else is changed: no lower-casing, no Unicode normalisation;
    - tokens outside the vocabulary become '<unk>' (id 0).
    decode joins tokens with one space, but none around newlines, before closing punctuation (. , ; : ! ? ) ] }),
    after opening brackets, nor around an apostrophe or a hyphen between two words (clitics and compounds: "thou'll",
    "o'er-long"), so decode(encode("Hi,  it's\tme.\r\nBye")) == "Hi, it's me.\nBye" (a quote or a dash set off by
    spaces comes back without them).
    Scripts without spaces (Chinese, Japanese) give one token per run of characters: use char or bpe there.
    """
    kind = 'word'
    UNK = '<unk>'  # cannot collide with a real token: '<' is split off on its own
    unk_id = 0
    lossless = False  # whitespace is dropped and unknown words become '<unk>'
    PATTERN = re.compile(r'\w+|[^\w\s]|\n')

    def __init__(self, vocab):
        if not vocab or vocab[0] != self.UNK or len(set(vocab)) != len(vocab):
            raise TokenizerError(f"a word vocabulary must be a list of distinct tokens starting with '{self.UNK}'")
        self.vocab = list(vocab)
        self.vocab_size = len(vocab)
        self._ids = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def train(cls, texts, vocab_size=None, min_count=1):
        """Keep the words seen at least min_count times, most frequent first, at most vocab_size tokens
        ('<unk>' included). Ties in frequency are broken alphabetically so training is deterministic."""
        if vocab_size is not None and vocab_size < 2:
            raise TokenizerError(f"word vocab_size must be at least 2 ('<unk>' and one word), got {vocab_size}")
        counts = Counter()
        for text in texts:
            counts.update(cls.PATTERN.findall(text))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if vocab_size is not None:
            words = words[:vocab_size - 1]
        return cls([cls.UNK] + words)

    def encode(self, text):
        get = self._ids.get
        return [get(w, 0) for w in self.PATTERN.findall(text)]

    def unknown_words(self, text):
        return sorted({w for w in self.PATTERN.findall(text) if w not in self._ids})

    def _decode(self, ids):
        vocab = self.vocab
        text = ' '.join([vocab[i] for i in ids.tolist()])
        text = re.sub(r' ([.,;:!?)\]}])', r'\1', text)  # 'ROMEO :' -> 'ROMEO:'
        text = re.sub(r'([(\[{]) ', r'\1', text)
        text = re.sub(r"(\w) ([-']) (?=\w)", r'\1\2', text)  # "thou ' ll" -> "thou'll"
        return re.sub(r' ?\n ?', '\n', text)

    def describe(self):
        return {'kind': 'word', 'vocab': self.vocab}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's scheme) trained on the corpus: every byte is a token, so any text round-trips
    exactly, including text unlike the training corpus."""
    kind = 'bpe'
    EOT = '<|endoftext|>'

    def __init__(self, backend):
        self._tok = backend
        # encode '<|endoftext|>' in user text as plain text, like tiktoken's encode_ordinary
        # (the flag is not saved in tokenizer.json, so it is set on every load)
        backend.encode_special_tokens = True
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eot_id = backend.token_to_id(self.EOT)

    @classmethod
    def train(cls, texts, vocab_size=4096):
        from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
        if vocab_size < 257:
            raise TokenizerError(f'bpe vocab_size must be at least 257 (256 bytes and end-of-text), got {vocab_size}')
        tok = Backend(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # initial_alphabet: all 256 bytes get a token even when the corpus lacks them
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[cls.EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        # Rust threads over the batch; the _fast variant skips computing character offsets we never use
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def _decode(self, ids):
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def _tail_bytes(self, ids):
        # a token is written in GPT-2's byte alphabet (a printable character per byte); an added token (the
        # end-of-text) is its text
        added = {i for i in self._tok.get_added_tokens_decoder()}
        byte_of = _byte_decoder()
        return b''.join(self._tok.id_to_token(i).encode('utf-8') if i in added
                        else bytes(byte_of[c] for c in self._tok.id_to_token(i)) for i in ids.tolist())

    def own_file(self):  # for other tools: our scripts read the copy inside the description
        return self._tok.to_str().encode('utf-8')

    def describe(self):
        return {'kind': 'bpe', 'tokenizer_json': self._tok.to_str()}


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding. Its files are downloaded on first use into tiktoken's cache
    (TIKTOKEN_CACHE_DIR, else a temp folder)."""
    kind = 'tiktoken'

    def __init__(self, name='gpt2'):
        import tiktoken
        known = tiktoken.list_encoding_names()
        if name not in known:
            raise TokenizerError(f"unknown tiktoken encoding '{name}': {_nearest(name, known)}")
        try:
            self._enc = tiktoken.get_encoding(name)
        except (OSError, ValueError) as e:  # requests' network errors are OSErrors
            raise TokenizerError(f"cannot load tiktoken encoding '{name}': {_first_line(e)}; it is downloaded "
                                 f"on first use: connect once, or set TIKTOKEN_CACHE_DIR to a folder that holds it"
                                 ) from None
        self.name = name
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text):
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self._enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 8)

    def encode_flat(self, texts):
        # numpy arrays straight from Rust: ~10% faster than encode_ordinary's lists, the same ids (no special
        # token is allowed, so '<|endoftext|>' in the text is ordinary text); one thread, prepare runs processes
        if not hasattr(self._enc, 'encode_to_numpy'):  # tiktoken < 0.8
            return super().encode_flat(texts)
        arrays = [self._enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
        counts = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        return (np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)), counts

    def _decode(self, ids):
        return self._enc.decode(ids.tolist())

    def _tail_bytes(self, ids):
        return self._enc.decode_bytes(ids.tolist())

    def describe(self):
        return {'kind': 'tiktoken', 'name': self.name}


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (transformers.AutoTokenizer), by hub name or local folder; gguf_file names a
    .gguf file inside that folder or repo to read the tokenizer from.

    encode adds no special tokens (no BOS/EOS): it is called on documents and prompts that scripts join
    into one stream, and a BOS at the start of every piece would put tokens mid-stream that the text never
    had; document boundaries are marked with eot_id (the tokenizer's eos) by the scripts instead.
    """
    kind = 'hf'

    def __init__(self, name, gguf_file=None, tokenizer_file=None, eos_token=None):
        """tokenizer_file: a tokenizer.json saved from this tokenizer (see own_file), read instead of the hub or the
        original folder when it exists; name then only says where the tokenizer came from."""
        name = os.path.expanduser(name)
        if not gguf_file and name.endswith('.gguf') and os.path.isfile(name):  # a .gguf file named directly
            name, gguf_file = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
        try:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast
            if tokenizer_file and os.path.isfile(tokenizer_file):
                self._tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token=eos_token)
            else:
                if _looks_like_path(name) and not os.path.isdir(name):
                    raise OSError('no such folder' + (f', and no {tokenizer_file}' if tokenizer_file else ''))
                # trust_remote_code=False: custom code is never run, and transformers never asks on a terminal
                self._tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False,
                                                          **({'gguf_file': gguf_file} if gguf_file else {}))
        except Exception as e:  # transformers raises OSError, ValueError, ImportError, ... : all mean the same here
            if 'custom code' in str(e) or 'trust_remote_code' in str(e):
                raise TokenizerError(f"cannot load Hugging Face tokenizer '{name}': it needs custom code of its own "
                                     f"(trust_remote_code), which is never run here; use a tokenizer that needs "
                                     f"none") from None
            raise TokenizerError(f"cannot load Hugging Face tokenizer '{name}': {_first_line(e)}; check the name, "
                                 f"or download it first / pass a local folder") from None
        # an absolute path keeps the description valid when a later script runs from another directory
        self.name = os.path.abspath(name) if os.path.isdir(name) and not tokenizer_file else name
        self.gguf_file = gguf_file
        self._file = None  # own_file's bytes, once made
        self.vocab_size = len(self._tok)  # added tokens included, unlike tokenizer.vocab_size
        self.eot_id = self._tok.eos_token_id
        # split_special_tokens: '</s>' in user text is text, as with the other kinds;
        # verbose=False: no warning for texts longer than the model's context, we cut them into blocks later
        self._options = dict(add_special_tokens=False, split_special_tokens=True, verbose=False)

    def encode(self, text):
        return self._tok.encode(text, **self._options)

    def encode_batch(self, texts):
        return self._tok(list(texts), **self._options)['input_ids']

    def _decode(self, ids):
        return self._tok.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def transformers_tokenizer(self):
        """The transformers tokenizer itself (to export it)."""
        return self._tok

    PROBE = "Hello, world! It's 2024: naïve café, Привет мир, 你好世界 \n\n\t  spaces 🙂 </s> <eos> <|endoftext|>"

    def own_file(self):
        """The backend's tokenizer.json, if a tokenizer read back from it alone encodes and decodes as this one does
        (a slow-only tokenizer has none; then the name, or gguf file, stays the only way to load it)."""
        if self._file is None:
            self._file = b''
            backend = getattr(self._tok, 'backend_tokenizer', None)
            if backend is not None:
                from transformers import PreTrainedTokenizerFast
                copy = PreTrainedTokenizerFast(tokenizer_object=type(backend).from_str(backend.to_str()),
                                               eos_token=self._tok.eos_token)
                ids = self.encode(self.PROBE)
                if (copy.encode(self.PROBE, **self._options) == ids and len(copy) == len(self._tok)
                        and copy.eos_token_id == self.eot_id
                        and copy.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                        == self._decode(np.asarray(ids))):
                    self._file = backend.to_str().encode('utf-8')
        return self._file or None

    def describe(self):
        d = {'kind': 'hf', 'name': self.name}
        if self.gguf_file:
            d['gguf_file'] = self.gguf_file
        if self.own_file() is not None:
            d.update(tokenizer_file=TOKENIZER_FILE, eos_token=self._tok.eos_token)
        return d


# ---------------------------------------------------------------------------- chat

CHAT_ROLES = ('system', 'user', 'assistant')
CHAT_MARKERS = {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>', 'end': '<|end|>'}
_OWN_VOCABULARY = ('char', 'word', 'bpe')  # kinds whose vocabulary is ours to extend


class ChatTokenizer(Tokenizer):
    """A tokenizer and a chat template: each turn is its role's marker, the text, then the end-of-turn marker,

        <|user|>What is 2 + 3?<|end|><|assistant|>5<|end|>

    special_tokens maps 'system', 'user', 'assistant' and 'end' to their markers, and travels in the description
    (so in meta.json and every checkpoint). Where the vocabulary is ours (char, word, bpe) the markers are new tokens,
    ids base.vocab_size + 0, 1, ... in that order. A fixed vocabulary (tiktoken, hf) is a pretrained model's, so
    nothing is added: 'end' is the tokenizer's own end-of-text ('<|endoftext|>' for GPT-2, an HF tokenizer's eos)
    and the role markers are plain text ('User:\\n'). Either way encode() of any text never gives the end-of-turn id
    (or an added marker's), so no message can close a turn or forge one; plain-text role markers can be typed, but
    only the template puts them after an end of turn."""

    def __init__(self, base, special_tokens):
        if isinstance(base, ChatTokenizer):
            raise TokenizerError('this tokenizer has a chat template already')
        if not isinstance(special_tokens, dict) or sorted(special_tokens) != sorted(CHAT_MARKERS) or not all(
                isinstance(v, str) and v for v in special_tokens.values()):
            raise TokenizerError(f'special_tokens must map {", ".join(CHAT_MARKERS)} to their marker strings')
        self.base, self.kind, self.special_tokens = base, base.kind, dict(special_tokens)
        self.lossless, self.unk_id, self.eot_id = base.lossless, base.unk_id, base.eot_id
        if base.kind in _OWN_VOCABULARY:
            self.added = list(CHAT_MARKERS)  # roles, in id order
            self.marker_ids = {role: [base.vocab_size + i] for i, role in enumerate(self.added)}
        else:
            if base.eot_id is None or base.decode([base.eot_id]) != special_tokens['end']:
                raise TokenizerError(f"a {base.kind} tokenizer's end of turn must be its own end-of-text token, "
                                     f"not {special_tokens['end']!r}" if base.eot_id is not None else
                                     f'this {base.kind} tokenizer has no end-of-text token to end turns with')
            self.added = []
            self.marker_ids = {role: base.encode(special_tokens[role]) for role in CHAT_ROLES}
            self.marker_ids['end'] = [base.eot_id]
        self.vocab_size = base.vocab_size + len(self.added)
        self.end_id = self.marker_ids['end'][0]

    def render_turn(self, role, content):
        """One turn's ids, and per id 1 where a chat fine-tune takes the loss: the assistant's text and its end."""
        if role not in CHAT_ROLES:
            raise TokenizerError(f"role {role!r}: use {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise TokenizerError(f'the content of a {role} message must be text, not {type(content).__name__}')
        head, body = self.marker_ids[role], self.encode(content) + [self.end_id]
        return head + body, [0] * len(head) + [int(role == 'assistant')] * len(body)

    def render(self, messages):
        """A conversation ([{'role': 'user', 'content': ...}, ...]) as (ids, loss mask), see render_turn."""
        if not isinstance(messages, list) or not messages:
            raise TokenizerError('a conversation is a non-empty list of messages')
        ids, mask = [], []
        for message in messages:
            if not isinstance(message, dict) or 'role' not in message or 'content' not in message:
                raise TokenizerError("a message is an object with a 'role' and a 'content'")
            turn_ids, turn_mask = self.render_turn(message['role'], message['content'])
            ids += turn_ids
            mask += turn_mask
        return ids, mask

    def encode(self, text):
        return self.base.encode(text)

    def encode_batch(self, texts):
        return self.base.encode_batch(texts)

    def _tail_bytes(self, ids):
        special = np.flatnonzero(ids >= self.base.vocab_size)
        after = ids[special[-1] + 1:] if len(special) else ids  # a cut character can only follow the last special
        return self.base._tail_bytes(after) if len(after) else None

    def _decode(self, ids):
        n = self.base.vocab_size
        pieces, start = [], 0
        for i in np.flatnonzero(ids >= n):
            if i > start:
                pieces.append(self.base._decode(ids[start:i]))
            pieces.append(self.special_tokens[self.added[ids[i] - n]])
            start = i + 1
        if start < len(ids):
            pieces.append(self.base._decode(ids[start:]))
        return ''.join(pieces)

    def drop_unknown(self, text):
        return self.base.drop_unknown(text)

    def unknown_words(self, text):
        return self.base.unknown_words(text)

    def own_file(self):
        return self.base.own_file()

    def describe(self):
        return dict(self.base.describe(), special_tokens=dict(self.special_tokens))


def with_chat_template(tokenizer):
    """tokenizer with the chat template (see ChatTokenizer); one that has it already is returned as it is."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    markers = dict(CHAT_MARKERS)
    if tokenizer.kind not in _OWN_VOCABULARY:
        markers = {'system': 'System:\n', 'user': 'User:\n', 'assistant': 'Assistant:\n',
                   'end': tokenizer.decode([tokenizer.eot_id]) if tokenizer.eot_id is not None else '?'}
    return ChatTokenizer(tokenizer, markers)


def _looks_like_path(name):
    # hub names are 'name' or 'org/name'; anything else can only be a folder
    return os.path.isabs(name) or name.startswith(('.', '~')) or name.count('/') > 1


_TRAINERS = {'char': CharTokenizer.train, 'word': WordTokenizer.train, 'bpe': BPETokenizer.train,
             'tiktoken': TiktokenTokenizer, 'hf': HFTokenizer}


def _check_kind(kind):
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind '{kind}': {_nearest(kind, KINDS)}")


def make_tokenizer(kind, texts=None, **options):
    """Build a tokenizer. char, word and bpe are trained on texts (an iterable of documents, or one string);
    tiktoken and hf are fixed and ignore texts. Options: word: vocab_size, min_count; bpe: vocab_size;
    tiktoken: name (default 'gpt2'); hf: name, gguf_file."""
    _check_kind(kind)
    build = _TRAINERS[kind]
    if kind in ('char', 'word', 'bpe'):
        if texts is None:
            raise TokenizerError(f"a '{kind}' tokenizer is trained on text: pass texts")
        options['texts'] = [texts] if isinstance(texts, str) else texts
    try:
        inspect.signature(build).bind(**options)
    except TypeError as e:
        raise TokenizerError(f"bad options for a '{kind}' tokenizer: {e}") from None
    return build(**options)


def load_tokenizer(description, folder=None):
    """Rebuild a tokenizer from its describe() dict (as stored in meta.json and checkpoints); folder is where the
    description was found, whose tokenizer.json (if the description names one) is read first."""
    kind = description.get('kind') if isinstance(description, dict) else None
    _check_kind(kind)
    if 'special_tokens' in description:  # a chat template over the tokenizer the rest describes
        base = {k: v for k, v in description.items() if k != 'special_tokens'}
        return ChatTokenizer(load_tokenizer(base, folder), description['special_tokens'])
    try:
        if kind == 'char':
            return CharTokenizer(description['chars'])
        if kind == 'word':
            return WordTokenizer(description['vocab'])
        if kind == 'bpe':
            from tokenizers import Tokenizer as Backend
            return BPETokenizer(Backend.from_str(description['tokenizer_json']))
        if kind == 'tiktoken':
            return TiktokenTokenizer(description['name'])
        own = description.get('tokenizer_file')
        return HFTokenizer(description['name'], description.get('gguf_file'),
                           os.path.join(folder, os.path.basename(own)) if own and folder else None,
                           description.get('eos_token'))
    except KeyError as e:
        raise TokenizerError(f"the '{kind}' tokenizer description lacks {e}: it is damaged, "
                             f"prepare the dataset again") from None
    except Exception as e:
        if isinstance(e, TokenizerError):
            raise
        raise TokenizerError(f"cannot rebuild the '{kind}' tokenizer from its description: {_first_line(e)}") from None


def tokenizer_name(description):
    """A tokenizer description in a few words, for messages: "tiktoken 'gpt2'", "a char tokenizer"."""
    if description.get('name'):
        return f"{description['kind']} {description['name']!r}"
    return f"a {description.get('kind')} tokenizer"


def tokenizers_match(a, b, chat=False):
    """Whether two tokenizer descriptions encode text alike: equal, or the same vocabulary under two
    kinds (tiktoken's 'gpt2' and Hugging Face's 'gpt2'), judged on a probe text. chat: b may also be a plus a
    chat template (a chat fine-tune's dataset for a model trained on a: its new tokens come after a's ids)."""
    if chat and 'special_tokens' in b and 'special_tokens' not in a:
        b = {k: v for k, v in b.items() if k != 'special_tokens'}
    if a == b:
        return True
    probe = ("Hello, world! It's 2024: naïve café, Привет мир, 你好世界 \n\n\t  spaces   and "
             "tabs\ttoo; 1234567 + 0.5 = ? <|endoftext|> </s> 🙂")
    try:
        ta, tb = load_tokenizer(a), load_tokenizer(b)
        return ta.vocab_size == tb.vocab_size and ta.encode(probe) == tb.encode(probe)
    except TokenizerError:
        return False


def bytes_per_token(tokenizer, sample_text):
    """UTF-8 bytes per token on sample_text: how much text a token carries (GPT-2 gets ~4 on English),
    to compare tokenizers and losses across them."""
    n = len(tokenizer.encode(sample_text))
    if n == 0:
        raise TokenizerError('bytes_per_token needs a sample text that encodes to at least one token')
    return len(sample_text.encode('utf-8')) / n
