"""
Tiny Shakespeare with GPT-2's BPE (tiktoken), as in nanoGPT: 301,966 train and 36,059 val tokens.
Reads the text that ships in ../shakespeare_char/input.txt (the same corpus; downloaded there first if it
is missing), or --input=PATH, and writes train.bin, val.bin (the first 90% and last 10% of the text) and
meta.json beside this file (or in --out_dir).

    python data/shakespeare/prepare.py
    python train.py --dataset=shakespeare ...

GPT-2's BPE files are downloaded on first use; offline, point TIKTOKEN_CACHE_DIR at a folder holding them.
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(os.path.dirname(HERE), 'shakespeare_char', 'input.txt')  # Tiny Shakespeare, in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for its modules

from configurator import configure, fail  # noqa: E402
from dataset import DatasetError, read_text, write_text_dataset  # noqa: E402
from tokenizer import TokenizerError, make_tokenizer  # noqa: E402

input = ''  # a local text file to use instead of Tiny Shakespeare
encoding_errors = 'strict'  # 'replace' turns bytes that are not UTF-8 into U+FFFD instead of failing
out_dir = HERE  # where train.bin, val.bin and meta.json go
url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
configure(globals())

t0 = time.time()
try:
    tokenizer = make_tokenizer('tiktoken', name='gpt2')  # before the download: fail fast offline
    text = read_text(input, url, SHIPPED, encoding_errors)
except (DatasetError, TokenizerError) as e:
    fail(e)
print(f'length of dataset in characters: {len(text):,}')

try:
    write_text_dataset(out_dir, tokenizer, text)
except DatasetError as e:
    fail(e)
print(f'wrote {out_dir}/train.bin, val.bin and meta.json in {time.time() - t0:.1f}s')
