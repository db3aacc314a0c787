"""
STAND-IN, to be replaced by the lead's batched decoder (issue 25, /work/notes/decoder_api.md) when it lands on main:
the same interface, each row decoded on its own by generate.Decoder (slow, but the tokens are those of decoding the
row alone, which is what the real one promises). serve.py is written against this interface.
"""
from collections import namedtuple

import torch
from torch.nn import functional as F

from generate import Decoder, _next_logits, check_controls, penalise_repetition, sample_token

Step = namedtuple('Step', 'row token finished logprob top')


class BatchFull(RuntimeError):
    pass


class _Row:
    def __init__(self, decoder, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator, eot_id,
                 logprobs):
        self.decoder, self.max_new_tokens, self.generator, self.eot_id = decoder, max_new_tokens, generator, eot_id
        self.temperature, self.top_k, self.top_p, self.penalty = temperature, top_k, top_p, repetition_penalty
        self.logprobs, self.made = logprobs, 0


class BatchDecoder:
    def __init__(self, model, max_rows=16, vocab_size=None, compile=False):
        self.model, self.max_rows, self.vocab_size = model, max_rows, vocab_size
        self.rows, self.next_id = {}, 0
        self.device = next(model.parameters()).device

    def add(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
            seed=None, eot_id=None, logprobs=0):
        check_controls(temperature, top_k, top_p, repetition_penalty, 1, 1.0, max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f'max_new_tokens={max_new_tokens}: a row decodes at least one token')
        if not self.free_rows:
            raise BatchFull(f'all {self.max_rows} rows are taken')
        generator = torch.Generator(self.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        decoder = Decoder(self.model, idx, True, max_new_tokens)
        row = _Row(decoder, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator, eot_id, logprobs)
        row.logits = _next_logits(decoder, self.vocab_size)  # the prefill
        self.rows[self.next_id] = row
        self.next_id += 1
        return self.next_id - 1

    @property
    def free_rows(self):
        return self.max_rows - len(self.rows)

    @property
    def active(self):
        return list(self.rows)

    @torch.no_grad()
    def step(self):
        steps = []
        for rid, row in list(self.rows.items()):
            logp = F.log_softmax(row.logits, dim=-1)[0]
            logits = penalise_repetition(row.logits, row.decoder.seq, row.penalty)
            token = sample_token(logits, row.temperature, row.top_k, row.top_p, row.generator)
            t = token.item()
            top = None
            if row.logprobs:
                values, ids = logp.topk(row.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            row.made += 1
            finished = t == row.eot_id or row.made == row.max_new_tokens
            steps.append(Step(rid, t, finished, logp[t].item(), top))
            if finished:
                del self.rows[rid]
            else:
                row.decoder.append(token)
                row.logits = _next_logits(row.decoder, self.vocab_size)
        return steps

    def cancel(self, row):
        self.rows.pop(row, None)
