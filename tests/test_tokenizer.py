"""Tokenizer round trips, descriptions and error messages, for every kind. Offline: the tiktoken test
reads GPT-2's files from ../shared when they are there; the hf tests build their tokenizers here."""
import json
import shutil
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import token_dtype  # noqa: E402
from tokenizer import (TokenizerError, UnknownCharactersError, bytes_per_token, load_tokenizer,  # noqa: E402
                       make_tokenizer)

TIKTOKEN_CACHE = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'tiktoken_cache'

MULTILINGUAL = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "Ну, князь. Генуя и Лукка стали не больше, как поместья фамилии Бонапарте.\n"
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。\n"
    "A língua portuguesa é falada em São Paulo, Lisboa e Luanda; coração, ação, você!\n"
    "\tTabs,  double  spaces and trailing space \r\n"
)
UNSEEN = "Ελληνικά, العربية, emoji 🙂🚀, ǅ, Ünïcödé — and a lone \x00 byte.\n"


def multilingual_corpus():
    # a few variations so BPE has pairs to merge beyond one repeated string
    return [MULTILINGUAL.replace('speak', word) for word in ['speak', 'talk', 'sing', 'read', 'write', 'run', 'go']]


def reload(tok):
    """describe() -> JSON text -> load_tokenizer, as meta.json does."""
    return load_tokenizer(json.loads(json.dumps(tok.describe())))


@pytest.fixture(scope='module')
def char_tok():
    return make_tokenizer('char', MULTILINGUAL)


@pytest.fixture(scope='module')
def word_tok():
    return make_tokenizer('word', MULTILINGUAL)


@pytest.fixture(scope='module')
def bpe_tok():
    return make_tokenizer('bpe', multilingual_corpus(), vocab_size=400)


@pytest.fixture(scope='module')
def gpt2():
    with pytest.MonkeyPatch.context() as mp:
        if TIKTOKEN_CACHE.is_dir() and 'TIKTOKEN_CACHE_DIR' not in os.environ:
            mp.setenv('TIKTOKEN_CACHE_DIR', str(TIKTOKEN_CACHE))
        try:
            tok = make_tokenizer('tiktoken', name='gpt2')
        except TokenizerError as e:
            if TIKTOKEN_CACHE.is_dir():
                raise
            pytest.skip(f'GPT-2 tiktoken files unavailable: no cache at {TIKTOKEN_CACHE} and no download ({e})')
        yield tok


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory, hub_offline):
    """A byte-level BPE with an eos token, saved the way a hub model ships it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(multilingual_corpus(), trainers.BpeTrainer(
        vocab_size=350, special_tokens=['</s>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    # append eos to every encoding, as many hub tokenizers add BOS/EOS: our encode must not
    backend.post_processor = processors.TemplateProcessing(single='$A </s>', special_tokens=[('</s>', 0)])
    folder = tmp_path_factory.mktemp('hf_tok')
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='</s>').save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def hf_tok(hf_folder):
    return make_tokenizer('hf', name=str(hf_folder))


KINDS = ['char_tok', 'word_tok', 'bpe_tok', 'gpt2', 'hf_tok']


# --- every kind -------------------------------------------------------------------------------------

@pytest.mark.parametrize('fixture', KINDS)
def test_describe_is_json_and_reloads_identically(fixture, request):
    tok = request.getfixturevalue(fixture)
    again = reload(tok)
    assert (again.kind, again.vocab_size, again.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
    text = MULTILINGUAL if tok.kind != 'word' else MULTILINGUAL + ' unseen words'
    assert again.encode(text) == tok.encode(text)
    assert again.describe() == tok.describe()


@pytest.mark.parametrize('fixture', KINDS)
def test_encode_batch_matches_encode_and_ids_fit_vocab(fixture, request):
    tok = request.getfixturevalue(fixture)
    texts = MULTILINGUAL.splitlines(keepends=True) + ['']
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    ids = [i for seq in batch for i in seq]
    assert all(isinstance(i, int) for i in ids) and 0 <= min(ids) and max(ids) < tok.vocab_size


@pytest.mark.parametrize('fixture', KINDS)
def test_decode_accepts_arrays_and_tensors_and_rejects_foreign_ids(fixture, request):
    import torch
    tok = request.getfixturevalue(fixture)
    ids = tok.encode(MULTILINGUAL)
    expected = tok.decode(ids)
    assert tok.decode(np.array(ids, dtype=token_dtype(tok.vocab_size))) == expected
    assert tok.decode(torch.tensor(ids)) == expected
    assert tok.decode([]) == ''
    with pytest.raises(TokenizerError, match='outside'):
        tok.decode([0, tok.vocab_size])


@pytest.mark.parametrize('fixture', ['char_tok', 'bpe_tok', 'gpt2', 'hf_tok'])
def test_round_trip_multilingual(fixture, request):
    tok = request.getfixturevalue(fixture)
    assert tok.decode(tok.encode(MULTILINGUAL)) == MULTILINGUAL
    assert tok.drop_unknown(MULTILINGUAL) == MULTILINGUAL


@pytest.mark.parametrize('fixture', ['bpe_tok', 'gpt2', 'hf_tok'])
def test_byte_level_kinds_round_trip_unseen_text_and_ignore_special_strings(fixture, request):
    tok = request.getfixturevalue(fixture)
    assert tok.decode(tok.encode(UNSEEN)) == UNSEEN
    assert tok.drop_unknown(UNSEEN) == UNSEEN
    eot_text = tok.decode([tok.eot_id])
    assert eot_text in ('<|endoftext|>', '</s>')
    # user text spelling the end-of-text token stays text: it never becomes eot_id
    ids = tok.encode(f'a{eot_text}b')
    assert tok.eot_id not in ids and tok.decode(ids) == f'a{eot_text}b'


def test_bytes_per_token(char_tok, bpe_tok):
    assert bytes_per_token(char_tok, 'aã') == 3 / 2  # 'ã' is two UTF-8 bytes, one char token
    text = ''.join(multilingual_corpus())
    assert bytes_per_token(bpe_tok, text) == len(text.encode('utf-8')) / len(bpe_tok.encode(text))
    assert bytes_per_token(bpe_tok, text) > 1.5  # merges learned on this very text compress it
    with pytest.raises(TokenizerError):
        bytes_per_token(char_tok, '')


# --- char ---------------------------------------------------------------------------------------------

def test_char_vocabulary_and_ids_are_sorted_characters(char_tok):
    chars = ''.join(sorted(set(MULTILINGUAL)))
    assert char_tok.describe() == {'kind': 'char', 'chars': chars}
    assert char_tok.vocab_size == len(chars) and char_tok.eot_id is None
    assert char_tok.encode(MULTILINGUAL) == [chars.index(c) for c in MULTILINGUAL]
    assert make_tokenizer('char', ['ba', 'ca']).chars == 'abc'  # union over documents


def test_char_unknown_characters_are_named_and_droppable():
    tok = make_tokenizer('char', 'ab中')
    # 'c' falls inside the lookup table's range, '😀' beyond it: both must be caught
    with pytest.raises(UnknownCharactersError) as info:
        tok.encode('a😀bcc')
    assert info.value.chars == ['c', '😀']
    message = str(info.value)
    assert "'c'" in message and "'😀'" in message and '--drop_unknown=True' in message and '\n' not in message
    assert tok.drop_unknown('a😀bcc中') == 'ab中'
    assert tok.encode(tok.drop_unknown('a😀bcc中')) == [0, 1, 2]

    many = ''.join(chr(ord('A') + i) for i in range(15))
    with pytest.raises(UnknownCharactersError) as info:
        tok.encode(many)
    message = str(info.value)
    assert message.startswith('15 character') and 'and 5 more' in message
    assert "'J'" in message and "'K'" not in message  # at most ten are listed


# --- word ---------------------------------------------------------------------------------------------

def test_word_documented_normalisation():
    text = "Hi,  it's\tme.\r\nBye\n\n  São-Paulo_2 ok"
    tok = make_tokenizer('word', text)
    expected_tokens = ['Hi', ',', 'it', "'", 's', 'me', '.', '\n', 'Bye', '\n', '\n', 'São', '-', 'Paulo_2', 'ok']
    assert [tok.vocab[i] for i in tok.encode(text)] == expected_tokens
    assert tok.decode(tok.encode(text)) == "Hi, it's me.\nBye\n\nSão-Paulo_2 ok"
    assert tok.decode(tok.encode("Hi,  it's\tme.\r\nBye")) == "Hi, it's me.\nBye"  # the docstring's example
    # text as a corpus has it comes back as written, but for its whitespace (before, 'ROMEO :' and "thou ' ll")
    verse = "ROMEO:\nThou'll see (it) [soon]; won't you? Yes!\nJULIET: {No}, o'er-long."
    tok = make_tokenizer('word', verse)
    assert tok.decode(tok.encode(verse)) == verse


def test_word_unknown_words_map_to_unk(word_tok):
    assert word_tok.vocab[0] == '<unk>' and word_tok.eot_id is None
    ids = word_tok.encode('Lisboa zzyzx Paulo')
    assert ids[1] == 0 and 0 not in (ids[0], ids[2])
    assert word_tok.decode(ids) == 'Lisboa <unk> Paulo'
    assert word_tok.drop_unknown('zzyzx') == 'zzyzx'  # nothing is rejected, so nothing is dropped
    assert word_tok.encode('<unk>') == [0, 0, 0]  # the string '<unk>' is '<', 'unk', '>', all unknown


def test_word_vocab_capping():
    text = 'a a a a a c c c b b b d'  # c is seen before b: ties must still sort alphabetically
    assert make_tokenizer('word', text).vocab == ['<unk>', 'a', 'b', 'c', 'd']
    assert make_tokenizer('word', text, vocab_size=3).vocab == ['<unk>', 'a', 'b']  # b ties c, b sorts first
    assert make_tokenizer('word', text, min_count=3).vocab == ['<unk>', 'a', 'b', 'c']
    assert make_tokenizer('word', text, vocab_size=2, min_count=3).vocab == ['<unk>', 'a']
    tok = make_tokenizer('word', [text, 'd d'], min_count=3)  # counts add up over documents
    assert tok.vocab == ['<unk>', 'a', 'b', 'c', 'd'] and tok.encode('d c x') == [4, 3, 0]


# --- bpe ----------------------------------------------------------------------------------------------

def test_bpe_vocab_and_description(bpe_tok):
    import tokenizers
    description = bpe_tok.describe()
    assert set(description) == {'kind', 'tokenizer_json'}
    vocab = tokenizers.Tokenizer.from_str(description['tokenizer_json']).get_vocab()
    assert bpe_tok.vocab_size == max(vocab.values()) + 1 == 400
    assert vocab['<|endoftext|>'] == bpe_tok.eot_id
    with pytest.raises(TokenizerError, match='257'):
        make_tokenizer('bpe', 'abc', vocab_size=100)


# --- tiktoken -----------------------------------------------------------------------------------------

def test_tiktoken_gpt2_known_ids(gpt2):
    assert (gpt2.vocab_size, gpt2.eot_id) == (50257, 50256)
    assert gpt2.encode('Hello world') == [15496, 995]
    assert gpt2.encode('<|endoftext|>') == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.describe() == {'kind': 'tiktoken', 'name': 'gpt2'}


def test_hf_gpt2_matches_tiktoken_gpt2(gpt2, tmp_path, hub_offline):
    """Two independent implementations of GPT-2's BPE, built from the same files, agree id for id."""
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip(f'needs the GPT-2 files in {TIKTOKEN_CACHE}')
    from transformers import GPT2TokenizerFast
    files = tmp_path / 'files'  # GPT-2's own file names for tiktoken's cached copies
    files.mkdir()
    shutil.copy(TIKTOKEN_CACHE / '6c7ea1a7e38e3a7f062df639a5b80947f075ffe6', files / 'vocab.json')
    shutil.copy(TIKTOKEN_CACHE / '6d1cbeee0f20b3d9449abfede4726ed8212e3aee', files / 'merges.txt')
    GPT2TokenizerFast.from_pretrained(files).save_pretrained(tmp_path / 'hf')
    hf = make_tokenizer('hf', name=str(tmp_path / 'hf'))
    assert (hf.vocab_size, hf.eot_id) == (gpt2.vocab_size, gpt2.eot_id)
    text = MULTILINGUAL + UNSEEN + ' <|endoftext|> '
    assert hf.encode(text) == gpt2.encode(text)
    assert hf.encode_batch([text, UNSEEN]) == gpt2.encode_batch([text, UNSEEN])


def test_tiktoken_unknown_encoding_suggests_nearest():
    with pytest.raises(TokenizerError, match="did you mean 'cl100k_base'"):
        make_tokenizer('tiktoken', name='cl100k')


# --- hf -----------------------------------------------------------------------------------------------

def test_hf_wraps_saved_tokenizer(hf_tok, hf_folder):
    from transformers import AutoTokenizer
    reference = AutoTokenizer.from_pretrained(str(hf_folder))
    assert hf_tok.vocab_size == len(reference) == 350
    assert hf_tok.eot_id == reference.convert_tokens_to_ids('</s>')
    # the plain backend encoding, without the eos the tokenizer's post-processor appends by default
    plain = reference.backend_tokenizer.encode(MULTILINGUAL, add_special_tokens=False).ids
    assert reference.encode(MULTILINGUAL) == plain + [hf_tok.eot_id]
    assert hf_tok.encode(MULTILINGUAL) == plain
    assert hf_tok.describe() == {'kind': 'hf', 'name': str(Path(hf_folder).resolve()), 'tokenizer_file': 'tokenizer.json',
                                 'eos_token': '</s>'}  # its own tokenizer.json travels with the data


def test_hf_large_vocab_needs_uint32(tmp_path, hub_offline):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    # a 70,000-word WordLevel vocabulary, built directly: training one this large would be slow
    vocab = {f'w{i}': i for i in range(70_000)}
    vocab['<unk>'], vocab['</s>'] = 70_000, 70_001
    backend = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='</s>', unk_token='<unk>').save_pretrained(tmp_path)

    tok = make_tokenizer('hf', name=str(tmp_path))
    assert tok.vocab_size == 70_002 and tok.eot_id == 70_001
    assert token_dtype(tok.vocab_size) is np.uint32
    text = 'w69999 w65536 w3 w65535'
    ids = tok.encode(text)
    assert ids == [69999, 65536, 3, 65535]
    stored = np.array(ids, dtype=token_dtype(tok.vocab_size))
    assert stored.tolist() == ids and stored.astype(np.uint16).tolist() != ids  # uint16 would wrap them
    assert tok.decode(stored) == text
    assert reload(tok).encode(text) == ids


def test_hf_missing_tokenizer_is_one_line_error(tmp_path, hub_offline):
    for name in [str(tmp_path / 'no_such_folder'), 'no-such-org/no-such-tokenizer']:
        with pytest.raises(TokenizerError) as info:
            make_tokenizer('hf', name=name)
        message = str(info.value)
        assert message.startswith(f"cannot load Hugging Face tokenizer '{name}'") and '\n' not in message
        assert 'pass a local folder' in message


# --- errors -------------------------------------------------------------------------------------------

def test_unknown_kind_names_nearest():
    with pytest.raises(TokenizerError, match="did you mean 'char'"):
        make_tokenizer('chr', 'abc')
    with pytest.raises(TokenizerError, match="did you mean 'tiktoken'"):
        load_tokenizer({'kind': 'tiktokn', 'name': 'gpt2'})


def test_bad_options_and_descriptions():
    with pytest.raises(TokenizerError, match='vocab_size'):
        make_tokenizer('char', 'abc', vocab_size=10)
    with pytest.raises(TokenizerError, match='texts'):
        make_tokenizer('bpe')
    with pytest.raises(TokenizerError, match="'chars'"):
        load_tokenizer({'kind': 'char'})
    with pytest.raises(TokenizerError):
        load_tokenizer({'kind': 'bpe', 'tokenizer_json': '{not json'})
    with pytest.raises(TokenizerError):
        load_tokenizer({'kind': 'word', 'vocab': ['a', 'b']})  # no '<unk>' first
