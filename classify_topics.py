"""
Label each document of a folder with one of a list of topics, by zero-shot classification with a natural
language inference (NLI) model: for each topic the model judges whether the document entails "This text is
about <topic>.", and the topic it finds most likely is the document's. prepare.py then caps each topic's
documents (--topic_labels, --max_per_topic), so that no topic swamps the corpus.

    python classify_topics.py --input=texts/ --topics=topics.txt                # -> texts/topics.jsonl
    python prepare.py --input=texts/ --topic_labels=texts/topics.jsonl --max_per_topic=1000

The default model, mDeBERTa-v3 trained on MNLI and XNLI, reads about 100 languages (Russian included); any
Hugging Face NLI model works by name or folder. Labels go one line per document, {"file", "topic", "score"},
flushed to disk as they come: a run stopped at any moment resumes with the documents not yet labelled.

`python classify_topics.py --help` lists every setting.
"""
import collections
import os
import time

from tqdm import tqdm

from configurator import configure, fail
from dataset import DatasetError, input_files
from topics import TopicsError, append_record, read_records, read_topics, settings_of

# -----------------------------------------------------------------------------
input = ''  # a folder of documents, one a file (as prepare.py --input reads a folder)
input_glob = '*.txt'  # which of its files to read
topics = ''  # a text file, one topic a line
model = 'MoritzLaurer/mDeBERTa-v3-base-mnli-xnli'  # a Hugging Face NLI model: a hub name or a local folder
hypothesis_template = 'This text is about {}.'  # what the document must entail, {} the topic; in the documents' language or English
labels = ''  # where the labels go (JSON lines); '' = topics.jsonl in the input folder
chars = 2000  # judge each document by its first this many characters (the model reads about 512 tokens anyway)
batch_size = 8  # documents per batch (the model reads each with every topic: batch_size x topics pairs at once)
device = 'auto'  # auto, cpu, cuda, cuda:N or mps
dtype = 'auto'  # auto (bfloat16 on recent GPUs, float32 on CPUs), float32, bfloat16 or float16
# -----------------------------------------------------------------------------


def load_classifier(device, torch_dtype):
    from transformers import pipeline
    from hf_gpt2 import quiet_transformers
    try:
        with quiet_transformers():
            classifier = pipeline('zero-shot-classification', model=model, device=device, dtype=torch_dtype)
    except Exception as e:  # OSError offline or for a wrong name, ValueError for a model of another kind, ...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        fail(f'cannot load the classifier {model!r}: {first.rstrip(".")}; models download on first use: connect '
             f'once, or give a local folder')
    if classifier.entailment_id == -1:  # the pipeline would quietly take another label for it
        names = ', '.join(map(str, classifier.model.config.label2id))
        fail(f'{model} is not an NLI model: none of its labels ({names}) is entailment; use one trained on MNLI/XNLI')
    return classifier


def main(argv=None):
    configure(globals(), argv)
    if not input or not os.path.isdir(input):
        fail(f'input={input!r}: give the folder of documents as --input=FOLDER')
    if '{}' not in hypothesis_template:
        fail(f'hypothesis_template={hypothesis_template!r} has no {{}}: put {{}} where the topic goes')
    if batch_size < 1 or chars < 1:
        fail('batch_size and chars must be at least 1')
    if not topics:
        fail('give the topics as --topics=FILE, one topic a line')
    try:
        files = input_files(input, input_glob)
        topic_list = read_topics(topics)
    except (DatasetError, TopicsError) as e:
        fail(e)
    if len(topic_list) < 2:
        fail(f'{topics} holds one topic: classifying needs two or more')
    out = labels or os.path.join(input, 'topics.jsonl')
    files = [path for path in files if os.path.abspath(path) != os.path.abspath(out)]  # (with --input_glob='*')
    settings = dict(model=model, topics=topic_list, hypothesis_template=hypothesis_template, chars=chars)
    try:
        records = settings_of(read_records(out), out, settings)
    except TopicsError as e:
        fail(e)
    folder = os.path.dirname(os.path.abspath(out))
    name = {path: os.path.relpath(path, folder).replace(os.sep, '/') for path in files}
    done = {r['file'] for r in records}
    todo = [path for path in files if name[path] not in done]
    print(f'{len(files):,} documents in {input}, {len(files) - len(todo):,} labelled already, {len(todo):,} to label '
          f'with {model}')

    if todo:
        from runtime import DTYPES, resolve_device, resolve_dtype
        try:
            device_name = resolve_device(device)
            classifier = load_classifier(device_name, DTYPES[resolve_dtype(dtype, device_name)])
        except ValueError as e:
            fail(e)
    t0 = time.time()
    try:
        with open(out, 'a', encoding='utf-8') as log, tqdm(total=len(files), initial=len(files) - len(todo),
                                                           unit='doc', desc='classifying', dynamic_ncols=True) as progress:
            if not records:
                append_record(log, {'settings': settings})
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                texts = []
                for path in batch:
                    with open(path, encoding='utf-8', errors='replace') as f:
                        texts.append(f.read(chars).strip() or ' ')  # an empty document still gets a label
                results = classifier(texts, candidate_labels=topic_list, hypothesis_template=hypothesis_template,
                                     batch_size=len(batch) * len(topic_list))
                for path, result in zip(batch, results):
                    record = {'file': name[path], 'topic': result['labels'][0], 'score': float(result['scores'][0])}
                    append_record(log, record)
                    records.append(record)
                progress.update(len(batch))
    except KeyboardInterrupt:
        fail('interrupted: the labels so far are kept; run the same command again to go on')
    present = set(name.values())  # (labels of files since removed from the folder are not counted)
    counts = collections.Counter(r['topic'] for r in records if r['file'] in present)
    print(f'labelled {len(todo):,} documents in {time.time() - t0:.1f}s; documents per topic: '
          + ', '.join(f'{topic} {counts[topic]:,}' for topic in topic_list))
    print(f'balance them: python prepare.py --input={input} --topic_labels={out} --max_per_topic=N')


if __name__ == '__main__':
    main()
