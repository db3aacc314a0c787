"""The corpora's prepare scripts (Shakespeare with GPT-2's BPE, OpenWebText) and, for every tokenizer kind,
a small prepare -> train -> sample run whose sample must equal an independent greedy decode of the
checkpoint with the tokenizer stored in it. Offline: GPT-2's BPE files come from ../shared when it is there."""
import json

import numpy as np
import pytest

from conftest import ROOT, TINY_TRAIN, assert_no_near_tie, run_all
from test_prepare import ENV, TIKTOKEN_CACHE, error_line, load, run, sentences, split_of
from tokenizer import TokenizerError, load_tokenizer, make_tokenizer

SHAKESPEARE = ROOT.parent / 'shared' / 'data' / 'tinyshakespeare.txt'
# a few steps suffice: the test is about the tokenizer's way from dataset to checkpoint to samples, and large
# vocabularies (GPT-2's, 70k) make every step slow on a CPU
TINY_MODEL = TINY_TRAIN + ['--batch_size=4', '--eval_iters=1', '--max_iters=4', '--lr_decay_iters=4', '--eval_interval=4']


@pytest.fixture(scope='module')
def gpt2():
    with pytest.MonkeyPatch.context() as mp:
        if TIKTOKEN_CACHE.is_dir():
            mp.setenv('TIKTOKEN_CACHE_DIR', str(TIKTOKEN_CACHE))
        try:
            yield make_tokenizer('tiktoken', name='gpt2')
        except TokenizerError as e:
            if TIKTOKEN_CACHE.is_dir():
                raise
            pytest.skip(f'GPT-2 tiktoken files unavailable: no cache at {TIKTOKEN_CACHE} and no download ({e})')


# --- corpora ---------------------------------------------------------------------------------------------

def test_shakespeare_gpt2(tmp_path, gpt2):
    text = SHAKESPEARE.read_text(encoding='utf-8') if SHAKESPEARE.exists() else '\n\n'.join(sentences(300, seed=4))
    (tmp_path / 'input.txt').write_text(text, encoding='utf-8')
    run('data/shakespeare/prepare.py', f'--input={tmp_path / "input.txt"}', f'--out_dir={tmp_path / "out"}')
    meta, bins = load(tmp_path / 'out')
    n = int(0.9 * len(text))
    assert bins['train'].tolist() == gpt2.encode(text[:n]) and bins['val'].tolist() == gpt2.encode(text[n:])
    assert meta['tokenizer'] == {'kind': 'tiktoken', 'name': 'gpt2'} and meta['dtype'] == 'uint16'
    assert meta['bytes_per_token'] == pytest.approx(len(text[n:].encode()) / len(bins['val']))
    if SHAKESPEARE.exists():  # nanoGPT's figures
        assert (len(bins['train']), len(bins['val'])) == (301_966, 36_059)


def test_openwebtext_script_with_a_local_dataset(tmp_path, gpt2):
    """The OpenWebText script's pipeline on a small local dataset: text kept as it is (duplicates and
    spacing included), <|endoftext|> after every document, two spawned workers over many batches."""
    from datasets import Dataset
    docs = [f'{s}\n\n  {t}  ' for s, t in zip(sentences(40, seed=5), sentences(40, seed=6))]
    docs += [docs[0], 'Ну, князь. <|endoftext|> is plain text here']
    Dataset.from_dict({'text': docs}).save_to_disk(tmp_path / 'owt')
    run('data/openwebtext/prepare.py', f'--hf_dataset={tmp_path / "owt"}', f'--out_dir={tmp_path / "out"}',
        '--val_fraction=0.3', '--num_proc=2', '--batch_mb=0.0005')
    meta, bins = load(tmp_path / 'out')
    assert meta['tokenizer'] == {'kind': 'tiktoken', 'name': 'gpt2'}
    for split in ('train', 'val'):
        expected = [i for d in docs if split_of(d, 0.3) == split for i in gpt2.encode(d) + [50256]]
        assert bins[split].tolist() == expected, split
    assert meta['train_documents'] + meta['val_documents'] == len(docs)


# --- prepare -> train -> sample, for every kind --------------------------------------------------------

def greedy_completion(out_dir, prompt, max_new_tokens):
    """What sample.py must print at temperature 0, computed here without it: the checkpoint's model, the
    tokenizer stored in the checkpoint, argmax over the tokenizer's ids, a stop at end-of-text. sample.py computes
    the same logits in another process, with its decoding layout: no step here may have a near-tie."""
    import torch
    from checkpoint import load_model
    model, _, ckpt = load_model(out_dir)
    model.eval()
    tok = load_tokenizer(ckpt['tokenizer'])
    ids = tok.encode(prompt)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([ids + new]), last_only=True)
            logits = logits[0, -1]
            logits[tok.vocab_size:] = -float('inf')  # the padding rows of the embedding are no tokens
            assert_no_near_tie(logits, f' ({out_dir}, step {len(new)})')
            token = int(logits.argmax())
            if token == tok.eot_id:
                break
            new.append(token)
    return tok.decode(ids + new), ckpt


def hf_70k_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f'w{i}': i for i in range(70_000)}
    vocab['<unk>'], vocab['</s>'] = 70_000, 70_001
    backend = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='</s>', unk_token='<unk>').save_pretrained(folder)


MAX_NEW_TOKENS = 12
KINDS = {  # kind: (prepare settings, training config, prompt)
    'char': (['--tokenizer=char'], [], 'князь '),
    'word': (['--tokenizer=word'], [], 'the king'),
    'bpe': (['--tokenizer=bpe', '--vocab_size=320'], ['config/train_pt_wiki_bpe.py'], 'São Paulo'),
    'tiktoken': (['--tokenizer=tiktoken'], [], 'the king'),
    'hf': (['--tokenizer=hf'], ['config/train_ru_wiki_gemma.py'], 'w3 w65536'),  # 70,002 tokens: uint32
}


def gpt2_available():
    try:
        make_tokenizer('tiktoken', name='gpt2')
        return True
    except TokenizerError:
        return False


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """kind -> (dataset folder, checkpoint folder, documents, sample.py's output): every kind prepared, trained,
    then sampled greedily, two runs at a time (each run is mostly start-up: they overlap well)."""
    runs, prepares, trains, samples = {}, [], [], []
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        for kind, (settings, config, _) in KINDS.items():
            if kind == 'tiktoken' and not gpt2_available():
                continue  # its test skips, saying why
            folder = tmp_path_factory.mktemp(kind)
            if kind == 'hf':
                hf_70k_tokenizer(folder / 'tok')
                rng = np.random.default_rng(0)
                docs = [' '.join(f'w{i}' for i in rng.choice([3, 7, 65_535, 65_536, 69_999], size=40)) for _ in range(60)]
                settings = settings + [f'--tokenizer_name={folder / "tok"}']
            else:
                docs = [' '.join(sentences(4, seed=i)) for i in range(60)]
            (folder / 'corpus.txt').write_text('\n\n'.join(docs), encoding='utf-8')
            runs[kind] = [folder / 'data', folder / 'out', docs]
            prepares.append(('prepare.py', f'--input={folder / "corpus.txt"}', f'--out_dir={folder / "data"}',
                             '--val_fraction=0.2', *settings))
            trains.append(('train.py', *config, f'--dataset={folder / "data"}', f'--out_dir={folder / "out"}', *TINY_MODEL))
            samples.append(('sample.py', f'--out_dir={folder / "out"}', f'--start={KINDS[kind][2]}',
                            f'--max_new_tokens={MAX_NEW_TOKENS}', '--num_samples=1', '--device=cpu', '--seed=1',
                            '--temperature=0', '--use_cache=False', '--dtype=float32'))
        for commands in (prepares, trains, samples):
            results = run_all(commands)
            for command, result in zip(commands, results):
                assert result.returncode == 0, f'{command}:\n{result.stdout}\n{result.stderr}'
    for run_of_kind, result in zip(runs.values(), results):
        run_of_kind.append(result.stdout)
    return runs


@pytest.mark.parametrize('kind', list(KINDS))
def test_train_then_sample_decodes_with_the_datasets_tokenizer(kind, trained, request):
    if kind == 'tiktoken':
        request.getfixturevalue('gpt2')  # skips, saying why, without GPT-2's files
    data, out, docs, sampled = trained[kind]
    prompt = KINDS[kind][2]
    expected, ckpt = greedy_completion(out, prompt, MAX_NEW_TOKENS)
    meta = json.loads((data / 'meta.json').read_text(encoding='utf-8'))
    assert ckpt['tokenizer'] == meta['tokenizer'] and ckpt['tokenizer']['kind'] == kind
    assert ckpt['model_args']['vocab_size'] == -(-meta['vocab_size'] // 64) * 64
    assert sampled == expected + '\n---------------\n'
    assert len(expected) > len(prompt)
    if kind == 'hf':  # ids over 65,535 stored as uint32, and read back as they were
        assert meta['dtype'] == 'uint32' and ckpt['model_args']['vocab_size'] == 70_016
        _, bins = load(data)
        assert bins['train'].tolist() == [int(w[1:]) for d in docs if split_of(d, 0.2) == 'train'
                                          for w in d.split() + ['w70001']]
        assert 65_536 in bins['train'] and 69_999 in bins['train']


def test_resuming_on_a_dataset_with_another_tokenizer_is_refused(trained):
    char_out, word_data = trained['char'][1], trained['word'][0]
    line = error_line(run('train.py', f'--dataset={word_data}', f'--out_dir={char_out}', '--init_from=resume',
                          *TINY_MODEL, '--max_iters=8', check=False))
    assert 'trained with another tokenizer' in line


def test_corpus_shorter_than_one_block(tmp_path):
    (tmp_path / 'tiny.txt').write_text('\n\n'.join(['Ну, князь.', 'Gênes et Lucques.', 'coração', 'ação']), encoding='utf-8')
    result = run('prepare.py', f'--input={tmp_path / "tiny.txt"}', f'--out_dir={tmp_path / "data"}', '--tokenizer=char',
                 '--val_fraction=0.5')
    assert 'note: val holds only' in result.stdout
    line = error_line(run('train.py', f'--dataset={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}', *TINY_MODEL,
                          '--block_size=64', check=False))
    assert 'too few for block_size=64' in line
