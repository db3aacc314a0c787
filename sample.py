"""
Sample from a trained model, or straight from GPT-2's weights:

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:"
    python sample.py --out_dir=out-shakespeare-char "ROMEO:"          # an argument that is no config file is the prompt
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --num_samples=1 --stop="\\n\\n"
    python sample.py --init_from=gpt2 --start="The meaning of life is" --top_p=0.9 --max_new_tokens=60
    python sample.py --init_from=gpt2 --start="The meaning of life is" --num_beams=4 --num_samples=1
    python sample.py --out_dir=out-shakespeare-char --interactive=True
    python sample.py --out_dir=out-chat --chat=True --temperature=0     # a conversation with a chat fine-tune

The first sample streams to the terminal as it is generated (but under a progress bar, which would draw over it);
all samples are generated together, as the rows of one batch. `python sample.py --help` lists every setting.
"""
import os
import re
import sys
import time

import torch

from checkpoint import CheckpointError, load_model
from configurator import configure, fail
from dataset import DatasetError, decode_utf8, normalize_unicode, unicode_form
from decoder import BatchDecoder, check_controls
from generate import generate_text, use_decoding_layout
from hf_gpt2 import HFError
from plan import decoding_peak, refusal
from runtime import autocast, resolve_device, resolve_dtype
from tokenizer import ChatTokenizer, TokenizerError, UnknownCharactersError, load_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (the checkpoint in out_dir), gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder
out_dir = 'out'  # the checkpoint folder, with init_from='resume'
checkpoint = 'best'  # of a checkpoint folder: 'best' (lowest val loss) or 'latest' (where --init_from=resume goes on)
start = '\n'  # the prompt (also --prompt=..., or an argument that is no config file); "FILE:prompt.txt" reads it from a file
num_samples = 10  # samples to draw, generated together as one batch
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 samples the model's distribution, lower is more conservative, 0 is greedy
top_k = 200  # sample only from the top_k most likely tokens; 0 for no limit
top_p = 1.0  # nucleus sampling: only from the likeliest tokens holding top_p of the probability; 1.0 for all
repetition_penalty = 1.0  # > 1 discourages tokens already in the text (1.2 is a common choice)
num_beams = 1  # > 1 for beam search (deterministic; ignores temperature, top_k and top_p)
length_penalty = 1.0  # beam search ranks beams by log-probability / length ** length_penalty
stop = ''  # end each sample just before this text, e.g. "\n\n" (escapes \n \t \\ work); several: separate by |
drop_unknown = False  # drop prompt characters the vocabulary lacks instead of stopping with an error
normalize = 'NFC'  # Unicode normal form of the prompt, as prepare.py normalises text ('e' + U+0301 is 'é'); '' keeps it as typed
encoding_errors = 'strict'  # a FILE: prompt that is not UTF-8: 'strict' stops with an error, 'replace' or 'ignore' its bad bytes
interactive = False  # read prompts from the terminal, one per line, until end of input (Ctrl-D)
chat = False  # talk with a chat fine-tune (prepare_chat.py): one message per line, each reply ends at the end-of-turn token; the conversation stays in the KV cache
progress = False  # show a progress bar (on stderr)
seed = 1337  # the same seed and settings give the same samples
device = 'auto'  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where supported, else float16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float16'
use_cache = True  # the key/value cache: identical output, much faster
compile = False  # torch.compile the one-token decoding step (CUDA graphs on a GPU; slow to start; see bench_sample.py)
# -----------------------------------------------------------------------------
configure(globals(), positional='start', aliases={'prompt': 'start'})

try:
    normalize = unicode_form(normalize)
except DatasetError as e:
    fail(e)
try:
    check_controls(temperature, top_k or None, top_p, repetition_penalty, num_beams, length_penalty,
                   max_new_tokens, num_samples)
except ValueError as e:
    fail(e)


def unescape(text):
    escapes = {'n': '\n', 't': '\t', 'r': '\r', '\\': '\\', '|': '|'}
    return re.sub(r'\\([ntr\\|])', lambda m: escapes[m.group(1)], text)


# split on the | that are not escaped, then unescape each stop string
stop_strings = [unescape(s) for s in re.split(r'(?<!\\)\|', stop)] if stop else []

try:
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
except ValueError as e:
    fail(e)
source = out_dir if init_from == 'resume' else init_from
if init_from == 'resume' and not os.path.exists(out_dir):
    fail(f'--out_dir={out_dir} does not exist: pass --out_dir=FOLDER, the out_dir of a train.py run, or '
         f'--init_from=gpt2 for GPT-2\'s weights')
try:
    model, tokenizer_description, _ = load_model(source, device, which=checkpoint)
except (CheckpointError, HFError) as e:
    fail(e)
if tokenizer_description is None:
    fail(f'{init_from} has no tokenizer (no tokenizer files beside its weights): sample from a folder that has one')
try:
    tokenizer = load_tokenizer(tokenizer_description, source)
except TokenizerError as e:
    fail(e)
model.eval()
use_decoding_layout(model)  # faster one-token steps on a CPU, the same results to float rounding
torch.manual_seed(seed)  # after loading: the samples depend on the seed, not on how the model was built
# mixed precision as in training: float32 weights (and rotary tables), matmuls in bfloat16/float16
ctx = autocast(device, dtype)
block_size = model.config.block_size


def encode_text(text):
    """The ids of a prompt or chat message; bad input ends the program with one line."""
    text = normalize_unicode(text, normalize)
    try:
        ids = tokenizer.encode(text)
    except UnknownCharactersError as e:
        if not drop_unknown:
            fail(e)
        print(f"note: dropped {len(e.chars)} character(s) the vocabulary lacks: {', '.join(map(repr, e.chars[:10]))}",
              file=sys.stderr)
        ids = tokenizer.encode(tokenizer.drop_unknown(text))
    words = tokenizer.unknown_words(text)  # a word tokenizer turns them into '<unk>'
    if words:
        if not drop_unknown:
            fail(f"{len(words)} word(s) not in the vocabulary: {', '.join(map(repr, words[:10]))}; "
                 f"pass --drop_unknown=True to drop them")
        print(f"note: dropped {len(words)} word(s) the vocabulary lacks: {', '.join(map(repr, words[:10]))}",
              file=sys.stderr)
        ids = [i for i in ids if i != tokenizer.unk_id]
    too_big = [i for i in ids if i >= model.config.vocab_size]
    if too_big:
        fail(f'token id {too_big[0]} of the prompt is outside the model\'s vocabulary of {model.config.vocab_size}: '
             f'the tokenizer does not belong to this model')
    return ids


def encode_prompt(text):
    """The prompt's token ids; bad input ends the program with one line."""
    ids = encode_text(text)
    if not ids:
        if tokenizer.eot_id is None:
            fail('the prompt is empty: pass --start="some text"')
        ids = [tokenizer.eot_id]  # GPT-2's way to start from nothing: a fresh document
    if len(ids) > block_size:
        print(f'note: the prompt has {len(ids)} tokens, more than the model\'s block_size of {block_size}: '
              f'only its last {block_size} are used', file=sys.stderr)
    return ids


def refuse_what_cannot_fit(ids):
    """One line, before anything is allocated for them, where the samples asked need more memory than is free
    (plan.py's estimate: the KV cache and the logits grow with num_samples)."""
    rows = num_beams if num_beams > 1 else num_samples
    need = decoding_peak(model.config, rows, min(len(ids), block_size), max_new_tokens, use_cache, dtype)
    line = refusal(need, device, f'sampling {rows:,} {"beams" if num_beams > 1 else "rows"} of {max_new_tokens:,} tokens')
    if line:
        fail(f'{line}: ask for fewer --num_samples (or --num_beams) or --max_new_tokens')


def run(prompt_text):
    ids = encode_prompt(prompt_text)
    refuse_what_cannot_fit(ids)
    shown = tokenizer.decode(ids) if ids != [tokenizer.eot_id] else ''

    def stream(row, text):
        if row == 0:
            print(text, end='', flush=True)

    # a progress bar on a terminal redraws its line, where streamed text would be drawn over: then the first sample
    # is printed whole once the bar is gone, like the others
    streaming = not (progress and sys.stderr.isatty())
    t0 = time.time()
    if streaming:
        print(shown, end='', flush=True)
    with ctx:
        completions = generate_text(model, tokenizer, ids, num_samples, max_new_tokens, temperature, top_k or None,
                                    top_p, repetition_penalty, num_beams, length_penalty, stop_strings, use_cache,
                                    on_text=stream if streaming else None, progress=progress, seed=seed,
                                    compile=compile)
    if streaming:
        print('\n---------------')
    for completion in completions[1:] if streaming else completions:
        print(shown + completion)
        print('---------------')
    if progress:
        print(f'{num_samples} x {max_new_tokens} tokens in {time.time() - t0:.1f}s', file=sys.stderr)


if start.startswith('FILE:'):
    path = start[5:]
    if not os.path.isfile(path):
        fail(f'prompt file {path} not found')
    with open(path, 'rb') as f:
        try:
            start = decode_utf8(f.read(), path, encoding_errors)
        except DatasetError as e:
            fail(e)

def input_lines(intro, prompt):
    """The lines typed (or piped) in, unescaped, until end of input (Ctrl-D) or Ctrl-C. The intro and the prompts go
    to stderr: stdout holds only what the model writes."""
    print(intro, file=sys.stderr)
    while True:
        print(prompt, end='', file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ''
        if not line:  # end of input
            print(file=sys.stderr)
            return
        yield unescape(line.rstrip('\n'))


def chat_loop():
    """A conversation: each line of input is a user turn, appended to the one KV cache the whole conversation is in
    (only its new tokens go through the model), and the reply runs to the end-of-turn token (or max_new_tokens,
    whose reply is then closed with one). The room kept for a reply is max_new_tokens, at most half the context and
    what the message leaves of it; a message leaving less than block_size // 8 is refused. Once a turn and the room for
    its reply no longer fit block_size, the oldest exchanges are dropped and what is left is fed again, as a new
    cache."""
    if not isinstance(tokenizer, ChatTokenizer):
        fail(f'{source} is not a chat model (its tokenizer has no chat template): fine-tune it on conversations '
             f'prepared by prepare_chat.py first')
    # the least room a message must leave for its reply; beyond it the reply gets what the message leaves, up to
    # max_new_tokens and half the context (older exchanges are dropped to make that room)
    least = max(1, min(max_new_tokens, block_size // 8))
    exchanges = []  # token ids of each user turn and its reply, as fed to the model
    decoder = None
    for message in input_lines('chat: type a message and press Enter; end with Ctrl-D', 'you> '):
        turn = (tokenizer.marker_ids['user'] + encode_text(message) + [tokenizer.end_id]
                + tokenizer.marker_ids['assistant'])
        room = min(max_new_tokens, block_size // 2, block_size - len(turn))  # kept free for the reply
        if room < least:
            print(f"note: that message has {len(turn)} tokens (with the chat template's): the model's context of "
                  f'{block_size} must keep {least} for a reply, so at most {block_size - least} fit; say it in fewer '
                  f'words', file=sys.stderr)
            continue
        if sum(map(len, exchanges)) + len(turn) + room > block_size:
            while sum(map(len, exchanges)) + len(turn) + room > block_size:
                exchanges.pop(0)
            print(f"note: the conversation outgrew the model's context of {block_size} tokens: its oldest turns are "
                  f'forgotten', file=sys.stderr)
            decoder = None
        if decoder is None:
            ids = [i for exchange in exchanges for i in exchange] + turn
            decoder = BatchDecoder(model, 1, tokenizer.vocab_size, use_cache=use_cache, compile=compile)
            # the end of turn is the chat loop's to see: the conversation's row never leaves the decoder by itself
            decoder.add(ids, block_size * 1000, temperature, top_k or None, top_p, repetition_penalty, seed=seed)
        else:
            decoder.append([turn])
        reply, shown, decode = [], 0, tokenizer.decode
        with ctx:
            for _ in range(max_new_tokens):
                token = decoder.step()[0].token
                if token == tokenizer.end_id:
                    break
                reply.append(token)
                text = tokenizer.decode_complete(reply)  # a character cut in two: wait for the rest
                print(text[shown:], end='', flush=True)
                shown = len(text)
            else:  # no end of turn within max_new_tokens: close the turn, as training's conversations are
                decoder.append([[tokenizer.end_id]])
                decode = tokenizer.decode_complete  # without a character max_new_tokens cut in two
        print(decode(reply)[shown:], flush=True)
        exchanges.append(turn + reply + [tokenizer.end_id])


if chat:
    chat_loop()
elif interactive:
    for prompt in input_lines('type a prompt and press Enter; end with Ctrl-D', '> '):
        run(prompt)
else:
    run(start)
