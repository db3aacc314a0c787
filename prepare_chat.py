"""
Prepare conversations for chat fine-tuning: a JSONL file with one conversation per line, in the format Hugging Face
chat datasets use,

    {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}

(roles: system, user, assistant), rendered with the chat template of the model's own tokenizer (tokenizer.py's
ChatTokenizer) into train.bin / val.bin, with a loss mask beside each (train.mask.bin, val.mask.bin: 1 on the
assistant's tokens, the only ones the fine-tune learns to predict) and meta.json.

    python prepare_chat.py --input=chats.jsonl --tokenizer_from=out-shakespeare-char   # a checkpoint of ours
    python prepare_chat.py --input=chats.jsonl --tokenizer_from=gpt2                   # GPT-2's weights
    python train.py --dataset=chats --init_from=out-shakespeare-char --out_dir=out-chat
    python sample.py --out_dir=out-chat --chat=True

Each conversation goes to train or val by a hash of its text, so the split is the same on every run.
"""
import hashlib
import json
import os
import time

import numpy as np

from checkpoint import CheckpointError, is_hf_source, read_checkpoint
from configurator import configure, fail
from dataset import META_NAME, DatasetError, DatasetWriter, load_meta, make_dataset_folder, normalize_unicode, unicode_form
from hf_gpt2 import tokenizer_of
from tokenizer import TokenizerError, UnknownCharactersError, load_tokenizer, with_chat_template

# -----------------------------------------------------------------------------
input = ''  # a JSONL file: one {"messages": [{"role": ..., "content": ...}, ...]} per line
tokenizer_from = ''  # the model to fine-tune, whose tokenizer this must be: a checkpoint folder, a GPT-2 name, a Hugging Face GPT-2 folder (or a prepared dataset folder)
out_dir = ''  # where train.bin, val.bin, their .mask.bin and meta.json go; '' = data/<name of the input>
val_fraction = 0.1  # share of the conversations that go to val, picked by a hash of each one
normalize = 'NFC'  # Unicode normal form of the messages, as prepare.py normalises text; '' keeps them as they are
# -----------------------------------------------------------------------------


def base_tokenizer(source):
    """The tokenizer of the model to fine-tune (or of a prepared dataset). Raises TokenizerError or CheckpointError."""
    if os.path.isfile(os.path.join(source, META_NAME)):
        return load_tokenizer(load_meta(source)['tokenizer'], source)
    if is_hf_source(source):
        description = tokenizer_of(source)
        if description is None:
            raise TokenizerError(f'{source} has no tokenizer files beside its weights')
    else:
        description = read_checkpoint(source)['tokenizer']
        if description is None:
            raise TokenizerError(f'the checkpoint in {source} records no tokenizer')
    return load_tokenizer(description, source)


def conversations(path, form):
    """(line number, messages) of each conversation in the JSONL file; DatasetError on a line that is not one."""
    with open(path, 'rb') as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError as e:
                raise DatasetError(f'{path} line {number} is not UTF-8 (byte {e.start} of the line is '
                                   f'{raw[e.start:e.start + 1]!r}): convert the file to UTF-8') from None
            if not line.strip():
                continue
            try:
                messages = json.loads(line)['messages']
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DatasetError(f'{path} line {number} is not a JSON object with "messages" (a list of '
                                   f'{{"role": ..., "content": ...}})') from None
            if isinstance(messages, list):
                messages = [dict(m, content=normalize_unicode(m['content'], form))
                            if isinstance(m, dict) and isinstance(m.get('content'), str) else m for m in messages]
            yield number, messages


def in_val(messages, fraction):
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode('utf-8')).digest()
    return int.from_bytes(digest[:8], 'little') / 2**64 < fraction


def main(argv=None):
    config = configure(globals(), argv)
    if not input or not tokenizer_from:
        fail('give the conversations as --input=FILE.jsonl and the model to fine-tune as --tokenizer_from=CHECKPOINT_FOLDER (or gpt2)')
    if not os.path.isfile(input):
        fail(f'input {input} not found: give a JSONL file of conversations')
    if not 0 < val_fraction < 1:
        fail(f'val_fraction={val_fraction} must be between 0 and 1')
    try:
        form = unicode_form(normalize)
        tok = with_chat_template(base_tokenizer(tokenizer_from))
    except (DatasetError, TokenizerError, CheckpointError) as e:
        fail(e)
    t0 = time.time()
    output = out_dir or os.path.join('data', os.path.splitext(os.path.basename(input))[0])
    try:
        created = make_dataset_folder(output)
    except DatasetError as e:
        fail(e)
    count = {'train': 0, 'val': 0}
    assistant = {'train': 0, 'val': 0}
    skipped = 0  # conversations without an assistant message: nothing to learn from them
    try:
        with DatasetWriter(output, tok, masks=True) as out:
            for number, messages in conversations(input, form):
                try:
                    ids, mask = tok.render(messages)
                except UnknownCharactersError as e:  # a char vocabulary is the model's: it cannot grow
                    raise DatasetError(f"{input} line {number} has {len(e.chars)} character(s) {tokenizer_from}'s "
                                       f"vocabulary lacks: {', '.join(map(repr, e.chars[:10]))}; the model cannot "
                                       f"read them: remove them from the conversations") from None
                except TokenizerError as e:
                    raise DatasetError(f'{input} line {number}: {e}') from None
                if not any(mask):
                    skipped += 1
                    continue
                split = 'val' if in_val(messages, val_fraction) else 'train'
                out.write(split, np.asarray(ids, dtype=np.int64), mask)
                count[split] += 1
                assistant[split] += sum(mask)
            for split in count:
                if not count[split]:
                    raise DatasetError(f'{split} got no conversation ({sum(count.values())} in all): give more '
                                       f'conversations' + (', or a larger --val_fraction' if split == 'val' else ''))
            tokens = dict(out.tokens)
            meta = out.commit(train_tokens=tokens['train'], val_tokens=tokens['val'],
                              train_conversations=count['train'], val_conversations=count['val'],
                              assistant_tokens=assistant, source=input, prepare_config=config)
    except DatasetError as e:
        if created and not os.listdir(output):
            os.rmdir(output)
        fail(e)
    print(f"conversations: {count['train']:,} train, {count['val']:,} val" +
          (f'; {skipped:,} without an assistant message left out' if skipped else ''))
    print(f"tokens: {tokens['train']:,} train, {tokens['val']:,} val ({meta['dtype']}), of which the assistant's "
          f"(the loss's): {assistant['train'] / tokens['train']:.0%} of train; vocabulary {tok.vocab_size:,} "
          f"with the chat template's tokens")
    print(f'wrote {output}/train.bin, val.bin, their .mask.bin and meta.json in {time.time() - t0:.1f}s')
    name = os.path.basename(os.path.normpath(output))
    in_data = os.path.normpath(output) == os.path.join('data', name)
    print(f'fine-tune on it: python train.py --dataset={name if in_data else output} --init_from={tokenizer_from} '
          f'--out_dir=out-{name}')


if __name__ == '__main__':
    main()
