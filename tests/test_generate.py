"""Decoding: the KV cache against plain forward passes (also past block_size), each sampling control
against what it promises, beam search against greedy, hand-made distributions and plain forward passes
(test_hf.py checks it against transformers), and text-level stop strings / end-of-text / streaming."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from conftest import assert_no_near_tie, decoder_of, sharp_gpt
from decoder import check_controls, filter_top_k, filter_top_p, penalise_repetition, sample_token
from generate import beam_search, generate, generate_text, generate_tokens, use_decoding_layout
from muon import configure_optimizers
from tokenizer import make_tokenizer

BLOCK = 16
pytestmark = pytest.mark.usefixtures('torch_threads_here')


def tiny_gpt(seed=0, vocab_size=48, **overrides):
    return sharp_gpt(BLOCK, vocab_size, seed, **overrides)


@torch.no_grad()
def sequence_score(model, idx, tokens, length_penalty=1.0):
    """The beam score of continuing idx (1, T) by tokens, from one plain forward pass (T + len(tokens)
    must fit block_size): a reference for beam_search."""
    full = torch.cat([idx, torch.tensor([tokens], dtype=torch.long, device=idx.device)], dim=1)
    logits, _ = model(full[:, :-1])
    logp = F.log_softmax(logits.float(), dim=-1)[0, idx.size(1) - 1:]
    return logp.gather(1, full[0, idx.size(1):, None]).sum().item() / len(tokens) ** length_penalty


def greedy_without_near_ties(model, prompt, steps, use_cache=True):
    """generate(model, prompt, steps, temperature=0, use_cache=use_cache)'s new tokens (B, steps), by the same decoder,
    checking that no step's logits have a near-tie: another code path's greedy tokens must then be these exactly."""
    decoder = decoder_of(model, prompt, use_cache, steps)
    for step in range(steps):
        logits = decoder.next_logits()
        assert_no_near_tie(logits, f' (step {step})')
        decoder.append(logits.argmax(-1))
    return torch.tensor(decoder.tokens())[:, prompt.size(1):]


def window_start(length, start):
    """The documented window rule (decoder.BatchDecoder): past block_size, jump to the newest half block."""
    return length - BLOCK // 2 if length - start > BLOCK else start


@pytest.mark.parametrize('overrides', [dict(), dict(position='rotary', norm='rmsnorm', qk_norm=True, bias=False)],
                         ids=['gpt2', 'rotary'])
@pytest.mark.parametrize('prompt_len', [3, 40], ids=['short_prompt', 'prompt_longer_than_block'])
def test_cache_logits_equal_no_cache_and_plain_forward_past_block_size(overrides, prompt_len):
    model = tiny_gpt(**overrides)
    prompt = torch.randint(0, 48, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    cached, plain = decoder_of(model, prompt, use_cache=True), decoder_of(model, prompt, use_cache=False)
    start = max(0, prompt_len - BLOCK)
    seq = prompt
    for step in range(3 * BLOCK):  # several window jumps
        start = window_start(seq.size(1), start)
        reference = model(seq[:, start:])[0][:, -1].float()  # one plain forward over the same window
        assert_no_near_tie(reference, f' (step {step})')  # for the exact comparison of tokens below
        a, b = cached.next_logits(), plain.next_logits()
        # attention over a cache or over the whole window, one position or all: float32 sums in another order,
        # a few ulps of these logits (up to ~3e-6)
        torch.testing.assert_close(a, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, reference, atol=1e-5, rtol=1e-5)
        token = a.argmax(-1)
        cached.append(token), plain.append(token)
        seq = torch.cat([seq, token[:, None]], dim=1)
    # and the public API gives identical greedy tokens both ways, and the ones the reference chose: exactly, as no step
    # above had a near-tie (with the cache, generate runs the cached decoder above: the same arithmetic)
    with_cache = generate(model, prompt, 3 * BLOCK, temperature=0, use_cache=True)
    without = generate(model, prompt, 3 * BLOCK, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, seq)


def test_generating_leaves_the_weight_layout_alone():
    """generate() reads the model and changes nothing of it: every weight keeps its memory order."""
    model = tiny_gpt(tie_weights=True)
    layout = {name: (p.stride(), p.data_ptr()) for name, p in model.named_parameters()}
    generate(model, torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(3)), 4, temperature=0)
    assert {name: (p.stride(), p.data_ptr()) for name, p in model.named_parameters()} == layout


def test_decoding_layout_changes_memory_order_only():
    """use_decoding_layout stores the wide matrices transposed in memory: the values, the logits, and training
    afterwards stay what they were; only the memory order of those matrices changes."""
    model = tiny_gpt(tie_weights=True)  # a tied head of 48 x 32 is wide, and is the embedding too
    reference = copy.deepcopy(model)
    prompt = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(3))
    assert use_decoding_layout(model) is model
    generated = generate(model, prompt, 4, temperature=0)[:, -10:]
    assert not generated.is_inference()  # an ordinary tensor: it may be trained on, as below
    block = model.transformer.h[0]
    for wide in (block.attn.c_attn.weight, block.mlp.c_fc.weight, model.lm_head.weight):
        assert not wide.is_contiguous() and wide.t().is_contiguous()
    assert block.attn.c_proj.weight.is_contiguous() and block.mlp.c_proj.weight.is_contiguous()  # not wide
    assert model.transformer.wte.weight is model.lm_head.weight
    after, before = model.state_dict(), reference.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    # the same values in another memory order may take another matmul kernel: a few ulps at most
    torch.testing.assert_close(model(prompt)[0], reference(prompt)[0], atol=1e-6, rtol=1e-6)
    # a training step from here matches one from the untouched copy
    targets = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(4))
    for m in (model, reference):
        m.train()
        optimizer = configure_optimizers(m, 0.1, 1e-2, (0.9, 0.95), 'cpu')
        m(generated, targets)[1].backward()
        optimizer.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):  # likewise, through one AdamW step
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_rows_of_a_batch_are_independent():
    model = tiny_gpt()
    prompts = torch.randint(0, 48, (3, 5), generator=torch.Generator().manual_seed(2))
    together = generate(model, prompts, 30, temperature=0)
    assert torch.equal(together[:, 5:], greedy_without_near_ties(model, prompts, 30))  # the same decoding, checked
    for row in range(3):  # one row alone is computed with other shapes, so equal but for last bits: the same tokens
        assert torch.equal(together[row], generate(model, prompts[[row]], 30, temperature=0)[0])


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_gpt()
    prompt = torch.randint(0, 48, (4, 3), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, prompt, 40, temperature=0)
    torch.manual_seed(0)  # the same decoder, the same batch: the same logits, of which each control keeps the argmax
    assert torch.equal(generate(model, prompt, 40, temperature=1.5, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 40, temperature=1.5, top_p=1e-6), greedy)
    sampled = generate(model, prompt, 40, temperature=1.5)
    assert not torch.equal(sampled, greedy)  # the comparison above is not vacuous


def frequencies(logits, n=40000, **controls):
    torch.manual_seed(0)
    tokens = sample_token(logits.repeat(n, 1), **controls)
    return torch.bincount(tokens, minlength=logits.size(-1)).float() / n


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (0.5, 1.0, 2.0):
        expected = F.softmax(logits[0] / temperature, dim=-1)
        assert (frequencies(logits, temperature=temperature) - expected).abs().max() < 0.01


def test_top_k_keeps_the_k_likeliest_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    kept = filter_top_k(logits, 2)
    assert torch.isinf(kept[0, [2, 3, 4]]).all() and torch.equal(kept[0, :2], logits[0, :2])
    expected = torch.zeros(5)
    expected[:2] = F.softmax(logits[0, :2], dim=-1)
    assert (frequencies(logits, top_k=2) - expected).abs().max() < 0.01


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()[None]
    # the smallest set of likeliest tokens whose probability reaches top_p
    for top_p, nucleus in ((0.3, {1}), (0.5, {1}), (0.51, {1, 3}), (0.8, {1, 3}), (0.81, {1, 3, 2}),
                           (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})):
        kept = filter_top_p(logits, top_p)
        assert set(torch.nonzero(torch.isfinite(kept[0])).flatten().tolist()) == nucleus, top_p
    expected = torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8
    assert (frequencies(logits, top_p=0.8) - expected).abs().max() < 0.01


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    seen = torch.tensor([[0, 1, 1]])
    out = penalise_repetition(logits, seen, 2.0)
    assert out[0, 0] == 1.0 and out[0, 1] == -2.0  # positive divided, negative multiplied: both lower
    assert torch.equal(out[0, 2:], logits[0, 2:])
    assert torch.equal(penalise_repetition(logits, seen, 1.0), logits)
    # generation applies it to every token of the row so far, prompt included
    model = tiny_gpt()
    prompt = torch.randint(0, 48, (1, 4), generator=torch.Generator().manual_seed(4))
    seq = prompt
    for step in range(BLOCK - 4):  # plain forward passes here, the KV cache in generate: no near-tie allowed
        logits = penalise_repetition(model(seq)[0][:, -1].float(), seq, 1.8)
        assert_no_near_tie(logits, f' (step {step})')
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, prompt, BLOCK - 4, temperature=0, repetition_penalty=1.8), seq)
    assert not torch.equal(generate(model, prompt, BLOCK - 4, temperature=0), seq)


def test_one_beam_is_greedy():
    model = tiny_gpt()
    for seed in range(3):
        prompt = torch.randint(0, 48, (1, 4), generator=torch.Generator().manual_seed(seed))
        greedy = generate(model, prompt, 3 * BLOCK, temperature=0)[0, 4:].tolist()
        # the same decoder gives beam search the same logits; it ranks them by running log-probability, greedy by
        # logit: the same order, but for rounding where two logits are nearly tied, which this data has not
        assert greedy_without_near_ties(model, prompt, 3 * BLOCK)[0].tolist() == greedy
        assert beam_search(model, prompt, 3 * BLOCK, num_beams=1)[0][1] == greedy
        # with an end-of-text token: greedy stops at it, and so does the single beam
        eot = greedy[5]
        assert beam_search(model, prompt, 3 * BLOCK, num_beams=1, eot_id=eot)[0][1] == greedy[:greedy.index(eot) + 1]


@pytest.mark.parametrize('length_penalty', [0.0, 1.0, 2.0])
def test_beam_scores_are_what_a_plain_forward_pass_gives(length_penalty):
    model = tiny_gpt(seed=5)
    for seed in range(3):
        prompt = torch.randint(0, 48, (1, 3), generator=torch.Generator().manual_seed(seed))
        for num_beams in (2, 4):
            hypotheses = beam_search(model, prompt, 10, num_beams, length_penalty, eot_id=7)
            assert len(hypotheses) == num_beams
            assert [h[0] for h in hypotheses] == sorted((h[0] for h in hypotheses), reverse=True)
            for score, tokens in hypotheses:  # each score is what a plain forward pass gives its tokens
                # (a sum of per-step float32 log-probabilities from the cache, each a few ulps from the plain pass's)
                assert score == pytest.approx(sequence_score(model, prompt, tokens, length_penalty), abs=1e-4)


class TableModel(nn.Module):
    """A language model given as a table: next-token probabilities for each continuation of the prompt."""

    def __init__(self, table, vocab_size, prompt_len):
        super().__init__()
        self.config = SimpleNamespace(block_size=64)
        self.lm_head = nn.Linear(1, vocab_size, bias=False)
        self.table, self.vocab_size, self.prompt_len = table, vocab_size, prompt_len

    def forward(self, idx, targets=None, cache=None, last_only=False):
        rows = []
        for row in idx.tolist():
            probs = torch.full((self.vocab_size,), 1e-4)
            for token, p in self.table.get(tuple(row[self.prompt_len:]), {}).items():
                probs[token] = p
            rows.append((probs / probs.sum()).log())
        return torch.stack(rows)[:, None, :], None


A, B, C, X, Y = range(5)


def table_beams(table, steps, num_beams, length_penalty=1.0, eot_id=None):
    model = TableModel(table, 5, prompt_len=1)
    return beam_search(model, torch.tensor([[C]]), steps, num_beams, length_penalty, eot_id=eot_id, use_cache=False)


def test_beam_search_finds_what_greedy_misses():
    flat = {t: 0.2 for t in range(5)}
    table = {(): {A: 0.4, B: 0.35, C: 0.25}, (A,): flat, (B,): {X: 0.9, Y: 0.1}}
    (score, tokens), *_ = table_beams(table, 2, num_beams=2)
    assert tokens == [B, X] and score == pytest.approx(math.log(0.35 * 0.9) / 2, abs=1e-3)


def test_length_penalty_decides_between_short_and_long():
    eot = Y
    table = {(): {A: 0.6, eot: 0.4}, (A,): {X: 0.3, B: 0.25, C: 0.25, eot: 0.2}, (A, X): {eot: 1.0}}
    # log(0.4) / 1 = -0.92 for [eot]; log(0.6 * 0.3 * 1.0) / 3 = -0.57 for [A, X, eot]
    assert table_beams(table, 5, 2, length_penalty=1.0, eot_id=eot)[0][1] == [A, X, eot]
    # unnormalised (length_penalty 0), the short one wins: -0.92 > -1.71
    assert table_beams(table, 5, 2, length_penalty=0.0, eot_id=eot)[0][1] == [eot]


def test_controls_reject_meaningless_values():
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(num_beams=0),
                dict(repetition_penalty=0.0), dict(top_k=-1), dict(num_beams=2, num_samples=3)):
        with pytest.raises(ValueError):
            check_controls(**bad)
    check_controls(temperature=0, top_k=None, top_p=1.0, num_beams=4, num_samples=4)


# ---------------------------------------------------------------------------- text

TEXT = 'ROMEO: wherefore art thou?\nJULIET: here, my love.\n'


def char_model():
    tokenizer = make_tokenizer('char', TEXT)
    model = tiny_gpt(vocab_size=64)  # padded like train.py's: ids >= tokenizer.vocab_size are no tokens
    with torch.no_grad():  # make the padding rows win every argmax, unless generation masks them:
        model.transformer.ln_f.weight[0], model.transformer.ln_f.bias[0] = 0.0, 1.0  # feature 0 is always 1
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.vocab_size:, 0] = 100.0
    return model, tokenizer


def test_generate_text_never_picks_padding_ids_and_streams_its_completion():
    model, tokenizer = char_model()
    ids = tokenizer.encode('ROMEO:')
    unmasked = next(generate_tokens(model, torch.tensor([ids]), 1, temperature=0))
    assert unmasked.item() >= tokenizer.vocab_size  # the masking below is needed
    pieces = []
    [text] = generate_text(model, tokenizer, ids, max_new_tokens=40, temperature=0,
                           on_text=lambda row, piece: pieces.append(piece))
    tokens = list(generate_tokens(model, torch.tensor([ids]), 40, temperature=0, vocab_size=tokenizer.vocab_size))
    assert text == tokenizer.decode(torch.cat(tokens)) and ''.join(pieces) == text and len(pieces) > 1


def byte_ids(tokenizer, text_or_bytes):
    """The trained BPE's single-byte token of each byte (its vocabulary holds one per byte, GPT-2's byte alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    raw = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    return [tokenizer._tok.token_to_id(bytes_to_unicode()[b]) for b in raw]


def test_a_sample_cut_inside_a_character_leaves_the_character_out():
    """A byte-level BPE writes 'é' as two byte tokens and '€' as three: a sample that max_new_tokens cuts inside one
    ends before it (before, it ended in U+FFFD), sampled or beam-searched, streamed or not; given all its bytes, it is
    whole. Only a cut character is left out: an invalid byte, or a real U+FFFD, stays where transformers shows it."""
    tokenizer = make_tokenizer('bpe', [TEXT], vocab_size=280)
    prompt = tokenizer.encode('ROMEO:')
    cases = [('aé', [(1, 'a'), (2, 'a'), (3, 'aé')]),
             ('€!', [(1, ''), (2, ''), (3, '€'), (4, '€!')]),
             (b'\xff\xe2\x82', [(1, '\ufffd'), (2, '\ufffd'), (3, '\ufffd')]),  # an invalid byte stays, the cut '€' goes
             (b'\xe2\x82x', [(2, ''), (3, '\ufffdx')]),  # a sequence that never completes is invalid: shown
             ('\ufffd\u00e9', [(3, '\ufffd'), (4, '\ufffd'), (5, '\ufffd\u00e9')])]  # a real U+FFFD stays
    for sequence, expected in cases:
        ids = byte_ids(tokenizer, sequence)
        model = TableModel({tuple(ids[:i]): {ids[i]: 1.0} for i in range(len(ids))}, tokenizer.vocab_size, len(prompt))
        for n, text_expected in expected:
            # the reference: the bytes decoded by Python, with a cut sequence at the end left out by hand
            assert tokenizer.decode(ids[:n]).rstrip('\ufffd') == text_expected.rstrip('\ufffd')
            for num_beams in (1, 2):
                pieces = []
                [text] = generate_text(model, tokenizer, prompt, max_new_tokens=n, temperature=0, num_beams=num_beams,
                                       use_cache=False, on_text=lambda row, piece: pieces.append(piece))
                assert text == ''.join(pieces) == text_expected, (sequence, n, num_beams, text)
            assert tokenizer.decode_complete(prompt + ids[:n]) == 'ROMEO:' + text_expected


def test_decode_complete_holds_back_a_cut_character_of_every_byte_level_kind():
    """tiktoken decodes through bytes too (here an encoding of single bytes, built in place of GPT-2's files, which a
    test cannot download); the kinds that decode whole characters (char, word) have nothing to hold back."""
    import tiktoken
    from tokenizer import TiktokenTokenizer
    tok = TiktokenTokenizer.__new__(TiktokenTokenizer)
    tok._enc = tiktoken.Encoding('bytes', pat_str=r'.', mergeable_ranks={bytes([b]): b for b in range(256)},
                                 special_tokens={'<|endoftext|>': 256})
    tok.name, tok.vocab_size, tok.eot_id = 'bytes', 257, 256
    ids = tok.encode('price: \u20ac')
    assert len(ids) == 10 and tok.decode(ids[:-1]).endswith('\ufffd')  # the reference: '€' is 3 byte tokens
    assert tok.decode_complete(ids[:-1]) == tok.decode_complete(ids[:-2]) == 'price: '
    assert tok.decode_complete(ids) == 'price: \u20ac'
    assert tok.decode_complete([0xff, ord('a'), 0xe2]) == '\ufffda'  # the invalid byte stays, the cut '€' goes
    assert tok.decode_complete(ids[:-1] + [256]) == tok.decode(ids[:-1] + [256])  # ended by end-of-text: shown
    char = make_tokenizer('char', ['ab\u00e9'])
    assert char.decode_complete(char.encode('a\u00e9')) == 'a\u00e9'


def test_stop_strings_and_end_of_text_end_a_completion():
    model, tokenizer = char_model()
    ids = tokenizer.encode('JULIET:')
    [full] = generate_text(model, tokenizer, ids, max_new_tokens=60, temperature=0)
    stop = full[20:22]
    pieces = []
    [cut] = generate_text(model, tokenizer, ids, max_new_tokens=60, temperature=0, stop=['zzz', stop],
                          on_text=lambda row, piece: pieces.append(piece))
    assert cut == full[:full.index(stop)] and ''.join(pieces) == cut
    # a tokenizer's end-of-text token ends the completion, and is not part of it
    eot = tokenizer.encode(full[30])[0]
    tokenizer.eot_id = eot
    [ended] = generate_text(model, tokenizer, ids, max_new_tokens=60, temperature=0)
    assert ended == full[:full.index(full[30])]
    # sampled rows of one batch end independently
    torch.manual_seed(0)
    rows = generate_text(model, tokenizer, ids, num_samples=4, max_new_tokens=60, temperature=1.0, stop=['e'])
    assert len(rows) == 4 and all('e' not in row for row in rows) and len(set(rows)) > 1


@pytest.mark.parametrize('overrides', [dict(), dict(position='rotary', norm='rmsnorm', qk_norm=True, bias=False)],
                         ids=['gpt2', 'rotary'])
def test_compiled_decoding_compiles_a_few_graphs_and_gives_the_same_tokens(overrides):
    """The compiled one-token step (graphs counted by a backend that runs them as they are, no inductor): one graph
    for a batch of a given size, however many steps, window jumps and prompts follow (positions are a tensor, not
    Python ints: the shapes never change), and the eager step's tokens."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model = tiny_gpt(n_layer=4, **overrides)
    counter = CompileCounter()
    for seed, prompt_len in ((1, 5), (2, 9), (3, 3)):
        prompt = torch.randint(0, 48, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
        eager = generate(model, prompt, 3 * BLOCK, temperature=0)
        tokens = torch.stack(list(generate_tokens(model, prompt, 3 * BLOCK, temperature=0, compile=counter)), dim=1)
        # exactly: the counting backend runs the captured graphs' torch operations as they are (no inductor, no
        # fusion), on the same tensors as the eager decoder: the same arithmetic
        assert torch.equal(torch.cat([prompt, tokens], dim=1), eager)
    assert counter.frame_count == 1


@pytest.mark.parametrize('overrides', [dict(), dict(position='rotary', norm='rmsnorm', qk_norm=True, bias=False)],
                         ids=['gpt2', 'rotary'])
def test_kv_cache_under_bfloat16_autocast_is_bfloat16_and_follows_the_no_cache_logits(overrides):
    """Under bf16 autocast the cache holds bfloat16 (what the matmuls give), and each step's logits stay within
    bfloat16 rounding of a no-cache forward pass over the same tokens (both decoders are fed the same tokens,
    so a near-tie that rounding tips one way cannot make the two runs part)."""
    model = tiny_gpt(**overrides)
    prompt = torch.randint(0, 48, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cached, plain = decoder_of(model, prompt, use_cache=True), decoder_of(model, prompt, use_cache=False)
        for step in range(3 * BLOCK):  # past block_size: window jumps and cache refills
            a, b = cached.next_logits(), plain.next_logits()
            if step == 0:
                assert cached.cache.k[0].dtype == cached.cache.v[0].dtype == torch.bfloat16
            torch.testing.assert_close(a, b, atol=0.02 * b.abs().max().item(), rtol=0, msg=f'step {step}')
            token = b.argmax(-1)
            cached.append(token), plain.append(token)
    decoder = decoder_of(model, prompt)  # without autocast, the weights' float32
    decoder.next_logits()
    assert decoder.cache.k[0].dtype == torch.float32


def test_a_conversation_feeds_each_token_through_the_model_once():
    """A chat (sample.py --chat) appends each user turn to the decoder it keeps: the model sees only the new tokens,
    never the conversation again, and the replies are those a fresh greedy decode of the whole history gives."""
    model = tiny_gpt()
    fed = []
    model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(args[0].size(1)), with_kwargs=True)
    turns = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    decoder, history, replies = None, [], []
    for turn in turns:
        if decoder is None:
            decoder = decoder_of(model, torch.tensor([turn]))
        else:
            decoder.append([turn])
        reply = [decoder.step()[0].token for _ in range(2)]
        replies.append(reply)
        history += turn + reply
    assert sum(fed) == len(history) - 1  # every token once, but the last reply's last (never fed back)
    history = []
    for turn, reply in zip(turns, replies):  # no cache here, one fed turn by turn above: equal tokens, no near-tie
        history += turn
        expected = greedy_without_near_ties(model, torch.tensor([history]), 2, use_cache=False)[0].tolist()
        assert reply == expected
        history += reply


def test_beam_search_returns_the_hypotheses_it_finished_when_fewer_than_the_samples_asked():
    """A two-token vocabulary and one new token: only two hypotheses exist, so four beams finish two; generate_text
    returns those two completions (it raised AttributeError on the samples left without one)."""
    tokenizer = make_tokenizer('char', 'ab')
    model = sharp_gpt(BLOCK, 2)
    texts = generate_text(model, tokenizer, tokenizer.encode('ab'), num_samples=4, num_beams=4, max_new_tokens=1)
    assert sorted(texts) == ['a', 'b']
