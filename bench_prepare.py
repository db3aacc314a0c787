"""
How fast prepare.py is: it prepares a corpus of ~100 MB with GPT-2's BPE and, in the same run, raw tiktoken
(encode_ordinary_batch on all cores, the documents already in memory) encodes the same documents. Prints
both throughputs, their ratio (the target is >= 80%), the CPU time each took (what the ratio would be on
a machine busy with other work, where wall-clock times mislead) and prepare's peak memory.

    python bench_prepare.py                 # --mb=100 --repeats=2; a larger --mb shows memory stays flat

The corpus: paragraphs of ../shared/data's texts (English, Portuguese, Russian) drawn at random into
documents of 1 to 16 paragraphs, written as text files with a blank line between documents; without
../shared, synthetic words. prepare.py runs with its default cleaning (whitespace, duplicates).
GPT-2's files: tiktoken's cache (TIKTOKEN_CACHE_DIR, set to ../shared/data/tiktoken_cache when it exists).
"""
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from configurator import configure, fail

mb = 100.0  # corpus size in MB
repeats = 2  # runs of each, alternating; the best of each is reported
num_proc = 0  # prepare.py's worker processes; 0 = one per core
seed = 1337
configure(globals())

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
cache = os.path.join(SHARED, 'tiktoken_cache')
if os.path.isdir(cache):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', cache)
import tiktoken  # noqa: E402  (after TIKTOKEN_CACHE_DIR is set)

cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
try:
    enc = tiktoken.get_encoding('gpt2')
except Exception as e:
    fail(f'cannot load GPT-2 BPE ({str(e).splitlines()[0][:200]}): connect once, or set TIKTOKEN_CACHE_DIR')


def paragraphs():
    texts = [os.path.join(SHARED, f) for f in ('tinyshakespeare.txt', 'pt_wiki_sample.txt', 'ru_war_and_peace_1.txt')]
    if all(os.path.exists(t) for t in texts):
        found = []
        for path in texts:
            with open(path, encoding='utf-8') as f:
                found += [p.strip() for p in re.split(r"\n\s*\n", f.read()) if p.strip()]
        return found, '../shared/data texts'
    rng = np.random.default_rng(seed)
    syllables = ['ka', 'lo', 'mi', 'ne', 'ru', 'sa', 'to', 'vi', 'ção', 'при', 'вет', 'the', 'ing']
    words = [''.join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(5000)]
    return [' '.join(rng.choice(words, size=rng.integers(20, 120))) + '.' for _ in range(20000)], 'synthetic words'


def build_corpus(folder):
    """Write ~mb MB of documents; return them (as written) for the raw tiktoken run."""
    pool, source = paragraphs()
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while size < mb * 1e6:
        doc = '\n'.join(pool[i] for i in rng.integers(0, len(pool), size=rng.integers(1, 17)))
        docs.append(doc)
        size += len(doc.encode('utf-8'))
    for i in range(0, len(docs), 2000):  # files of 2,000 documents
        with open(os.path.join(folder, f'part{i // 2000:04d}.txt'), 'w', encoding='utf-8') as f:
            f.write('\n\n'.join(docs[i:i + 2000]) + '\n')
    return docs, size, source


def raw_tiktoken(docs):
    t0, cpu0 = time.time(), time.process_time()
    tokens = 0
    for i in range(0, len(docs), 1000):  # batches, so the token lists never hold the whole corpus
        tokens += sum(map(len, enc.encode_ordinary_batch(docs[i:i + 1000], num_threads=cores)))
    return time.time() - t0, time.process_time() - cpu0, tokens


def children_cpu():
    try:
        import resource
    except ImportError:  # Windows
        return float('nan')
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # prepare.py and, through it, its workers
    return usage.ru_utime + usage.ru_stime


def run_prepare(folder, out):
    cmd = [sys.executable, os.path.join(ROOT, 'prepare.py'), f'--input={folder}', '--document=paragraph',
           '--tokenizer=tiktoken', '--tokenizer_name=gpt2', f'--out_dir={out}', f'--num_proc={num_proc}']
    t0, cpu0 = time.time(), children_cpu()
    result = subprocess.run(cmd, capture_output=True, text=True)
    elapsed, cpu = time.time() - t0, children_cpu() - cpu0
    if result.returncode:
        fail(f'prepare.py failed: {result.stderr.strip().splitlines()[-1]}')
    return elapsed, cpu, result.stdout


with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, 'corpus')
    os.makedirs(corpus)
    docs, size, source = build_corpus(corpus)
    cpu = platform.processor() or platform.machine()
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    print(f'corpus: {len(docs):,} documents, {size / 1e6:.1f} MB ({source}); {cores} cores ({cpu}); '
          f'tiktoken {tiktoken.__version__}')
    times = {'raw': [], 'prepare': []}  # (wall, cpu) seconds
    for r in range(repeats):
        *seconds, raw_tokens = raw_tiktoken(docs)
        times['raw'].append(seconds)
        *seconds, log = run_prepare(corpus, os.path.join(tmp, 'out'))
        times['prepare'].append(seconds)
        for name, label in (('raw', 'raw tiktoken'), ('prepare', 'prepare.py  ')):
            wall, cpu = times[name][-1]
            print(f'run {r + 1}: {label} {size / 1e6 / wall:6.1f} MB/s ({wall:.1f}s wall, {cpu:.1f}s CPU)', flush=True)
    raw, prep = (size / 1e6 / min(wall for wall, _ in times[k]) for k in ('raw', 'prepare'))
    raw_cpu, prep_cpu = (min(cpu for _, cpu in times[k]) for k in ('raw', 'prepare'))
    print('\nprepare.py\'s summary (last run):')
    print(''.join(f'  {line}\n' for line in log.splitlines() if line.startswith(('documents', 'tokens', 'wrote'))), end='')
    print(f'\nraw tiktoken encode_ordinary_batch ({cores} threads): {raw:.1f} MB/s, {raw_tokens:,} tokens')
    print(f'prepare.py (read, clean, dedup, split, tokenise, write; {num_proc or cores} workers): {prep:.1f} MB/s')
    print(f'ratio: {prep / raw:.0%} of raw tiktoken (target >= 80%: {"met" if prep >= 0.8 * raw else "NOT met"}); '
          f'CPU time: prepare.py {prep_cpu:.1f}s, raw {raw_cpu:.1f}s ({raw_cpu / prep_cpu:.0%}: the ratio on a '
          f'machine busy with other work)')
    memory = re.search(r'peak memory (.*)', log)
    print(f'prepare.py\'s peak memory: {memory.group(1) if memory else "not measured on this platform"}')
