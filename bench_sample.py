"""
Benchmark: generation with and without the key/value cache, side by side in one run, on the model size of
config/shakespeare_char.py (6 layers, 6 heads, 384 wide, block 256), greedy, on CPU by default:

    python bench_sample.py
    python bench_sample.py --out_dir=out-shakespeare-char   # a trained checkpoint instead of random weights

Prints tokens per second for each and checks that both produce the same tokens. 1,000 tokens are well past
block_size, so the sliding window (generate.Decoder) is part of what is measured.
"""
import time

import torch

from checkpoint import CheckpointError, load_model
from configurator import configure, fail
from generate import generate_tokens, use_decoding_layout
from hf_gpt2 import HFError
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = ''  # a checkpoint to benchmark; '' builds a randomly initialised model of the size below
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
vocab_size = 65  # Tiny Shakespeare's characters
max_new_tokens = 1000  # tokens generated per run
prompt_tokens = 1  # length of the (random) prompt
device = 'cpu'
threads = 0  # CPU threads for torch, 0 leaves torch's default
seed = 1337
# -----------------------------------------------------------------------------
configure(globals())

torch.manual_seed(seed)
if threads:
    torch.set_num_threads(threads)
if out_dir:
    try:
        model = load_model(out_dir, device).model
    except (CheckpointError, HFError) as e:
        fail(e)
else:
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                          vocab_size=vocab_size, dropout=0.0)).to(device)
use_decoding_layout(model.eval())  # as sample.py runs it
config = model.config
print(f'model: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, block {config.block_size}, '
      f'vocab {config.vocab_size}, {model.get_num_params() / 1e6:.2f}M parameters; {device}, '
      f'{torch.get_num_threads()} threads')
prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), device=device)


def run(use_cache):
    tokens = []
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for token in generate_tokens(model, prompt, max_new_tokens, temperature=0, use_cache=use_cache):
        tokens.append(token)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return torch.cat(tokens).tolist(), time.perf_counter() - t0


list(generate_tokens(model, prompt, 20, temperature=0))  # warm up
results = {}
for use_cache in (True, False):
    tokens, seconds = run(use_cache)
    results[use_cache] = tokens
    print(f"{'with cache' if use_cache else 'no cache':>10}: {max_new_tokens} tokens in {seconds:6.2f}s, "
          f"{max_new_tokens / seconds:8.1f} tokens/s")
    if use_cache:
        cache_seconds = seconds
    else:
        print(f'speed-up with the cache: {seconds / cache_seconds:.1f}x')
same = results[True] == results[False]
print(f"greedy tokens identical with and without the cache: {'yes' if same else 'NO'}")
if not same:
    first = next(i for i, (a, b) in enumerate(zip(results[True], results[False])) if a != b)
    fail(f'the cache changed the output, first at token {first}')
