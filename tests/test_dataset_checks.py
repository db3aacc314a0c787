"""A damaged or crafted dataset is refused the way a damaged checkpoint is: one DatasetError line naming the file and
the field, before anything is built from it (before, about 45 such datasets gave tracebacks from train.py and
eval.py, dtype 'object' a segmentation fault, vocab_size 1e12 an allocation of terabytes). faults.py's tables of
damage, each met in this process, and a few through the real scripts."""
import shutil

import numpy as np
import pytest
from conftest import TINY_TEXT, assert_clean_error, run

import faults
from dataset import DatasetError, DatasetWriter, check_split, load_meta, open_split, write_dataset
from tokenizer import make_tokenizer, with_chat_template


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
    """A good character dataset and a good chat dataset (uint16 ids, a mask per split), written in this process."""
    folder = tmp_path_factory.mktemp('datasets')
    tokenizer = make_tokenizer('char', TINY_TEXT)
    plain = folder / 'plain'
    plain.mkdir()
    n = len(TINY_TEXT) * 9 // 10
    write_dataset(plain, tokenizer, {'train': tokenizer.encode(TINY_TEXT[:n]), 'val': tokenizer.encode(TINY_TEXT[n:])},
                  bytes_per_token=1.0)
    chat = folder / 'chat'
    chat.mkdir()
    chat_tokenizer = with_chat_template(tokenizer)
    with DatasetWriter(chat, chat_tokenizer, masks=True) as out:
        for split in ('train', 'val'):
            ids = chat_tokenizer.encode(TINY_TEXT[:3000])
            out.write(split, ids, mask=np.arange(len(ids)) % 2)
        out.commit(train_tokens=out.tokens['train'], val_tokens=out.tokens['val'])
    return {'plain': plain, 'chat': chat}


def check(folder):
    """What train.py and eval.py do with a dataset before using it."""
    meta = load_meta(folder)
    for split in ('train', 'val'):
        check_split(folder, split, meta)
    return meta


def damaged(datasets, kind, damage, tmp_path):
    folder = tmp_path / 'damaged'
    shutil.copytree(datasets[kind], folder)
    damage(folder)
    return folder


def test_the_good_datasets_pass(datasets):
    assert check(datasets['plain'])['dtype'] == 'uint16' and check(datasets['chat'])['chat'] is True


@pytest.mark.parametrize('name,file,message', [
    ('meta.json not JSON', 'meta.json', 'not UTF-8 JSON (JSONDecodeError'),
    ('meta.json empty', 'meta.json', 'not UTF-8 JSON'),
    ('meta.json not UTF-8', 'meta.json', 'not UTF-8 JSON (UnicodeDecodeError'),
    ('meta.json a list', 'meta.json', 'holds a JSON list, not an object'),
    ('meta.json nested 100,000 deep', 'meta.json', 'not UTF-8 JSON (RecursionError'),
    ('meta.json a 5,000-digit number', 'meta.json', 'not UTF-8 JSON (ValueError'),
    ('meta.json a directory', 'meta.json', 'it is not a file'),
    ('no dtype', 'meta.json', "it lacks 'dtype'"),
    ('no tokenizer', 'meta.json', "it lacks 'tokenizer'"),
    ('no vocab_size', 'meta.json', "it lacks 'vocab_size'"),
    ('dtype object', 'meta.json', "dtype must be one of uint16, uint32, not 'object'"),
    ('dtype float64', 'meta.json', "dtype must be one of uint16, uint32, not 'float64'"),
    ('dtype evil', 'meta.json', "dtype must be one of uint16, uint32, not 'evil'"),
    ('dtype of the wrong width', 'train.bin', 'uint32 ids, meta.json says train_tokens='),
    ('vocab_size 1e12', 'meta.json', 'vocab_size must be a whole number, not 1000000000000.0'),
    ('vocab_size 10**12', 'meta.json', 'vocab_size must be in [1, 65,536] (dtype uint16), not 1,000,000,000,000'),
    ('vocab_size a string', 'meta.json', "vocab_size must be a whole number, not '65'"),
    ('vocab_size below the ids', 'train.bin', 'outside vocab_size=3'),
    ('bytes_per_token a string', 'meta.json', "bytes_per_token must be a number, not '1.0'"),
    ('val_tokens a string', 'meta.json', "val_tokens must be a whole number, not '100'"),
    ('val_tokens negative', 'meta.json', 'val_tokens must not be negative'),
    ('tokenizer a string', 'meta.json', "tokenizer must be an object (the tokenizer's description), not 'char'"),
    ('tokenizer of no kind', 'meta.json', "tokenizer.kind must be one of char, word, bpe, tiktoken, hf, not 'evil'"),
    ('chat a string', 'meta.json', "chat must be true or false, not 'yes'"),
    ('cleaning a string', 'meta.json', "cleaning must be an object (prepare.py's cleaning options), not 'NFC'"),
    ('cleaning without normalize', 'meta.json', "it lacks 'cleaning.normalize'"),
    ('cleaning.normalize evil', 'meta.json', "cleaning.normalize must be one of NFC, NFKC, NFD, NFKD or '', not 'NFX'"),
    ('cleaning.clean_wiki a string', 'meta.json', "cleaning.clean_wiki must be true or false, not 'no'"),
    ('train.bin empty', 'train.bin', 'it is empty'),
    ('train.bin a directory', 'train.bin', 'it is not a file'),
    ('train.bin of an odd size', 'train.bin', '1,001 bytes, not a whole number of uint16 token ids'),
    ('train.bin shorter than meta.json says', 'train.bin', 'it holds 500 uint16 ids, meta.json says train_tokens='),
    ('tokenizer.json random bytes', 'tokenizer.json', 'not UTF-8 JSON (UnicodeDecodeError'),
    ('tokenizer.json a JSON list', 'tokenizer.json', 'holds a JSON list, not an object'),
    ('tokenizer.json outside the folder', 'meta.json', "tokenizer_file must be a file name in its folder, not '../x.json'"),
])
def test_a_damaged_dataset_is_refused_in_one_line_naming_the_file_and_the_field(datasets, tmp_path, name, file, message):
    folder = damaged(datasets, 'plain', faults.DATASET_DAMAGE[name], tmp_path)
    with pytest.raises(DatasetError) as error:
        check(folder)
    text = str(error.value)
    assert '\n' not in text and f'{folder / file} is damaged: ' in text and message in text, text
    assert 'prepare the dataset again' in text


@pytest.mark.parametrize('name,message', [
    ('train.mask.bin shorter than train.bin', 'train.mask.bin is damaged: it must hold one byte per token of train.bin'),
    ('val.mask.bin missing', 'missing'),
    ('val.mask.bin a directory', 'val.mask.bin is damaged'),
])
def test_a_chat_dataset_whose_masks_do_not_fit_its_ids_is_refused(datasets, tmp_path, name, message):
    folder = damaged(datasets, 'chat', faults.CHAT_DATASET_DAMAGE[name], tmp_path)
    with pytest.raises(DatasetError, match=message):
        check(folder)


@pytest.mark.parametrize('name', ['meta.json not JSON', 'no vocab_size', 'train.bin empty', 'train.mask.bin shorter than train.bin'])
def test_a_damaged_chat_dataset_names_prepare_chat_py_to_make_it_again(datasets, tmp_path, name):
    """prepare.py cannot make a chat dataset: the hint names the script that can (it named prepare.py)."""
    folder = damaged(datasets, 'chat', {**faults.DATASET_DAMAGE, **faults.CHAT_DATASET_DAMAGE}[name], tmp_path)
    with pytest.raises(DatasetError) as error:
        check(folder)
    assert f'python prepare_chat.py --input=YOUR_CONVERSATIONS.jsonl --tokenizer_from=YOUR_MODEL --out_dir={folder}' \
        in str(error.value) and 'prepare.py --input' not in str(error.value), error.value


def test_open_split_checks_sizes_on_every_call(datasets, tmp_path):
    """train.py opens a split afresh for every batch: a file cut while a run goes on is refused there too."""
    folder = damaged(datasets, 'plain', lambda folder: None, tmp_path)
    meta = check(folder)
    faults.cut_file('val.bin', 11)(folder)
    with pytest.raises(DatasetError, match='11 bytes, not a whole number of uint16'):
        open_split(folder, 'val', meta)


def test_the_scripts_refuse_a_damaged_dataset_in_one_line(datasets, tmp_path):
    """What was a segmentation fault in eval.py (a memmap of Python objects) and a KeyError in train.py; eval.py on the
    dataset of a good run. One train.py and one eval.py, at once."""
    out = tmp_path / 'out'
    run('train.py', f'--dataset={datasets["plain"]}', f'--out_dir={out}', *faults.TRAIN, '--max_iters=1',
        '--eval_interval=1')
    object_dtype = damaged(datasets, 'plain', faults.DATASET_DAMAGE['dtype object'], tmp_path)
    no_vocab = tmp_path / 'no_vocab'
    shutil.copytree(datasets['plain'], no_vocab)
    faults.DATASET_DAMAGE['no vocab_size'](no_vocab)
    train = faults.script('train.py', f'--dataset={no_vocab}', f'--out_dir={tmp_path / "b"}', *faults.TRAIN)
    evaluate = run('eval.py', f'--out_dir={out}', f'--dataset={object_dtype}', '--device=cpu', check=False)
    assert_clean_error(evaluate, f'{object_dtype}/meta.json is damaged: dtype must be one of uint16, uint32')
    code, _, err = faults.finish(train)
    assert faults.one_line_error(code, err) and "meta.json is damaged: it lacks 'vocab_size'" in err, err
