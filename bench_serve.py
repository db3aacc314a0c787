"""
Benchmark: serve.py with 1, 4 and 16 clients streaming completions at once, side by side in one run, on the model
size of config/shakespeare_char.py (6 layers, 6 heads, 384 wide, block 256; random weights), on CPU by default:

    python bench_serve.py
    python bench_serve.py --out_dir=out-shakespeare-char   # a trained checkpoint instead

Starts serve.py on a free port, then for each number of clients has each stream one completion of max_tokens
tokens, all at once, and prints the tokens per second summed over the clients (the tokens each client got, from
the usage the server reports, over the time until the last one finished): the median of `repeats` rounds, and the
range. The machine's load (`uptime`) is printed beside them: on a shared machine the figures move with it. Requests that arrive together are decoded
as the rows of one batch, so the sum should grow with the clients while one client's speed drops less.
"""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import torch

from checkpoint import save_checkpoint
from configurator import configure, fail
from model import GPT, GPTConfig
from tokenizer import CharTokenizer

# -----------------------------------------------------------------------------
out_dir = ''  # a checkpoint to serve; '' builds a randomly initialised model of the size below
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
clients = '1,4,16'  # the numbers of clients streaming at once, one run each
max_tokens = 200  # tokens per completion
batch_size = 16  # serve.py's rows decoded together
repeats = 3  # rounds over all the numbers of clients: each figure is the median of its rounds
threads = 0  # serve.py's --threads: torch's CPU threads, 0 its default (every core but one)
device = 'cpu'
seed = 1337
# -----------------------------------------------------------------------------
configure(globals())

counts = [int(c) for c in clients.split(',')]
folder = tempfile.mkdtemp(prefix='bench_serve_')
if not out_dir:
    # Tiny Shakespeare's 65 characters, as a tokenizer the server can decode
    chars = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                          vocab_size=len(chars), dropout=0.0))
    out_dir = os.path.join(folder, 'random')
    save_checkpoint(out_dir, model, None, 0, 1e9, dataclasses.asdict(model.config), {}, CharTokenizer(chars).describe())
server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.py'),
                           f'--out_dir={out_dir}', '--port=0', f'--batch_size={batch_size}',
                           f'--max_requests={max(counts)}', f'--max_tokens={max_tokens}', f'--device={device}',
                           f'--threads={threads}'], stdout=subprocess.PIPE, text=True)
try:
    line = server.stdout.readline()
    found = re.search(r' at (http://[\d.]+:\d+):', line)
    if not found:
        fail(f'serve.py did not start (its output is above): {line.strip()}')
    url = found.group(1)
    name = httpx.get(f'{url}/v1/models').json()['data'][0]['id']
    print(line.strip())

    def stream(i, got):
        body = {'model': name, 'prompt': '\n', 'max_tokens': max_tokens, 'temperature': 1.0, 'seed': seed + i,
                'stream': True, 'stream_options': {'include_usage': True}}
        tail = b''
        with httpx.stream('POST', f'{url}/v1/completions', json=body, timeout=600) as r:
            for chunk in r.iter_raw():  # read as it comes, parsed at the end: the clients take little of the CPU
                tail = (tail + chunk)[-1000:]
        usage = re.search(rb'"usage": (\{[^}]*\})', tail)
        got[i] = json.loads(usage.group(1))['completion_tokens']

    def run(n):
        got = [0] * n
        clients = [threading.Thread(target=stream, args=(i, got)) for i in range(n)]
        t0 = time.perf_counter()
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        return sum(got), time.perf_counter() - t0

    run(2)  # warm up
    rates = {n: [] for n in counts}
    for _ in range(repeats):  # rounds, so that a busy moment of the machine falls on every number of clients alike
        for n in counts:
            tokens, seconds = run(n)
            assert tokens == n * max_tokens, (tokens, n)  # every completion complete
            rates[n].append(tokens / seconds)
    median = {n: sorted(r)[len(r) // 2] for n, r in rates.items()}
    print(f"{'clients':>7} | {'tokens/s, summed (median; range)':>32} | {'per client':>10} | vs 1 client")
    for n in counts:
        spread = f'{median[n]:.0f} ({min(rates[n]):.0f}-{max(rates[n]):.0f})'
        print(f'{n:>7} | {spread:>32} | {median[n] / n:>10.1f} | {median[n] / median[counts[0]]:.1f}x')
    print('uptime:', subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip())
finally:
    server.terminate()
    server.wait()
    shutil.rmtree(folder, ignore_errors=True)
