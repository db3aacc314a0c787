"""
Benchmark: decoding against the machine's limit, side by side in one run, on the model size of
config/shakespeare_char.py (6 layers, 6 heads, 384 wide, block 256), greedy, on CPU by default:

    python bench_sample.py                       # 65-token vocabulary (Tiny Shakespeare's characters)
    python bench_sample.py --vocab_size=50257    # GPT-2's vocabulary
    python bench_sample.py --out_dir=out-shakespeare-char   # a trained checkpoint instead of random weights

For each thread count (--threads, '1,0' by default: one thread, then torch's default) it prints:
- the bound: a batch-1 step reads every weight once, so tokens/s cannot beat the read bandwidth (measured here by a
  matrix-vector product over as many bytes as the weights, at the same thread count) divided by the weights' bytes
- decoder.BatchDecoder at batch 1, eager and compiled (torch.compile, its compile time left out), against that bound,
  and transformers' generate (its cache on) on the same weights, exported: tokens/s and whether the tokens agree
- the KV cache against no cache over 1,000 tokens (past block_size: the sliding window is measured too)
- throughput at batch 1, 4, 16 and 64 of different prompts, and 16 rows of one prompt, with the speed-up over batch 1
"""
import time

import torch

from checkpoint import CheckpointError, load_model
from configurator import configure, fail
from decoder import BatchDecoder
from generate import use_decoding_layout
from hf_gpt2 import HFError, architecture_for, hf_model_for
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = ''  # a checkpoint to benchmark; '' builds a randomly initialised model of the size below
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
vocab_size = 65  # Tiny Shakespeare's characters; 50257 for GPT-2's
max_new_tokens = 1000  # tokens of the cache / no-cache comparison (past block_size)
batch_tokens = 200  # new tokens per row of the batch-1 and batch rows (within block_size, as transformers needs)
batches = '1,4,16,64'  # batch sizes of the throughput rows
threads = '1,0'  # thread counts to measure at, in turn; 0 is torch's default
compile = True  # also measure the compiled step (slow to start: each batch size compiles its graphs)
transformers = True  # also measure transformers' generate on the same weights
device = 'cpu'
seed = 1337
# -----------------------------------------------------------------------------
configure(globals())

torch.manual_seed(seed)
default_threads = torch.get_num_threads()
if out_dir:
    try:
        model = load_model(out_dir, device).model
    except (CheckpointError, HFError) as e:
        fail(e)
else:
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                          vocab_size=vocab_size, dropout=0.0)).to(device)
model.eval()
config = model.config
real_vocab = config.real_vocab_size or config.vocab_size
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
theirs = None
if transformers:
    try:
        theirs = hf_model_for(model, real_vocab, None, architecture_for(config)).to(device).eval()
    except HFError as e:
        print(f'note: no transformers comparison: {e}')
use_decoding_layout(model)  # as sample.py runs it
print(f'model: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, block {config.block_size}, '
      f'vocab {real_vocab}, {weight_bytes / 1e6:.1f} MB of weights; {device}')
gen = torch.Generator().manual_seed(seed)
prompts = [torch.randint(0, real_vocab, (1 + int(torch.randint(0, 32, (), generator=gen)),), generator=gen).tolist()
           for _ in range(max(int(b) for b in batches.split(',')))]  # different prompts of 1 to 32 tokens


def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def read_bandwidth():
    """Bytes per second of a matrix-vector product over as many float32 bytes as the weights: a read of all of them."""
    matrix = torch.randn(max(1, weight_bytes // 4 // 1024), 1024, device=device)
    vector = torch.randn(1024, device=device)
    for _ in range(3):
        matrix @ vector
    sync()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        matrix @ vector
    sync()
    return n * matrix.numel() * 4 / (time.perf_counter() - t0)


def decode(rows, new_tokens, use_cache=True, compiled=False):
    """Greedy tokens of each prompt in rows, decoded together; returns (tokens per row, seconds)."""
    decoder = BatchDecoder(model, len(rows), real_vocab, use_cache=use_cache, compile=compiled)
    ids = [decoder.add(prompt, new_tokens, temperature=0) for prompt in rows]
    out = {i: [] for i in ids}
    sync()
    t0 = time.perf_counter()
    while decoder.rows:
        for step in decoder.step():
            out[step.row].append(step.token)
    sync()
    return [out[i] for i in ids], time.perf_counter() - t0


def warm(rows, compiled):
    """Run the step once at each attention span the timed run will use (a compiled step: its graphs compile here)."""
    decode(rows, min(batch_tokens, config.block_size - 33), compiled=compiled)


def transformers_decode(prompt, new_tokens):
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        theirs.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
        sync()
        t0 = time.perf_counter()
        out = theirs.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, use_cache=True)
        sync()
    return out[0, len(prompt):].tolist(), time.perf_counter() - t0


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


for count in [int(t) for t in threads.split(',')]:
    torch.set_num_threads(count or default_threads)
    print(f'\n== {torch.get_num_threads()} thread(s)')
    bandwidth = read_bandwidth()
    bound = bandwidth / weight_bytes
    print(f'{"read bandwidth":<44} {bandwidth / 1e9:8.1f} GB/s: a batch-1 step cannot beat {bound:,.0f} tokens/s')
    one = [prompts[0]]
    warm(one, False)
    (ours,), seconds = decode(one, batch_tokens)
    eager = batch_tokens / seconds
    print(f'{"batch 1, eager":<44} {eager:8,.0f} tokens/s  {eager / bound:4.0%} of the bound')
    if compile:
        warm(one, True)
        (compiled,), seconds = decode(one, batch_tokens, compiled=True)
        rate = compiled_rate = batch_tokens / seconds
        same = first_difference(ours, compiled)
        print(f'{"batch 1, compiled":<44} {rate:8,.0f} tokens/s  {rate / bound:4.0%} of the bound, '
              f'{rate / eager:.2f}x eager; same tokens: {"yes" if same is None else f"no, from token {same}"}')
    if theirs is not None:
        tokens, seconds = transformers_decode(prompts[0], batch_tokens)
        rate = batch_tokens / seconds
        same = first_difference(ours, tokens)
        print(f'{"transformers generate, batch 1 (cache on)":<44} {rate:8,.0f} tokens/s  {rate / bound:4.0%} of the '
              f'bound; ours is {eager / rate:.2f}x; same tokens: {"yes" if same is None else f"no, from token {same}"}')
    (cached,), cache_seconds = decode(one, max_new_tokens)
    (plain,), plain_seconds = decode(one, max_new_tokens, use_cache=False)
    same = first_difference(cached, plain)
    print(f'{f"{max_new_tokens:,} tokens with the cache / without":<44} {max_new_tokens / cache_seconds:8,.0f} / '
          f'{max_new_tokens / plain_seconds:,.0f} tokens/s: {plain_seconds / cache_seconds:.1f}x with the cache; '
          f'same tokens: {"yes" if same is None else f"no, from token {same}"}')
    if same is not None:
        fail(f'the cache changed the output, first at token {same}')
    rows_measured = [(f'batch {b}, different prompts', prompts[:b]) for b in (int(x) for x in batches.split(','))]
    rows_measured.append(('batch 16, one prompt 16 times', [prompts[0]] * 16))
    for label, rows in rows_measured:
        for compiled in ([False, True] if compile else [False]):
            warm(rows, compiled)
            _, seconds = decode(rows, batch_tokens, compiled=compiled)
            rate = len(rows) * batch_tokens / seconds
            base = compiled_rate if compiled else eager
            name = f'{label}, {"compiled" if compiled else "eager"}'
            print(f'{name:<44} {rate:8,.0f} tokens/s  {rate / base:4.1f}x batch 1')
