"""
Tiny Shakespeare for character-level language modelling: every character is a token.
Downloads the text to input.txt (or reads --input=PATH) and writes train.bin, val.bin (the first 90%
and last 10% of the text) and meta.json beside this file (or in --out_dir).

    python data/shakespeare_char/prepare.py
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for its modules

from configurator import configure, fail  # noqa: E402
from dataset import DatasetError, read_text, save_meta, token_dtype, write_split  # noqa: E402
from tokenizer import make_tokenizer  # noqa: E402

input = ''  # a local text file to use instead of downloading Tiny Shakespeare
encoding_errors = 'strict'  # 'replace' turns bytes that are not UTF-8 into U+FFFD instead of failing
out_dir = HERE  # where train.bin, val.bin and meta.json go
url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
configure(globals())

t0 = time.time()
try:
    text = read_text(input, url, os.path.join(out_dir, 'input.txt'), encoding_errors)
except DatasetError as e:
    fail(e)
if not text:
    fail(f'{input or "input.txt"} is empty: nothing to train on')
print(f'length of dataset in characters: {len(text):,}')
os.makedirs(out_dir, exist_ok=True)

tokenizer = make_tokenizer('char', [text])
print(f'vocab size: {tokenizer.vocab_size:,}')
n = int(0.9 * len(text))
dtype = token_dtype(tokenizer.vocab_size)
ids = {'train': tokenizer.encode(text[:n]), 'val': tokenizer.encode(text[n:])}
for split, split_ids in ids.items():
    print(f'{split} has {len(split_ids):,} tokens')
    write_split(out_dir, split, split_ids, dtype)
save_meta(out_dir, tokenizer, train_tokens=len(ids['train']), val_tokens=len(ids['val']),
          bytes_per_token=len(text.encode('utf-8')) / len(text))
print(f'wrote {out_dir}/train.bin, val.bin and meta.json in {time.time() - t0:.1f}s')
