"""The batched decoder (decoder.BatchDecoder) against a brute-force reference: every row of a batch of different
prompts, lengths, settings and seeds, joining and leaving while it runs, gets the tokens a plain forward pass over
its own window, sampled with its own random stream, gives it alone."""
import pytest
import torch
from torch.nn import functional as F

from conftest import assert_no_near_tie, run, sharp_gpt
from decoder import BatchDecoder, BatchFull, penalise_repetition, sample_token
from model import GPT, GPTConfig

BLOCK = 16
VOCAB = 40
pytestmark = pytest.mark.usefixtures('torch_threads_here')


def tiny_gpt(**overrides):
    return sharp_gpt(BLOCK, VOCAB, **overrides)


@torch.no_grad()
def alone(model, prompt, new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, seed=None,
          eot_id=None, vocab_size=None):
    """The reference: one row, a plain forward pass over its whole window for every token (the window rule of
    decoder.BatchDecoder: a prompt keeps its last block_size tokens; a full window jumps to the newest half block),
    the row's own generator seeded with seed."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens, start, out = list(prompt), max(0, len(prompt) - BLOCK), []
    for _ in range(new_tokens):
        if len(tokens) - start > BLOCK:
            start = len(tokens) - BLOCK // 2
        logits = model(torch.tensor([tokens[start:]]))[0][:, -1].float()
        if vocab_size is not None:
            logits[:, vocab_size:] = -float('inf')
        if temperature == 0 and repetition_penalty == 1.0:
            assert_no_near_tie(logits)  # the batch's arithmetic differs: equal greedy tokens need a clear winner
        logits = penalise_repetition(logits, torch.tensor([tokens]), repetition_penalty)
        token = sample_token(logits, temperature, top_k, top_p, generator).item()
        tokens.append(token)
        out.append(token)
        if token == eot_id:
            break
    return out


ROWS = [  # prompt length, new tokens, settings: greedy, sampled with each control, a penalty, a long prompt, an end
    (1, 40, dict(temperature=0)),
    (3, 12, dict(temperature=1.0, top_k=5, seed=11)),
    (9, 30, dict(temperature=0.8, top_p=0.9, seed=12)),
    (24, 20, dict(temperature=0, repetition_penalty=1.5)),  # longer than block_size: its last 16 tokens
    (5, 25, dict(temperature=1.3, seed=13, eot_id=7)),
    (2, 35, dict(temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=14)),
]


@pytest.mark.parametrize('overrides', [dict(), dict(position='rotary', norm='rmsnorm', qk_norm=True, bias=False)],
                         ids=['learned', 'rotary'])
def test_each_row_gets_the_tokens_it_gets_alone_while_rows_join_and_leave(overrides):
    model = tiny_gpt(**overrides)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n, _, _ in ROWS]
    expected = [alone(model, p, n, vocab_size=VOCAB - 3, **settings) for p, (_, n, settings) in zip(prompts, ROWS)]
    # a batch of 3 rows for 6 requests: the first 3 join at once, each other joins when a row leaves, mid-run
    decoder = BatchDecoder(model, max_rows=3, vocab_size=VOCAB - 3)
    got, waiting, which = {}, list(range(len(ROWS))), {}
    steps = 0
    while waiting or decoder.rows:
        while waiting and decoder.free_rows:
            i = waiting.pop(0)
            which[decoder.add(prompts[i], ROWS[i][1], **ROWS[i][2])] = i
            got[i] = []
        if waiting:
            with pytest.raises(BatchFull):
                decoder.add(prompts[0], 1)
        for step in decoder.step():
            got[which[step.row]].append(step.token)
            assert step.finished == (len(got[which[step.row]]) == len(expected[which[step.row]]))
        steps += 1
    # exactly: the batch's logits are a few ulps from the reference's (other matrix shapes, a cached attention); the
    # greedy rows were checked free of near-ties, and the sampled rows draw from sharp distributions (the head x20),
    # where a few ulps move a draw only with a vanishing chance
    for i in range(len(ROWS)):
        assert got[i] == expected[i], f'row {i} ({ROWS[i]})'
    assert expected[4][-1] == 7 and len(expected[4]) < ROWS[4][1]  # the row with an end-of-text ended early
    assert steps < sum(n for _, n, _ in ROWS)  # rows were decoded together


def test_cancelled_rows_leave_and_the_others_go_on_unchanged():
    model = tiny_gpt()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    expected = [alone(model, p, 30, temperature=0) for p in prompts]
    decoder = BatchDecoder(model, max_rows=3)
    rows = [decoder.add(p, 30, temperature=0) for p in prompts]
    got = {row: [] for row in rows}
    for n in range(30):
        if n == 5:
            decoder.cancel(rows[0])  # the first slot leaves: the last row moves into it
            decoder.cancel(12345)  # an unknown row: nothing happens
        for step in decoder.step():
            got[step.row].append(step.token)
    assert got[rows[0]] == expected[0][:5]
    assert got[rows[1]] == expected[1] and got[rows[2]] == expected[2]
    assert decoder.rows == [] and decoder.free_rows == 3


def test_log_probabilities_are_those_of_a_plain_forward_pass():
    model = tiny_gpt()
    prompt = [3, 1, 4, 1, 5]
    decoder = BatchDecoder(model, max_rows=2)
    row = decoder.add(prompt, 6, temperature=1.0, seed=5, logprobs=3)
    decoder.add([2, 7], 6, temperature=0)  # a row without logprobs beside it
    tokens = list(prompt)
    while decoder.rows:
        for step in decoder.step():
            if step.row != row:
                assert step.logprob is None and step.top is None
                continue
            with torch.no_grad():
                reference = F.log_softmax(model(torch.tensor([tokens]))[0][0, -1].float(), dim=-1)
            # the cache's attention and the full pass sum in another order: a few ulps
            torch.testing.assert_close(torch.tensor(step.logprob), reference[step.token], atol=1e-5, rtol=1e-5)
            values, ids = reference.topk(3)
            assert [t for t, _ in step.top] == ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in step.top]), values, atol=1e-5, rtol=1e-5)
            tokens.append(step.token)


def test_bad_settings_are_refused_in_one_line():
    decoder = BatchDecoder(tiny_gpt(), max_rows=1)
    for kwargs, words in ((dict(temperature=-1), 'temperature'), (dict(top_p=0), 'top_p'),
                          (dict(repetition_penalty=0), 'repetition_penalty')):
        with pytest.raises(ValueError, match=words):
            decoder.add([1], 5, **kwargs)
    with pytest.raises(ValueError, match='empty'):
        decoder.add([], 5)


def test_sample_py_gives_sample_i_the_seed_plus_i_stream(tmp_path):
    """sample.py's samples decode together, each from its own stream: the third of --num_samples=3 --seed=5 is the
    one sample of --seed=7."""
    from checkpoint import save_checkpoint
    from tokenizer import make_tokenizer
    tokenizer = make_tokenizer('char', 'abcdefghijklmnopqrstuvwxyz ,.')
    # sharp distributions: the batch of three and the single row multiply matrices of other shapes, logits a few ulps
    # apart, and a draw from flat ones could land on the other side of a boundary on another CPU
    model = sharp_gpt(BLOCK, 64)
    args = dict(vars(model.config))
    save_checkpoint(tmp_path, model, None, 1, 0.0, args, {}, tokenizer.describe())
    common = (f'--out_dir={tmp_path}', '--device=cpu', '--start=abc', '--max_new_tokens=20', '--temperature=1.0')
    three = run('sample.py', *common, '--num_samples=3', '--seed=5').stdout.split('---------------')
    one = run('sample.py', *common, '--num_samples=1', '--seed=7').stdout.split('---------------')
    assert three[2].strip() == one[0].strip() and three[0].strip() != three[2].strip()


def test_the_compiled_step_gives_the_eager_tokens():
    """compile=True (inductor, with its C++ wrapper on a CPU): rows of different lengths, past block_size, one graph
    per attention span; the tokens of the eager step, checked free of near-ties (the kernels sum in another order)."""
    model = tiny_gpt(position='rotary')
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]
    expected = [alone(model, p, 24, temperature=0) for p in prompts]
    decoder = BatchDecoder(model, max_rows=3, compile=True)
    rows = [decoder.add(p, 24, temperature=0) for p in prompts]
    got = {row: [] for row in rows}
    while decoder.rows:
        for step in decoder.step():
            got[step.row].append(step.token)
    assert [got[row] for row in rows] == expected


def test_a_compiled_decoder_keeps_a_graph_for_every_batch_and_span_it_meets():
    """Rows padded to a power of two and spans rounded up to one: 5 batch sizes x 2 spans = 10 graphs, beyond dynamo's
    default limit of 8, past which it would quietly run the step eagerly (as a server whose clients come and go did).
    Graphs counted by a backend that runs them as they are; the padded rows' tokens are dropped."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model = GPT(GPTConfig(block_size=128, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    counter = CompileCounter()
    for rows in (1, 2, 3, 5, 16):  # padded to 1, 2, 4, 8, 16 rows
        decoder = BatchDecoder(model, max_rows=16, compile=counter)
        for r in range(rows):
            decoder.add([r + 1], 70, temperature=0)
        while decoder.rows:  # 70 positions: spans of 64 and 128
            assert len(decoder.step()) == rows
    assert counter.frame_count == 10
