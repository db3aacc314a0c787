"""
OpenWebText (Skylion007/openwebtext on the Hugging Face hub: 8M web pages, ~40 GB of text) with GPT-2's
BPE, as in nanoGPT: about 9B train tokens, each document ended by <|endoftext|> (id 50256).

    python data/openwebtext/prepare.py              # or --num_proc=8; any prepare.py setting works here
    python train.py                                 # train.py's defaults: GPT-2 (124M) on this dataset

The repository's prepare.py does the work with the settings below: the dataset downloads to the Hugging
Face cache (~55 GB), worker processes tokenise it in parallel behind a progress bar, and the ids go to
train.bin and val.bin (~17 GB) in chunks as they come, so memory stays bounded. The text is used as it
is, duplicates included, as nanoGPT does; 0.05% of the documents go to val, picked by a hash of their
text, so the split is the same on every run.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for its modules

import prepare  # noqa: E402

SETTINGS = [
    '--hf_dataset=Skylion007/openwebtext',
    '--tokenizer=tiktoken', '--tokenizer_name=gpt2',
    '--normalize_whitespace=False', '--dedup=False',
    '--val_fraction=0.0005',
    f'--out_dir={HERE}',
]

if __name__ == '__main__':  # worker processes import this file again: they must not start over
    prepare.main(SETTINGS + sys.argv[1:])
