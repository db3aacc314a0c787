"""Corpus building with larger models, offline: synthesize.py and classify_topics.py with tiny randomly initialised
transformers models built here (a GPT-2 that writes, a BERT NLI classifier), and prepare.py's per-topic cap. The
scripts run from their command lines: in this process where they succeed (each would spend seconds importing
torch and transformers again), as processes where they fail or are killed. The references: transformers' own
generate and zero-shot pipeline run one document at a time, a brute-force duplicate check, an uninterrupted run,
and a count of the files by hand."""
import collections
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_clean_error, assert_no_near_tie, run_all, script_env
from dataset import load_meta, open_split
from sample_quality import ngrams, words
from synthesize import Duplicates
from tokenizer import load_tokenizer
from topics import read_labels, read_records

pytestmark = pytest.mark.usefixtures('torch_threads_here', 'hub_offline')

TOPICS = ['the sea', 'a very old city by the river', 'music']
SAMPLED = ['--per_topic=3', '--temperature=1.0', '--top_k=50', '--seed=5']
WORDS = 'the sea of the city is a blue thing said number music river loud history mountain old sport forest fast'.split()


def hf_tokenizer():
    """A byte-level BPE trained here, with padding and end-of-text tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = [' '.join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(60)] + TOPICS
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=['<pad>', '<eos>'],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<eos>', pad_token='<pad>', model_max_length=64)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """(writer folder, classifier folder): a tiny random GPT-2 with sharp logits, and a tiny random BERT whose
    three labels are an NLI model's (decisive weights, so no two topics tie)."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
    folder = tmp_path_factory.mktemp('models')
    tokenizer = hf_tokenizer()
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                    bos_token_id=None, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    with torch.no_grad():
        lm.lm_head.weight.mul_(5)
    nli = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.5, id2label={0: 'entailment', 1: 'neutral', 2: 'contradiction'},
        label2id={'entailment': 0, 'neutral': 1, 'contradiction': 2}))
    for name, model in (('lm', lm), ('nli', nli)):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return folder / 'lm', folder / 'nli'


def in_process(script, *args):
    """What `python script args` does, run in this process: importing torch and transformers again would take a
    few seconds a run, the runs a fraction of a second. The module is reloaded, so every setting starts at its
    default. Returns a CompletedProcess; an exception other than exiting is not caught (a traceback)."""
    module = importlib.reload(importlib.import_module(script.removesuffix('.py')))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(list(map(str, args)))
            code = 0
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_each(commands):
    procs = [in_process(*command) for command in commands]
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    return procs


@pytest.fixture(scope='module')
def first_runs(models, tmp_path_factory, hub_offline, torch_threads_here):
    """Sampled articles from topics, greedy continuations of documents, labels of the documents, greedy articles."""
    lm, nli = models
    folder = tmp_path_factory.mktemp('corpus')
    (folder / 'topics.txt').write_text('\n'.join(TOPICS) + '\n\n', encoding='utf-8')
    docs = folder / 'docs'
    (docs / 'sub').mkdir(parents=True)
    for i in range(11):  # of several lengths, one in a subfolder; every fourth starts alike (a duplicate continuation)
        text = ' '.join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3 + 4 * i))
        (docs / ('sub' if i == 7 else '') / f'd{i:02d}.txt').write_text(text + '\n', encoding='utf-8')
    common = [f'--model={lm}', '--device=cpu', '--max_new_tokens=24', '--batch_size=4']
    procs = run_each([
        ('synthesize.py', *common, *SAMPLED, f'--topics={folder / "topics.txt"}', f'--out_dir={folder / "sampled"}'),
        ('synthesize.py', *common, f'--continue_from={docs}', f'--out_dir={folder / "continued"}',
         '--per_topic=2', '--temperature=0', '--continue_chars=30'),
        ('classify_topics.py', f'--input={docs}', f'--topics={folder / "topics.txt"}', f'--model={nli}',
         '--device=cpu', '--batch_size=4'),
        ('synthesize.py', *common, f'--topics={folder / "topics.txt"}', f'--out_dir={folder / "greedy"}',
         '--per_topic=1', '--temperature=0'),
    ])
    return folder, procs


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def greedy_alone(lm, tokenizer, prompt, keep_prompt):
    """transformers' greedy text for one prompt, without a batch: the reference for the batched, padded runs. Those
    compute the logits with other shapes, equal but for the last bits: no step here may have a near-tie."""
    inputs = tokenizer(prompt, return_tensors='pt')
    with torch.no_grad():
        out = lm.generate(**inputs, do_sample=False, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id,
                          output_logits=True, return_dict_in_generate=True)
    for step, logits in enumerate(out.logits):
        assert_no_near_tie(logits, f' ({prompt!r}, step {step})')
    out = out.sequences[0]
    return tokenizer.decode(out if keep_prompt else out[inputs['input_ids'].shape[1]:], skip_special_tokens=True).strip()


def without_duplicates(named_texts, threshold=0.5):
    """Brute force: each text against every earlier one kept, by its word list and its word 5-gram Jaccard."""
    kept = {}
    for name, text in named_texts:
        tokens = [w.lower() for w in words(text)]
        grams = set(ngrams(tokens, 5))
        if text and not any(tokens == t or g | grams and len(g & grams) / len(g | grams) >= threshold
                            for t, g in kept.values()):
            kept[name] = (tokens, grams)
    return {name: text for name, text in named_texts if name in kept}


def folder_texts(folder):
    return {p.name: p.read_bytes().decode('utf-8') for p in sorted(folder.glob('*.txt'))}  # '\r' as written


def test_articles_from_topics_go_round_by_round_with_one_seed_per_batch(models, first_runs):
    folder, procs = first_runs
    assert '9 documents from 3 topics x 3: 0 done, 9 to generate' in procs[0].stdout
    records = read_records(folder / 'sampled' / 'manifest.jsonl')
    assert records[0]['settings']['temperature'] == 1.0
    jobs = [(t, s) for s in range(3) for t in range(3)]  # sample 0 of every topic, then sample 1, ...
    assert [r['file'] for r in records[1:]] == [f'topic{t:05d}-{s:04d}.txt' for t, s in jobs]
    for i, ((t, _), r) in enumerate(zip(jobs, records[1:])):
        assert r['topic'] == TOPICS[t] and r['prompt'] == f'An encyclopedia article about {TOPICS[t]}.\n\n'
        assert r['model'] == str(models[0]) and r['seed'] == records[1 + i // 4 * 4]['seed']  # batches of 4
    assert len({r['seed'] for r in records[1:]}) == 3
    written = folder_texts(folder / 'sampled')
    assert set(written) == {r['file'] for r in records[1:] if 'dropped' not in r} and len(written) >= 7
    assert read_labels(folder / 'sampled' / 'manifest.jsonl') == {  # prepare.py --topic_labels reads a manifest
        os.path.normpath(folder / 'sampled' / name): TOPICS[int(name[5:10])] for name in written}


def test_batched_greedy_articles_are_transformers_own(models, first_runs):
    folder, _ = first_runs
    lm, tokenizer = load(models[0])
    expected = {f'topic{t:05d}-0000.txt': greedy_alone(lm, tokenizer, f'An encyclopedia article about {topic}.\n\n', False)
                for t, topic in enumerate(TOPICS)}  # prompts of different lengths: padded in the batch, not here
    assert folder_texts(folder / 'greedy') == without_duplicates(list(expected.items())) == expected


def test_batched_greedy_continuations_are_transformers_own_less_duplicates(models, first_runs):
    folder, _ = first_runs
    lm, tokenizer = load(models[0])
    sources = sorted((folder / 'docs').rglob('*.txt'))
    starts = []
    for path in sources:
        text = path.read_text(encoding='utf-8').strip()
        starts.append(text if len(text) <= 30 else text[:text.rfind(' ', 0, 31)])  # cut at a space
    texts = [greedy_alone(lm, tokenizer, start, True) for start in starts]
    jobs = [(g, s) for s in range(2) for g in range(len(sources))]
    expected = without_duplicates([(f'doc{g:05d}-{s:04d}.txt', texts[g]) for g, s in jobs])
    written = folder_texts(folder / 'continued')
    assert written == expected
    assert len(written) < len(sources)  # each sample 1 repeats its sample 0, and a few documents start alike
    records = read_records(folder / 'continued' / 'manifest.jsonl')[1:]
    assert [r['file'] for r in records] == [f'doc{g:05d}-{s:04d}.txt' for g, s in jobs]
    for (g, s), r in zip(jobs, records):
        assert r['source'] == str(sources[g].relative_to(folder / 'docs')) and r['prompt'] == starts[g]
        assert 'topic' not in r and (s == 0 or r['dropped'].startswith('duplicate of doc'))
    assert all(written[f'doc{g:05d}-0000.txt'].startswith(start) for g, start in enumerate(starts)
               if f'doc{g:05d}-0000.txt' in written)


def cut_short(log, copy, keep, edit=lambda records: None):
    """What a kill -9 leaves of a JSON-lines log (records appended and flushed one at a time): its settings and
    first keep records (edited by edit), then the next record cut short. Returns the records kept and the one cut."""
    settings, *records = read_records(log)
    edit(records)
    lines = [json.dumps(r, ensure_ascii=False) + '\n' for r in [settings, *records[:keep + 1]]]
    copy.write_text(''.join(lines[:-1]) + lines[-1][:20], encoding='utf-8')
    return records[:keep + 1]


@pytest.fixture(scope='module')
def resumed_runs(models, first_runs, tmp_path_factory, hub_offline, torch_threads_here):
    """The sampled articles and the labels as a kill mid-way leaves them, each run again to the end."""
    folder, _ = first_runs
    cut = tmp_path_factory.mktemp('cut')
    shutil.copytree(folder / 'sampled', cut / 'sampled')  # killed in batch 2 of 3
    records = cut_short(folder / 'sampled' / 'manifest.jsonl', cut / 'sampled' / 'manifest.jsonl', 5)
    for r in read_records(folder / 'sampled' / 'manifest.jsonl')[6:]:
        (cut / 'sampled' / r['file']).unlink(missing_ok=True)
    # a file written atomically whose record was not: written again (here with other text, to see that it is)
    (cut / 'sampled' / records[5]['file']).write_text('unrecorded', encoding='utf-8')
    # a document the manifest has: kept as it is (here marked, to see that it is not generated again)
    done = next(r['file'] for r in records[:5] if 'dropped' not in r)
    with open(cut / 'sampled' / done, 'a', encoding='utf-8') as f:
        f.write(' [done]')

    shutil.copytree(folder / 'docs', cut / 'docs')  # likewise marked: a document labelled is not labelled again
    cut_short(folder / 'docs' / 'topics.jsonl', cut / 'docs' / 'topics.jsonl', 5, lambda r: r[1].update(score=-1.0))

    procs = run_each([
        ('synthesize.py', f'--model={models[0]}', '--device=cpu', '--max_new_tokens=24', '--batch_size=4',
         *SAMPLED, f'--topics={folder / "topics.txt"}', f'--out_dir={cut / "sampled"}'),
        ('classify_topics.py', f'--input={cut / "docs"}', f'--topics={folder / "topics.txt"}', f'--model={models[1]}',
         '--device=cpu', '--batch_size=4'),
    ])
    return cut, procs, done


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(first_runs, resumed_runs):
    folder, _ = first_runs
    cut, resumed, done = resumed_runs
    assert '9 documents from 3 topics x 3: 5 done, 4 to generate' in resumed[0].stdout
    whole = folder_texts(folder / 'sampled')
    assert len(whole) >= 7 and len(set(whole.values())) == len(whole)  # sampled: (almost) no duplicates
    whole[done] += ' [done]'
    assert folder_texts(cut / 'sampled') == whole
    assert read_records(cut / 'sampled' / 'manifest.jsonl') == read_records(folder / 'sampled' / 'manifest.jsonl')
    assert not list((cut / 'sampled').glob('*.tmp*'))


def test_duplicates_match_a_brute_force_jaccard():
    rng = np.random.default_rng(0)
    base = [' '.join(rng.choice(WORDS, 30)) for _ in range(6)]
    texts = []
    for text in base:  # each text, an edited copy (a few words changed), and a copy in other case and spacing
        tokens = text.split()
        for i in rng.choice(len(tokens), int(rng.integers(1, 12)), replace=False):
            tokens[i] = 'changed'
        texts += [text, ' '.join(tokens), '  ' + text.upper().replace(' ', '\n ')]
    named = [(f'd{i}', t) for i, t in enumerate(texts)]
    for threshold in (0.3, 0.5, 0.8):
        duplicates, kept = Duplicates(threshold), []
        for name, text in named:
            if duplicates.find(text) is None:
                duplicates.add(text, name)
                kept.append(name)
        assert kept == list(without_duplicates(named, threshold))
    assert Duplicates(0.5).find('x') is None
    d = Duplicates(0.0)  # exact duplicates only
    d.add(base[0], 'a')
    assert d.find(base[0].upper()) == 'duplicate of a' and d.find(texts[1]) is None


def test_labels_are_the_zero_shot_pipelines_own(models, first_runs):
    from transformers import pipeline
    folder, procs = first_runs
    docs = folder / 'docs'
    classifier = pipeline('zero-shot-classification', model=str(models[1]), device='cpu')
    settings, *records = read_records(docs / 'topics.jsonl')
    assert settings['settings']['topics'] == TOPICS
    assert [r['file'] for r in records] == sorted(p.relative_to(docs).as_posix() for p in docs.rglob('*.txt'))
    for r in records:  # one document at a time, unpadded
        text = (docs / r['file']).read_text(encoding='utf-8').strip()
        reference = classifier(text, candidate_labels=TOPICS, hypothesis_template='This text is about {}.')
        # the run labelled in padded batches, other arithmetic: its scores are these but for float32 rounding, so its
        # label is this one where the best two topics are not nearly tied (this and the resumed run's test need that)
        assert reference['scores'][0] - reference['scores'][1] > 1e-4, reference
        assert r['topic'] == reference['labels'][0]
        assert r['score'] == pytest.approx(reference['scores'][0], abs=1e-5)
    counts = collections.Counter(r['topic'] for r in records)
    assert len(counts) >= 2  # the decisive random classifier tells documents apart
    assert 'documents per topic: ' + ', '.join(f'{t} {counts[t]}' for t in TOPICS) in procs[2].stdout


def test_a_labelling_killed_mid_way_labels_only_the_rest(first_runs, resumed_runs):
    folder, _ = first_runs
    cut, resumed, _ = resumed_runs
    assert '11 documents in' in resumed[1].stdout and '5 labelled already, 6 to label' in resumed[1].stdout
    whole, again = read_records(folder / 'docs' / 'topics.jsonl'), read_records(cut / 'docs' / 'topics.jsonl')
    assert again[2]['score'] == -1.0  # kept, not labelled again
    # the documents labelled again go in other batches (other padding): the same topics, as no document's best two
    # topics are nearly tied (test_labels_are_the_zero_shot_pipelines_own checks), and scores within float32 rounding
    assert [(r.get('file'), r.get('topic')) for r in again] == [(r.get('file'), r.get('topic')) for r in whole]
    assert [r['score'] for r in again[3:]] == pytest.approx([r['score'] for r in whole[3:]], abs=1e-5)


def test_prepare_keeps_at_most_max_per_topic_picked_by_seed(tmp_path):
    sizes = {'sea': 7, 'city': 3, 'music': 5, 'sport': 1, None: 2}  # None: documents without a label
    docs = tmp_path / 'docs'
    docs.mkdir()
    labels = [{'settings': {}}]
    for topic, n in sizes.items():
        for i in range(n):
            name = f'{topic or "none"}{i}.txt'
            (docs / name).write_text(f'<{topic or "none"}-{i}> ' + ' '.join(WORDS[i:i + 6]) * 3, encoding='utf-8')
            if topic:  # the labels file sits beside the folder: the files are named relative to it
                labels.append({'file': f'docs/{name}', 'topic': topic, 'score': 0.9})
    (tmp_path / 'labels.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in labels), encoding='utf-8')
    common = [f'--input={docs}', f'--topic_labels={tmp_path / "labels.jsonl"}', '--max_per_topic=3',
              '--tokenizer=char', '--val_fraction=0.3', '--num_proc=1']
    runs = run_all([('prepare.py', *common, f'--out_dir={tmp_path / out}', f'--topic_seed={seed}')
                    for out, seed in (('a', 0), ('b', 1), ('c', 0))])
    kept = {}
    for out, proc in zip('abc', runs):
        assert proc.returncode == 0, proc.stderr
        assert ('documents per topic, kept of all: city 3 of 3, music 3 of 5, sea 3 of 7, sport 1 of 1; '
                '2 without a topic, all kept') in proc.stdout
        meta = load_meta(tmp_path / out)
        tokenizer = load_tokenizer(meta['tokenizer'])
        text = ''.join(tokenizer.decode(open_split(tmp_path / out, split, meta).tolist()) for split in ('train', 'val'))
        kept[out] = re.findall(r'<(\w+)-(\d+)>', text)
        assert len(kept[out]) == len(set(kept[out])) == meta['train_documents'] + meta['val_documents']
        per_topic = collections.Counter(topic for topic, _ in kept[out])
        assert per_topic == {topic or 'none': min(n, 3) if topic else n for topic, n in sizes.items()}
    assert (tmp_path / 'a' / 'train.bin').read_bytes() == (tmp_path / 'c' / 'train.bin').read_bytes()
    assert sorted(kept['a']) == sorted(kept['c']) != sorted(kept['b'])  # the seed picks, the same way each time


def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_result(models, tmp_path, hub_offline):
    topics = tmp_path / 'topics.txt'
    topics.write_text('\n'.join(f'{w} {v}' for w, v in zip(WORDS, WORDS[3:11])), encoding='utf-8')  # 8 topics
    args = [f'--model={models[0]}', '--device=cpu', '--max_new_tokens=24', '--batch_size=4', '--per_topic=4',
            '--temperature=1.0', '--seed=3', f'--topics={topics}']
    in_process('synthesize.py', *args, f'--out_dir={tmp_path / "whole"}')
    # on the thread count of the runs in this process (torch_threads_here): sampled text is compared exactly
    killed = subprocess.Popen([sys.executable, str(ROOT / 'synthesize.py'), *args, f'--out_dir={tmp_path / "killed"}'],
                              cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / 'killed' / 'manifest.jsonl'
    while not (manifest.exists() and manifest.read_bytes().count(b'\n') >= 2):  # in batch 1 of 8
        assert killed.poll() is None, 'the run ended before it wrote a document'
        time.sleep(0.001)
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    written = len(read_records(manifest)) - 1
    assert 1 <= written < 32
    proc = in_process('synthesize.py', *args, f'--out_dir={tmp_path / "killed"}')
    assert f'32 documents from 8 topics x 4: {written} done, {32 - written} to generate' in proc.stdout
    assert folder_texts(tmp_path / 'killed') == folder_texts(tmp_path / 'whole')
    assert read_records(manifest) == read_records(tmp_path / 'whole' / 'manifest.jsonl')
    assert sorted(p.name for p in (tmp_path / 'killed').iterdir()) == sorted(p.name for p in (tmp_path / 'whole').iterdir())


def test_bad_input_gets_one_line(models, first_runs, tmp_path, hub_offline, torch_threads_here):
    folder, _ = first_runs
    docs, sampled = folder / 'docs', folder / 'sampled'
    (tmp_path / 'empty.txt').write_text('\n  \n', encoding='utf-8')
    (tmp_path / 'one.txt').write_text('music\n', encoding='utf-8')
    (tmp_path / 'other.jsonl').write_text('{"file": "elsewhere.txt", "topic": "music"}\n', encoding='utf-8')
    topics = f'--topics={folder / "topics.txt"}'
    cases = [
        (('synthesize.py', topics, f'--out_dir={tmp_path}'), 'give the model as --model'),
        (('synthesize.py', '--model=x', f'--topics={tmp_path / "empty.txt"}', f'--out_dir={tmp_path}'), 'is empty'),
        (('synthesize.py', '--model=x', f'--topics={tmp_path / "none.txt"}', f'--out_dir={tmp_path}'), 'not found'),
        (('synthesize.py', '--model=x', topics, f'--continue_from={docs}', f'--out_dir={tmp_path}'), 'one of the two'),
        (('synthesize.py', '--model=x', topics, f'--out_dir={tmp_path}', '--prompt_template=About it:'), 'no {topic}'),
        (('synthesize.py', f'--model={models[0]}', topics, f'--out_dir={sampled}', '--per_topic=3', '--temperature=0.5', '--max_new_tokens=24',
          '--top_k=50', '--seed=5'), 'was written with temperature=1.0: resume with the same settings'),
        (('classify_topics.py', f'--input={tmp_path / "none"}', topics), 'give the folder of documents'),
        (('classify_topics.py', f'--input={docs}', f'--topics={tmp_path / "one.txt"}'), 'holds one topic'),
        (('classify_topics.py', f'--input={docs}', f'--topics={tmp_path / "empty.txt"}'), 'is empty'),
        (('prepare.py', f'--input={docs}', '--max_per_topic=3'), 'needs --topic_labels'),
        (('prepare.py', f'--input={docs}', f'--topic_labels={tmp_path / "other.jsonl"}'), 'labels none of the 11 files'),
        (('prepare.py', f'--input={docs}', f'--topic_labels={tmp_path / "no.jsonl"}'), 'not found: make one with'),
    ]
    for proc, (_, fragment) in zip(run_all([command for command, _ in cases]), cases):
        assert_clean_error(proc, fragment)
    # these load transformers: in this process, where it is loaded already
    for args, fragment in [(('synthesize.py', '--model=no-such-org/no-such-model', topics, f'--out_dir={tmp_path / "o"}'),
                            "cannot load the language model 'no-such-org/no-such-model'"),
                           (('classify_topics.py', f'--input={docs}', topics, f'--model={models[0]}',
                             f'--labels={tmp_path / "labels.jsonl"}'),
                            'is not an NLI model: none of its labels (LABEL_0, LABEL_1) is entailment')]:
        proc = in_process(*args)
        assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and fragment in proc.stderr, proc.stderr
