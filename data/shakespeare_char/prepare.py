"""
Tiny Shakespeare for character-level language modelling: every character is a token.
Reads the text from input.txt in the output folder, which is this file's folder unless --out_dir says
otherwise; the repository ships Tiny Shakespeare there (1,115,394 characters, public domain), and a missing
input.txt is downloaded first. --input=PATH reads another text instead. Writes train.bin, val.bin (the first
90% and last 10% of the text) and meta.json to the output folder.

    python data/shakespeare_char/prepare.py
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for its modules

from configurator import configure, fail  # noqa: E402
from dataset import DatasetError, read_text, write_text_dataset  # noqa: E402
from tokenizer import make_tokenizer  # noqa: E402

input = ''  # a local text file to use instead of Tiny Shakespeare
encoding_errors = 'strict'  # 'replace' turns bytes that are not UTF-8 into U+FFFD instead of failing
out_dir = HERE  # where train.bin, val.bin and meta.json go
url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
configure(globals())

t0 = time.time()
try:
    text = read_text(input, url, os.path.join(out_dir, 'input.txt'), encoding_errors)
except DatasetError as e:
    fail(e)
print(f'length of dataset in characters: {len(text):,}')

tokenizer = make_tokenizer('char', [text])
print(f'vocab size: {tokenizer.vocab_size:,}')
try:
    write_text_dataset(out_dir, tokenizer, text)
except DatasetError as e:
    fail(e)
print(f'wrote {out_dir}/train.bin, val.bin and meta.json in {time.time() - t0:.1f}s')
