"""Chat fine-tuning: the template and its special tokens, the loss mask, a fine-tune that learns to answer, its
resume, and sample.py --chat against a no-cache recomputation of the same conversation."""
import dataclasses
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model, read_checkpoint, save_checkpoint
from conftest import (SHARED, TINY_TEXT, TINY_TRAIN, assert_clean_error, assert_no_near_tie, final_weights, run,
                      run_all, torchrun)
from dataset import DatasetError, load_meta, open_mask, open_split, sample_windows
from model import GPT, GPTConfig
import prepare_chat
from tokenizer import CharTokenizer, TokenizerError, load_tokenizer, make_tokenizer, tokenizers_match, with_chat_template

pytestmark = pytest.mark.usefixtures('torch_threads_here')

QA = [('Romeo loves?', 'JULIET.'), ('Add 2 and 3?', '5.'), ('Best season?', 'spring.'), ('Sea colour?', 'blue.'),
      ('Verona is in?', 'Italy.')]
# TINY_TEXT's 42 characters and 20 more: 62, so the template's 4 tokens outgrow the model's 64 rows
CHARS = ''.join(sorted(set(TINY_TEXT + 'ABCDFGHKNPQVWXYZfgij')))
FINE_TUNE = [*TINY_TRAIN[:5], '--block_size=64', *TINY_TRAIN[6:], '--batch_size=16', '--warmup_iters=0',
             '--learning_rate=1e-2', '--eval_interval=40', '--plot=False']
MAX_NEW = 12  # tokens of a reply in sample.py --chat


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """A random tiny char-level model, saved as a checkpoint of ours: the model to fine-tune."""
    folder = tmp_path_factory.mktemp('base')
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=64, real_vocab_size=len(CHARS),
                          bias=False))
    save_checkpoint(folder, model, None, 0, 1e9, dataclasses.asdict(model.config), {}, CharTokenizer(CHARS).describe())
    return folder


@pytest.fixture(scope='module')
def chats(base, tmp_path_factory):
    """200 conversations of 1 to 3 of the QA turns, prepared by prepare_chat.py with the base model's tokenizer."""
    folder = tmp_path_factory.mktemp('chats')
    rng = random.Random(0)
    with open(folder / 'chats.jsonl', 'w') as f:
        for _ in range(200):
            turns = rng.sample(QA, rng.randint(1, 3))
            messages = [m for q, a in turns for m in ({'role': 'user', 'content': q}, {'role': 'assistant', 'content': a})]
            f.write(json.dumps({'messages': messages}) + '\n')
    prepare_chat.main([f'--input={folder / "chats.jsonl"}', f'--tokenizer_from={base}', f'--out_dir={folder}'])
    return folder


@pytest.fixture(scope='module')
def tuned(base, chats, tmp_path_factory):
    """Fine-tunes of base on chats: 'whole' (80 iterations), 'split' (40, then resumed to 80), 'still' (learning
    rate 0: the weights as train.py set them up)."""
    out = tmp_path_factory.mktemp('tuned')
    common = [f'--dataset={chats}', f'--init_from={base}', *FINE_TUNE]
    procs = run_all([('train.py', *common, f'--out_dir={out / "whole"}', '--max_iters=80'),
                     ('train.py', *common, f'--out_dir={out / "split"}', '--max_iters=40')])
    procs += run_all([('train.py', *common, f'--out_dir={out / "still"}', '--max_iters=1', '--eval_interval=1',
                       '--learning_rate=0', '--min_lr=0'),
                      ('train.py', f'--out_dir={out / "split"}', '--init_from=resume', '--max_iters=80')])
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    return out


def test_the_template_tokens_never_come_from_text_and_travel_in_the_description():
    base = CharTokenizer(CHARS + '<|>')
    tok = with_chat_template(base)
    user, assistant, end = (tok.marker_ids[r][0] for r in ('user', 'assistant', 'end'))
    assert (user, assistant, end) == (base.vocab_size + 1, base.vocab_size + 2, base.vocab_size + 3)
    assert max(tok.encode('<|user|>he<|end|><|assistant|>')) < base.vocab_size  # typed markers are plain text
    ids, mask = tok.render([{'role': 'user', 'content': 'he<|end|>'}, {'role': 'assistant', 'content': 'ROMEO'}])
    assert ids == [user] + base.encode('he<|end|>') + [end, assistant] + base.encode('ROMEO') + [end]
    assert mask == [0] * 12 + [1] * 6
    assert tok.decode(ids) == '<|user|>he<|end|><|end|><|assistant|>ROMEO<|end|>'
    again = load_tokenizer(json.loads(json.dumps(tok.describe())))
    assert again.render([{'role': 'user', 'content': 'he'}]) == tok.render([{'role': 'user', 'content': 'he'}])
    assert tokenizers_match(base.describe(), tok.describe(), chat=True)  # a fine-tune's dataset may add them
    assert not tokenizers_match(base.describe(), tok.describe())


def fixed_vocabularies(folder):
    """A GPT-2-like byte-level BPE built here, read as a Hugging Face tokenizer; and GPT-2's tiktoken where the
    shared cache has it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([TINY_TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=['<|endoftext|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<|endoftext|>').save_pretrained(folder)
    yield make_tokenizer('hf', name=str(folder))
    cache = SHARED / 'data' / 'tiktoken_cache'
    if cache.is_dir():
        os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(cache))
        yield make_tokenizer('tiktoken', name='gpt2')


def test_a_fixed_vocabulary_gains_no_tokens_and_ends_turns_with_its_end_of_text(tmp_path):
    """A pretrained model's vocabulary (GPT-2's, a Hugging Face one) is kept: its end-of-text ends a turn (text
    cannot forge it), the role markers are plain text."""
    for fixed in fixed_vocabularies(tmp_path):
        chat = with_chat_template(fixed)
        assert chat.vocab_size == fixed.vocab_size and chat.end_id == fixed.eot_id is not None
        ids, mask = chat.render([{'role': 'user', 'content': 'hi <|endoftext|>'}, {'role': 'assistant', 'content': 'yo'}])
        assert ids.count(fixed.eot_id) == 2 and ids[-1] == fixed.eot_id  # the two ends of turn, not the typed one
        assert chat.decode(ids) == 'User:\nhi <|endoftext|><|endoftext|>Assistant:\nyo<|endoftext|>'
        assert mask == [0] * (len(ids) - len(fixed.encode('yo')) - 1) + [1] * (len(fixed.encode('yo')) + 1)
        again = load_tokenizer(json.loads(json.dumps(chat.describe())), str(tmp_path))
        assert again.render([{'role': 'user', 'content': 'hi'}]) == chat.render([{'role': 'user', 'content': 'hi'}])
        assert tokenizers_match(fixed.describe(), chat.describe())  # nothing added: the same vocabulary


def test_prepare_chat_writes_the_template_and_the_assistant_mask(chats):
    meta = load_meta(chats)
    assert meta['chat'] and meta['vocab_size'] == len(CHARS) + 4
    first = json.loads((chats / 'chats.jsonl').read_text().splitlines()[0])['messages']
    n = len(CHARS)  # the template's ids follow the characters: system, user, assistant, end
    ids, mask = [], []
    for m in first:
        text = [CHARS.index(c) for c in m['content']]
        head = [n + 1] if m['role'] == 'user' else [n + 2]
        ids += head + text + [n + 3]
        mask += [0] * (1 + len(text) + 1) if m['role'] == 'user' else [0] + [1] * (len(text) + 1)
    found = [split for split in ('train', 'val') if list(open_split(chats, split, meta)[:len(ids)]) == ids]
    assert found, 'the first conversation starts neither split'
    assert list(open_mask(chats, found[0], meta)[:len(ids)]) == mask
    assert int(open_mask(chats, 'train', meta).sum()) == meta['assistant_tokens']['train']


def test_masked_loss_equals_a_hand_computation():
    """Targets are -1 exactly where the next token is not the assistant's, windows without any are drawn again, and
    the model's loss is the cross-entropy averaged over the assistant's positions alone."""
    data = np.arange(500, dtype=np.uint16)  # token i at offset i: a window's offset is its first token
    mask = (np.random.default_rng(1).random(500) < 0.3).astype(np.uint8)
    mask[:300] = 0  # most windows start with no assistant target: they must be drawn again
    x, y = sample_windows(data, 16, 64, np.random.default_rng(0), mask)
    assert np.array_equal(y, np.where(mask[x + 1] == 1, x + 1, -1))
    assert (y >= 0).any(axis=1).all() and x.flags['C_CONTIGUOUS'] and y.flags['C_CONTIGUOUS']  # for pinned copies
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=512))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    logits, loss = model(x, y)
    logp = logits.double().log_softmax(-1)
    picked = [-logp[b, t, y[b, t]] for b in range(64) for t in range(16) if y[b, t] >= 0]
    assert len(picked) == int((y >= 0).sum()) < 64 * 16
    assert abs(loss.item() - (sum(picked) / len(picked)).item()) < 1e-5
    assert abs(loss.item() - F.cross_entropy(logits.view(-1, 512), (x + 1).view(-1)).item()) > 1e-3
    with pytest.raises(DatasetError, match='no window of 16 tokens drawn holds an assistant token'):
        sample_windows(data, 16, 4, np.random.default_rng(0), np.zeros(500, np.uint8))


def reference_chat(model, tok, questions, room, exact=True):
    """The replies sample.py --chat should give (greedy), recomputed without a cache: the whole conversation through
    the model for every token, dropping the oldest exchanges as sample.py says it does. exact: the replies are to be
    compared with sample.py's, whose cache is other arithmetic: no step may have a near-tie."""
    user, assistant, end = tok.marker_ids['user'], tok.marker_ids['assistant'], tok.end_id
    exchanges, replies = [], []
    for question in questions:
        turn = user + tok.encode(question) + [end] + assistant
        while sum(map(len, exchanges)) + len(turn) + room > model.config.block_size:
            exchanges.pop(0)
        context, reply = [i for e in exchanges for i in e] + turn, []
        for _ in range(room):
            with torch.no_grad():
                logits = model(torch.tensor([context + reply]))[0][0, -1, :tok.vocab_size]
            if exact:
                assert_no_near_tie(logits, f' ({question!r}, token {len(reply)})')
            if int(logits.argmax()) == end:
                break
            reply.append(int(logits.argmax()))
        exchanges.append(turn + reply + [end])
        replies.append(tok.decode(reply))
    return replies


def test_a_fine_tune_answers_where_the_base_does_not_and_the_chat_equals_a_recomputation(tuned):
    questions = [q for q, _ in QA] + ['Romeo loves?', 'Best season?']  # 7 turns: the oldest are dropped on the way
    proc = run('sample.py', f'--out_dir={tuned / "whole"}', '--chat=True', '--temperature=0', '--device=cpu',
               f'--max_new_tokens={MAX_NEW}', stdin='\n'.join(questions) + '\n')
    replies = proc.stdout.splitlines()
    assert replies == [a for _, a in QA] + ['JULIET.', 'spring.'], proc.stdout
    assert 'its oldest turns are forgotten' in proc.stderr
    model, description, _ = load_model(tuned / 'whole')
    assert replies == reference_chat(model.eval(), load_tokenizer(description), questions, MAX_NEW)
    # the base before the fine-tune (learning rate 0: its weights, and rows for the template's tokens) does not answer
    before, _, _ = load_model(tuned / 'still')
    for question, answer in QA:
        reply = reference_chat(before.eval(), load_tokenizer(description), [question], len(answer) + 1, exact=False)
        assert reply != [answer]


def test_replies_cut_at_max_new_tokens_are_closed_and_a_message_too_long_is_refused(tuned):
    """The base before the fine-tune never ends its turn: each reply stops at max_new_tokens and is closed with an end
    of turn, and the conversation goes on as recomputed without a cache; a message that leaves no room for a reply
    is refused with a note, and the chat goes on."""
    questions = ['Romeo loves?', 'Sea colour? ' * 5, 'Add 2 and 3?', 'Verona is in?']
    proc = run('sample.py', f'--out_dir={tuned / "still"}', '--chat=True', '--temperature=0', '--device=cpu',
               '--max_new_tokens=5', stdin='\n'.join(questions) + '\n')
    assert 'that message has 63 tokens' in proc.stderr and 'oldest turns are forgotten' not in proc.stderr
    model, description, _ = load_model(tuned / 'still')
    expected = reference_chat(model.eval(), load_tokenizer(description), questions[:1] + questions[2:], 5)
    assert proc.stdout.splitlines() == expected and all(len(reply) == 5 for reply in expected)


def test_a_long_message_gets_the_room_it_leaves_for_its_reply(tuned):
    """A message of 38 tokens (35 characters and the template's 3) in a context of 64: the reply gets the 26 it leaves
    (at least block_size // 8 must be left), not half the context. (Before: max_new_tokens of 32 were reserved, and
    the message was refused.)"""
    message = 'Sea colour? Sea colour? Sea colour?'
    proc = run('sample.py', f'--out_dir={tuned / "whole"}', '--chat=True', '--temperature=0', '--device=cpu',
               '--max_new_tokens=32', stdin=message + '\n')
    assert 'that message has' not in proc.stderr, proc.stderr
    model, description, _ = load_model(tuned / 'whole')
    [reply] = reference_chat(model.eval(), load_tokenizer(description), [message], 64 - 38)
    assert proc.stdout.splitlines() == [reply] and reply  # it ended its turn within the room


def test_resume_of_a_chat_fine_tune_continues_exactly(tuned):
    (whole_ckpt, whole), (split_ckpt, split) = final_weights(tuned / 'whole'), final_weights(tuned / 'split')
    assert whole_ckpt['iter_num'] == split_ckpt['iter_num'] == 80
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)


def test_the_template_tokens_get_new_rows_at_the_mean_of_the_old(base, tuned):
    """62 characters and 4 template tokens outgrow the base's 64 rows: the embedding grows to 128 rows, the old
    rows stay, the new tokens start at the mean of the real tokens' rows (learning rate 0 keeps them as set up)."""
    _, old = final_weights(base)
    ckpt, new = final_weights(tuned / 'still')
    assert (ckpt['model_args']['vocab_size'], ckpt['model_args']['real_vocab_size']) == (128, len(CHARS) + 4)
    wte, before = new['transformer.wte.weight'], old['transformer.wte.weight']
    assert torch.equal(wte[:len(CHARS)], before[:len(CHARS)])
    mean = before[:len(CHARS)].mean(dim=0)  # exactly: train.py's arithmetic, on the same rows and thread count
    assert all(torch.equal(wte[len(CHARS) + i], mean) for i in range(4))


def test_gpt2_weights_fine_tune_on_conversations_in_their_own_vocabulary(chats, tmp_path, hub_offline):
    """A Hugging Face GPT-2 folder (GPT-2's case: a fixed vocabulary) is fine-tuned on conversations: its vocabulary
    gains nothing, its end-of-text ends the turns, and the fine-tune's checkpoint carries the template."""
    from test_hf import CORPUS, hf_tokenizer, save_hf_gpt2
    bpe = make_tokenizer('bpe', CORPUS, vocab_size=300)
    save_hf_gpt2(tmp_path / 'gpt2', bpe.vocab_size, hf_tokenizer(bpe))
    prepare_chat.main([f'--input={chats / "chats.jsonl"}', f'--tokenizer_from={tmp_path / "gpt2"}',
                       f'--out_dir={tmp_path / "data"}'])
    meta = load_meta(tmp_path / 'data')
    assert meta['vocab_size'] == bpe.vocab_size and meta['tokenizer']['special_tokens']['end'] == '<|endoftext|>'
    run('train.py', f'--dataset={tmp_path / "data"}', f'--init_from={tmp_path / "gpt2"}', f'--out_dir={tmp_path / "out"}',
        *FINE_TUNE, '--max_iters=2', '--eval_interval=2')
    model, description, ckpt = load_model(tmp_path / 'out')
    chat = load_tokenizer(description, str(tmp_path / 'out'))
    assert chat.end_id == bpe.eot_id and model.config.vocab_size == ckpt['model_args']['vocab_size'] == bpe.vocab_size
    ids = open_split(tmp_path / 'data', 'train', meta)
    mask = open_mask(tmp_path / 'data', 'train', meta)
    ends = mask[ids == bpe.eot_id]  # every turn's end, user and assistant turns in turn: the replies' are in the loss
    assert len(ends) > 0 and not ends[0::2].any() and ends[1::2].all()
    # exported, its plain-text roles and end-of-text turn ends render in transformers as here
    from transformers import AutoTokenizer
    run('export_hf.py', f'--out_dir={tmp_path / "out"}', f'--hf_dir={tmp_path / "hf"}')
    messages = [{'role': 'user', 'content': 'Romeo loves?'}, {'role': 'assistant', 'content': 'JULIET.'}]
    exported = AutoTokenizer.from_pretrained(tmp_path / 'hf').apply_chat_template(messages)['input_ids']
    assert list(exported) == chat.render(messages)[0]


def test_bad_conversations_and_a_model_without_a_template_give_one_line(base, chats, tmp_path, capsys):
    (tmp_path / 'bad.jsonl').write_text('{"messages": [{"role": "user", "content": "Romeo?"}]}\n[1, 2]\n')
    with pytest.raises(DatasetError, match='bad.jsonl line 2 is not a JSON object with "messages"'):
        list(prepare_chat.conversations(tmp_path / 'bad.jsonl', 'NFC'))
    with pytest.raises(TokenizerError, match="role 'bot': use system, user, assistant"):
        with_chat_template(CharTokenizer(CHARS)).render([{'role': 'bot', 'content': 'Romeo?'}])
    (tmp_path / 'char.jsonl').write_text('{"messages": [{"role": "user", "content": "Romeo?"}]}\n'
                                         '{"messages": [{"role": "user", "content": "caf\u00e9?"}]}\n')
    with pytest.raises(SystemExit) as exit:
        prepare_chat.main([f'--input={tmp_path / "char.jsonl"}', f'--tokenizer_from={base}', f'--out_dir={tmp_path / "char"}'])
    assert exit.value.code == 2 and not (tmp_path / 'char').exists()
    error = capsys.readouterr().err.strip()
    assert error.count('\n') == 0 and "char.jsonl line 2 has 1 character(s)" in error and "'é'" in error, error
    shutil.copytree(chats, tmp_path / 'no_mask')
    (tmp_path / 'no_mask' / 'val.mask.bin').unlink()
    with pytest.raises(DatasetError, match='val.mask.bin: prepare the chat dataset again'):
        open_mask(tmp_path / 'no_mask', 'val', load_meta(tmp_path / 'no_mask'))
    assert_clean_error(run('sample.py', f'--out_dir={base}', '--chat=True', '--device=cpu', check=False),
                       'is not a chat model', 'prepare_chat.py')


def test_eval_scores_a_chat_dataset_on_the_replies_alone(tuned, chats):
    """eval.py counts a chat dataset's assistant tokens only, as training does: --train_batches gives the val loss
    train.py recorded for the checkpoint, and the full pass equals a brute-force loss over the replies' tokens."""
    out = tuned / 'whole'
    like_train, full = run_all([('eval.py', f'--out_dir={out}', '--device=cpu', '--train_batches=True'),
                                ('eval.py', f'--out_dir={out}', '--device=cpu')])
    rows = [proc.stdout.strip().splitlines()[1].split() for proc in (like_train, full)]
    assert all('(replies)' in row for row in rows), rows
    # train.py's own figure (the same weights, batches, shapes and thread count), printed to 4 decimals
    assert abs(float(rows[0][-3]) - read_checkpoint(out, 'best.json')['best_val_loss']) < 5e-5

    model = load_model(out).model.eval()
    meta = load_meta(chats)
    ids, mask = np.asarray(open_split(chats, 'val', meta), dtype=np.int64), open_mask(chats, 'val', meta)
    block, total, count = model.config.block_size, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, block):
            window = torch.from_numpy(ids[s:s + block + 1])
            logp = model(window[None, :-1])[0][0].double().log_softmax(-1)
            for t in range(len(window) - 1):
                if mask[s + t + 1]:
                    total -= logp[t, window[t + 1]].item()
                    count += 1
    assert int(rows[1][-4].replace(',', '')) == count < len(ids) - 1
    assert abs(float(rows[1][-3]) - total / count) < 6e-5  # printed to 4 decimals (5e-5); float32 rounding


def test_an_exported_chat_model_chats_in_transformers_as_here(tuned, tmp_path, hub_offline):
    """export_hf.py carries the template: transformers' apply_chat_template gives our ids for a conversation (the
    markers as their own tokens), and greedy generate ends each reply at the end of turn with the reply we give."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run('export_hf.py', f'--out_dir={tuned / "whole"}', f'--hf_dir={tmp_path}')
    hf_tokenizer, hf_model = AutoTokenizer.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)
    model, description, _ = load_model(tuned / 'whole')
    tok = load_tokenizer(description)
    messages = [{'role': 'user', 'content': QA[0][0]}, {'role': 'assistant', 'content': QA[0][1]},
                {'role': 'user', 'content': QA[1][0]}]
    ours = tok.render(messages)[0] + tok.marker_ids['assistant']
    assert list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)['input_ids']) == ours
    out = hf_model.generate(torch.tensor([ours]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(ours):].tolist()
    assert out[-1] == tok.end_id and hf_tokenizer.decode(out, skip_special_tokens=True) == QA[1][1]


def test_a_chat_fine_tune_runs_in_several_processes_under_ddp_and_fsdp_alike(base, chats, tmp_path):
    """Two processes (gloo), the template's tokens growing the vocabulary first: DDP and FSDP, on the same masked
    batches, end with the same weights (to float rounding), and the grown rows are trained."""
    common = [f'--dataset={chats}', f'--init_from={base}', *FINE_TUNE, '--max_iters=6', '--eval_interval=6',
              '--gradient_accumulation_steps=2']
    for parallel in ('ddp', 'fsdp'):
        torchrun(2, 'train.py', *common, f'--out_dir={tmp_path / parallel}', f'--parallel={parallel}')
    (_, ddp), (_, fsdp) = final_weights(tmp_path / 'ddp'), final_weights(tmp_path / 'fsdp')
    assert ddp.keys() == fsdp.keys()
    for key in ddp:  # the same sums in another order (all-reduce vs reduce-scatter): equal up to float rounding
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-6, msg=key)
    rows = ddp['transformer.wte.weight'][len(CHARS):len(CHARS) + 4]
    assert rows.shape == (4, 32) and not torch.allclose(rows, rows.mean(dim=0))  # no longer all the same mean


def test_a_step_s_loss_is_the_mean_over_all_its_reply_tokens(base, chats, tmp_path):
    """Windows hold different numbers of reply tokens: the loss of an optimizer step is the mean over all of them,
    across its micro-batches and processes (a micro-batch with 3 reply tokens weighs 3/200 of one with 200, not as
    much: the gradient-accumulation bug transformers fixed in 4.46). So train.py's first gradient is the gradient
    of that mean over the windows it drew (the same seeds through dataset.sample_windows), computed here by brute
    force on one batch of them all; metrics.jsonl logs its norm."""
    meta = load_meta(chats)
    data, mask = open_split(chats, 'train', meta), open_mask(chats, 'train', meta)
    common = [f'--dataset={chats}', f'--init_from={base}', *FINE_TUNE, '--max_iters=1', '--eval_interval=1',
              '--eval_iters=1', '--grad_clip=0', '--batch_size=4', '--gradient_accumulation_steps=2']
    run('train.py', *common, f'--out_dir={tmp_path / "one"}')  # 2 micro-batches in 1 process
    torchrun(2, 'train.py', *common, f'--out_dir={tmp_path / "two"}')  # 1 micro-batch in each of 2 processes
    for name, processes in (('one', 1), ('two', 2)):
        logged = [json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()]
        grad_norm = next(r['grad_norm'] for r in logged if r['kind'] == 'step')
        windows = []
        for rank in range(processes):
            rng = np.random.default_rng(1337 + rank)  # train.py's batch sampler of each process
            windows += [sample_windows(data, 64, 4, rng, mask) for _ in range(2 // processes)]
        model = load_model(base).model
        model.grow_vocabulary(meta['vocab_size'])
        norms = []
        for weighting in ('tokens', 'micro-batches'):
            model.zero_grad()
            x, y = (torch.from_numpy(np.concatenate([w[i] for w in windows])) for i in (0, 1))
            logits, _ = model(x)
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction='none').view(y.shape)
            if weighting == 'tokens':  # every reply token of the step alike
                loss = losses.sum() / (y != -1).sum()
            else:  # the mean of each micro-batch's mean: what the logged norm must not be
                loss = sum(losses[i:i + 4].sum() / (y[i:i + 4] != -1).sum() for i in range(0, len(y), 4)) / len(windows)
            loss.backward()
            norms.append(torch.sqrt(sum(p.grad.square().sum() for p in model.parameters())).item())
        # float32 sums in other orders (micro-batches, processes): a few ulps of the norm
        assert grad_norm == pytest.approx(norms[0], rel=1e-5), (name, grad_norm, norms)
        assert abs(norms[1] - norms[0]) > 1e-3 * norms[0], (name, norms)  # the check can tell the two apart


@pytest.mark.parametrize('case, message', [
    ('input not UTF-8', "bad.jsonl line 2 is not UTF-8 (byte 89 of the line is b'\\xe1')"),
    ('out_dir a file', 'is a file: give a folder'),
    ('out_dir under /proc', 'cannot create out_dir /proc/version/chats: Not a directory'),
])
def test_prepare_chat_refuses_bad_files_and_folders_in_one_line(base, tmp_path, capsys, case, message):
    """Each a traceback before (UnicodeDecodeError, FileExistsError, NotADirectoryError)."""
    good = '{"messages": [{"role": "user", "content": "Romeo?"}, {"role": "assistant", "content": "Here."}]}\n'
    (tmp_path / 'bad.jsonl').write_bytes((good + good.replace('Here.', 'ol\u00e1')).encode('latin-1'))
    (tmp_path / 'good.jsonl').write_text(good * 20)
    (tmp_path / 'a_file').write_text('mine')
    args = {'input not UTF-8': [f'--input={tmp_path / "bad.jsonl"}', f'--out_dir={tmp_path / "out"}'],
            'out_dir a file': [f'--input={tmp_path / "good.jsonl"}', f'--out_dir={tmp_path / "a_file"}'],
            'out_dir under /proc': [f'--input={tmp_path / "good.jsonl"}', '--out_dir=/proc/version/chats']}[case]
    with pytest.raises(SystemExit) as exit:
        prepare_chat.main([*args, f'--tokenizer_from={base}'])
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and error.count('\n') == 0 and message in error, error
    assert not (tmp_path / 'out').exists() and (tmp_path / 'a_file').read_text() == 'mine'
