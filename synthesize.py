"""
Synthetic documents for a corpus, written by a larger Hugging Face language model: articles from a list of
topics, or continuations of existing documents. The output is a folder of text files that prepare.py reads.

    python synthesize.py --model=Qwen/Qwen2.5-0.5B --topics=topics.txt --out_dir=synthetic --per_topic=20
    python synthesize.py --model=ai-forever/rugpt3small_based_on_gpt2 --continue_from=texts/ --out_dir=continued
    python prepare.py --input=synthetic

Each document is one file, topic00003-0007.txt (topic 3, its sample 7; doc00003-0007.txt when continuing
documents), written atomically, and one line of manifest.jsonl (file, topic or source, prompt, model, seed),
flushed to disk: a run stopped at any moment resumes where it stopped and ends with the files of an
uninterrupted run. For that the work goes in fixed batches, each sampled with a seed of its own, so a batch
redone is the same batch; it goes round by round (sample 0 of every topic, then sample 1, ...), so a run stopped
early has every topic alike. A document that repeats an earlier one is not written (the manifest says why):
the same words up to case and spacing, or at least --near_duplicate of their word 5-grams in common.

`python synthesize.py --help` lists every setting.
"""
import collections
import hashlib
import os
import re
import time

from tqdm import tqdm

from atomic_write import atomic_write_bytes
from configurator import configure, fail
from dataset import DatasetError, input_files
from sample_quality import ngrams, words
from topics import TopicsError, append_record, read_records, read_topics, settings_of

# -----------------------------------------------------------------------------
model = ''  # a Hugging Face causal language model: a hub name or a local folder
topics = ''  # a text file, one topic a line: write articles about each
prompt_template = 'An encyclopedia article about {topic}.\n\n'  # what the model continues for each topic; the document is what it writes after it
continue_from = ''  # instead of topics: a folder of documents (*.txt) whose beginnings the model continues
continue_chars = 500  # how much of each document's beginning the model continues (cut at a space); the document written starts with it
per_topic = 10  # documents generated from each topic (or each document continued)
out_dir = ''  # the folder of documents, prepare.py's --input
max_new_tokens = 400  # length of each generated text, in the model's tokens
temperature = 0.8  # 0: greedy decoding
top_p = 0.95  # nucleus sampling: keep the most likely tokens that make up this probability (1: all)
top_k = 0  # keep only the k most likely tokens (0: all)
near_duplicate = 0.5  # drop a document sharing at least this share of its word 5-grams (Jaccard) with an earlier one; 0: exact duplicates only
batch_size = 8  # documents generated at once
seed = 1337  # each batch samples with a seed drawn from this and its number
device = 'auto'  # auto, cpu, cuda, cuda:N or mps
dtype = 'auto'  # auto (bfloat16 on recent GPUs, float32 on CPUs), float32, bfloat16 or float16
# -----------------------------------------------------------------------------

_MANIFEST = 'manifest.jsonl'
_SHINGLE = 5  # words per n-gram of the near-duplicate check


class Duplicates:
    """Finds the document a text repeats: one with the same words (case and spacing aside), or one whose word
    n-grams overlap the text's by a Jaccard similarity of at least threshold. An index from n-gram to documents
    makes each check cost what the text's n-grams share, not one comparison per document kept."""

    def __init__(self, threshold, n=_SHINGLE):
        self.threshold, self.n = threshold, n
        self.exact = {}  # hash of the text's words -> name
        self.index = collections.defaultdict(list)  # n-gram -> numbers of the documents holding it
        self.names, self.sizes = [], []

    def _words(self, text):
        return [w.lower() for w in words(text)]

    def _shingles(self, tokens):
        return {hash(gram) for gram in ngrams(tokens, self.n)}

    def find(self, text):
        """Why text is a duplicate ('duplicate of NAME', 'near-duplicate of NAME (0.62)'), or None."""
        tokens = self._words(text)
        key = hashlib.blake2b(' '.join(tokens).encode('utf-8'), digest_size=16).digest()
        if key in self.exact:
            return f'duplicate of {self.exact[key]}'
        if not self.threshold:
            return None
        shingles = self._shingles(tokens)
        shared = collections.Counter(doc for s in shingles for doc in self.index.get(s, ()))
        best = max(((common / (len(shingles) + self.sizes[doc] - common), -doc) for doc, common in shared.items()),
                   default=None)
        if best and best[0] >= self.threshold:
            return f'near-duplicate of {self.names[-best[1]]} ({best[0]:.2f})'
        return None

    def add(self, text, name):
        tokens = self._words(text)
        self.exact[hashlib.blake2b(' '.join(tokens).encode('utf-8'), digest_size=16).digest()] = name
        if self.threshold:
            shingles = self._shingles(tokens)
            for s in shingles:
                self.index[s].append(len(self.names))
            self.sizes.append(len(shingles))
            self.names.append(name)


def beginning(text, chars):
    """The first chars characters of text, cut back to the last space so no word is split."""
    if len(text) <= chars:
        return text
    cut = max(text.rfind(' ', 0, chars + 1), text.rfind('\n', 0, chars + 1))
    return text[:cut if cut > 0 else chars]


def read_prompts():
    """[(what to record: {'topic': ...} or {'source': ...}, prompt)], and the prefix of the files' names."""
    if continue_from:
        if not os.path.isdir(continue_from):
            fail(f'continue_from={continue_from!r} is not a folder: give a folder of .txt documents')
        try:
            files = input_files(continue_from, '*.txt')  # the files prepare.py would read as documents
        except DatasetError as e:
            fail(e)
        prompts = []
        for path in files:
            with open(path, encoding='utf-8', errors='replace') as f:
                text = f.read().strip()
            if text:
                prompts.append(({'source': os.path.relpath(path, continue_from)}, beginning(text, continue_chars)))
        if not prompts:
            fail(f'no document to continue in {continue_from}: it holds no non-empty .txt file')
        return prompts, 'doc'
    try:
        return [({'topic': t}, prompt_template.format(topic=t)) for t in read_topics(topics)], 'topic'
    except TopicsError as e:
        fail(e)


def check_settings():
    if not model:
        fail('give the model as --model=NAME (a Hugging Face hub name) or --model=FOLDER')
    if bool(topics) == bool(continue_from):
        fail('give --topics=FILE (one topic a line) or --continue_from=FOLDER (documents to continue), one of the two')
    if not out_dir:
        fail('give --out_dir=FOLDER: where the documents go (then: python prepare.py --input=FOLDER)')
    if topics and '{topic}' not in prompt_template:
        fail(f'prompt_template={prompt_template!r} has no {{topic}}: put {{topic}} where the topic goes')
    if per_topic < 1 or batch_size < 1 or max_new_tokens < 1 or continue_chars < 1:
        fail('per_topic, batch_size, max_new_tokens and continue_chars must be at least 1')
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or not 0 <= near_duplicate <= 1:
        fail('need temperature >= 0 (0: greedy), 0 < top_p <= 1, top_k >= 0 and 0 <= near_duplicate <= 1')


def batch_seed(k):
    # each batch's own seed, from the run's seed and the batch's number: a batch redone on resume samples the same
    return int.from_bytes(hashlib.blake2b(f'{seed}/{k}'.encode(), digest_size=8).digest(), 'little') >> 1


def load_generator(device, torch_dtype):
    """The model and its tokenizer, set up for batched generation: padded on the left, next to the text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hf_gpt2 import quiet_transformers
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(model)
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    except Exception as e:  # OSError offline or for a wrong name, ValueError for a model that does not generate, ...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        fail(f'cannot load the language model {model!r}: {first.rstrip(".")}; models download on first use: connect '
             f'once, or give a local folder')
    tokenizer.padding_side = 'left'
    if tokenizer.pad_token_id is None:  # the padding is masked out: any id serves
        tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return lm, tokenizer


def generate_batch(lm, tokenizer, prompts, device, keep_prompt):
    import torch
    inputs = tokenizer(prompts, return_tensors='pt', padding=True).to(device)
    length = inputs['input_ids'].shape[1]
    context = getattr(lm.config, 'max_position_embeddings', None)
    if context and length + max_new_tokens > context:
        fail(f'a prompt of {length} tokens and max_new_tokens={max_new_tokens} exceed the model\'s context of {context} '
             f'tokens: lower --max_new_tokens' + (' or --continue_chars' if keep_prompt else ''))
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    # a continued document keeps its beginning: decoded with the continuation, which keeps the space between them
    starts = (inputs['attention_mask'] == 0).sum(1).tolist() if keep_prompt else [length] * len(out)
    return [tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row, start in zip(out, starts)]


def resume(records, jobs, name, prompts):
    """What the manifest records is done; the documents kept so far are those later ones must not repeat."""
    recorded = {r['file']: r for r in records}
    for job in jobs:  # a changed topics file or template would mix two corpora under one set of names
        r = recorded.get(name[job])
        if r is not None and r['prompt'] != prompts[job[0]][1]:
            fail(f"{out_dir}/{_MANIFEST} has {r['file']} from the prompt {r['prompt']!r}, not {prompts[job[0]][1]!r}: "
                 f"the topics or documents changed; resume with the same ones, or use another --out_dir")
    duplicates = Duplicates(near_duplicate)
    for r in records:
        path = os.path.join(out_dir, r['file'])
        if not r.get('dropped') and os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                duplicates.add(f.read(), r['file'])
    for leftover in os.listdir(out_dir):  # the temporary file of a document whose writing a kill cut short
        if re.fullmatch(r'.+\.txt\.tmp\d+', leftover):
            os.remove(os.path.join(out_dir, leftover))
    return set(recorded), duplicates


def main(argv=None):
    config = configure(globals(), argv)
    check_settings()
    prompts, prefix = read_prompts()
    settings = {key: config[key] for key in ('model', 'max_new_tokens', 'temperature', 'top_p', 'top_k', 'seed',
                                             'near_duplicate')}
    settings.update({'continue_chars': continue_chars} if continue_from else {'prompt_template': prompt_template})
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f'out_dir {out_dir} is a file: give a folder')
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, _MANIFEST)
    try:
        records = settings_of(read_records(manifest), manifest, settings)
    except TopicsError as e:
        fail(e)

    # the work: every (prompt, sample) once, round by round, in fixed batches
    jobs = [(g, s) for s in range(per_topic) for g in range(len(prompts))]
    name = {job: f'{prefix}{job[0]:05d}-{job[1]:04d}.txt' for job in jobs}
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    done, duplicates = resume(records, jobs, name, prompts)
    todo = sum(name[job] not in done for job in jobs)

    import torch
    from runtime import DTYPES, resolve_device, resolve_dtype
    try:
        device_name = resolve_device(device)
        torch_dtype = DTYPES[resolve_dtype(dtype, device_name)]
    except ValueError as e:
        fail(e)
    print(f'{len(jobs):,} documents from {len(prompts):,} {"documents" if continue_from else "topics"} x {per_topic}: '
          f'{len(jobs) - todo:,} done, {todo:,} to generate with {model} on {device_name}')
    t0 = time.time()
    if todo:
        lm, tokenizer = load_generator(device_name, torch_dtype)
    written, dropped = 0, collections.Counter()
    try:
        with open(manifest, 'a', encoding='utf-8') as log, tqdm(total=len(jobs), initial=len(jobs) - todo, unit='doc',
                                                               desc='generating', dynamic_ncols=True) as progress:
            if not records:
                append_record(log, {'settings': settings})
            for k, batch in enumerate(batches):
                if all(name[job] in done for job in batch):
                    continue
                torch.manual_seed(batch_seed(k))
                texts = generate_batch(lm, tokenizer, [prompts[g][1] for g, _ in batch], device_name, bool(continue_from))
                for job, text in zip(batch, texts):
                    if name[job] in done:
                        continue
                    record = {'file': name[job], **prompts[job[0]][0], 'prompt': prompts[job[0]][1], 'model': model,
                              'seed': batch_seed(k)}
                    why = duplicates.find(text) if text else 'empty'
                    if why:
                        record['dropped'] = why
                        dropped[why.split(' of ')[0]] += 1
                    else:
                        atomic_write_bytes(os.path.join(out_dir, name[job]), lambda f: f.write(text.encode('utf-8')))
                        duplicates.add(text, name[job])
                        written += 1
                    append_record(log, record)  # after the file: a document in the manifest is on disk
                    done.add(name[job])
                    progress.update()
    except KeyboardInterrupt:
        fail(f'interrupted after {written:,} new documents, all kept: run the same command again to go on')
    dropped = ', '.join(f'{n} {why}s' for why, n in sorted(dropped.items())) or 'none'
    print(f'wrote {written:,} documents in {time.time() - t0:.1f}s (dropped {dropped}); {out_dir} holds '
          f'{len(duplicates.exact):,} documents')
    print(f'prepare them: python prepare.py --input={out_dir}')


if __name__ == '__main__':
    main()
