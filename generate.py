"""
Decoding: turning a GPT's next-token logits into text, one token at a time, on decoder.BatchDecoder (which drives
the model; sample.py, eval.py, train.py's samples and bench_sample.py use this module):

- generate_tokens(): the next token of every row of a batch, step by step, each row with its own random stream
- beam search: num_beams, length_penalty, the algorithm of transformers' generate
- generate(model, idx, ...): nanoGPT's model.generate, with all of the above
- TextStream: a completion's text as its tokens come: stop strings, a character cut in two, streaming
- generate_text(): completions of one prompt as text, the samples decoded together as the rows of one batch
- use_decoding_layout(): a faster memory layout of the weights for decoding on a CPU, applied by the caller
"""
import torch
from torch import nn
from torch.nn import functional as F

from decoder import BatchDecoder, check_controls, penalise_repetition


@torch.no_grad()
def use_decoding_layout(model):
    """Store every wide CPU weight matrix of model (more outputs than inputs: c_attn, c_fc, a large-vocabulary head)
    transposed in memory. Values and shapes are unchanged, and so are results, but for float rounding (a kernel may
    sum a transposed matrix in another order), while a one-token step multiplies a vector by the contiguous (in,
    out) matrix, whose long rows stream from memory about 1.7x faster on CPU (decoding is bound by reading the
    weights; see bench_sample.py). Training afterwards is unaffected, only its speed may change.
    sample.py applies it to the model it loads; a no-op once done, and on GPUs. Returns model."""
    with torch.inference_mode(False):  # a caller may be in inference mode; the weights must stay trainable
        for module in model.modules():
            w = module.weight if isinstance(module, nn.Linear) else None
            if w is not None and w.device.type == 'cpu' and w.size(0) > w.size(1) and w.is_contiguous():
                w.data = w.data.t().contiguous().t()
    return model


# ---------------------------------------------------------------------------- sampling and beam search

@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                    use_cache=True, vocab_size=None, generator=None, sync=None, seed=None, compile=False):
    """Yield the next token of every row of idx (B, T), as a (B,) tensor, max_new_tokens times.
    vocab_size: only ids below it may be picked (the tokenizer's size, when the model's is padded).
    Each row draws from its own random stream: seeded seed + row, or, without a seed, from a seed drawn from torch's
    global generator; generator: one stream the rows draw from in turn instead. sync(tokens): the tokens every
    process goes on with, when several run the model together (FSDP: all must run the same forward passes)."""
    if max_new_tokens == 0:
        return
    B, T = idx.shape
    decoder = BatchDecoder(model, B, vocab_size, max_len=T + max_new_tokens, use_cache=use_cache, compile=compile,
                           sync=sync)
    for b, prompt in enumerate(idx.tolist()):
        decoder.add(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                    seed=None if seed is None else seed + b, generator=generator)
    for _ in range(max_new_tokens):
        yield torch.tensor([step.token for step in decoder.step()], device=idx.device)


@torch.no_grad()
def beam_search(model, idx, max_new_tokens, num_beams, length_penalty=1.0, repetition_penalty=1.0, eot_id=None,
                use_cache=True, vocab_size=None):
    """Beam search from one prompt idx (1, T), the algorithm of transformers' generate (its default early stopping).
    Each step extends the num_beams live beams by every token and ranks the extensions by their summed
    log-probability. Those among the best num_beams that end (with eot_id, or at max_new_tokens) become finished
    hypotheses, scored sum / length ** length_penalty (the length counts the end-of-text); the best num_beams
    that do not end are the next live beams, so a finished hypothesis never takes a live beam's place. The search
    stops at max_new_tokens, or once num_beams hypotheses are finished and the best live beam, scored at its
    length so far, does not beat the worst of them. Returns the finished [(score, tokens)], best first."""
    K, T = num_beams, idx.size(1)
    decoder = BatchDecoder(model, K, vocab_size, max_len=T + max_new_tokens, use_cache=use_cache)
    for _ in range(K):
        decoder.add(idx[0].tolist(), max_new_tokens, temperature=0)
    logp = torch.full((K,), -float('inf'), device=idx.device)
    logp[0] = 0.0  # the K beams start as the same prompt: extend only one of them at first
    finished = []
    for step in range(max_new_tokens):
        length = step + 1
        # the penalty applies to the log-probabilities, where transformers' beam search applies its logits processors
        # (penalised logits, then log-softmax, would give other scores and other beams)
        step_logp = F.log_softmax(decoder.next_logits(), dim=-1)  # (K, V)
        if repetition_penalty != 1.0:
            step_logp = penalise_repetition(step_logp, torch.tensor(decoder.tokens(), device=idx.device),
                                            repetition_penalty)
        V = step_logp.size(-1)
        # 2K candidates: even if the best K all end, K others remain to go on with
        total, flat = (logp[:, None] + step_logp).view(-1).topk(min(2 * K, K * V))
        beam, token = flat // V, flat % V
        ends = token == eot_id if eot_id is not None else torch.zeros_like(token, dtype=torch.bool)
        if length == max_new_tokens:
            ends[:] = True
        for rank in range(min(K, len(total))):
            if ends[rank] and total[rank] > -float('inf'):
                tokens = decoder.rows[beam[rank]].tokens[T:] + [token[rank].item()]
                finished.append((total[rank].item() / length ** length_penalty, tokens))
        finished = sorted(finished, key=lambda h: -h[0])[:K]
        live = (~ends).nonzero().flatten()[:K]
        if len(live) == 0:
            break
        logp = total[live]
        if len(live) < K:  # fewer live candidates than beams (a tiny vocabulary): fill with dead rows
            logp = torch.cat((logp, logp.new_full((K - len(live),), -float('inf'))))
            live = torch.cat((live, live[:1].repeat(K - len(live))))
        decoder.reorder(beam[live].tolist())
        decoder.append(token[live])
        if len(finished) == K and logp[0].item() / length ** length_penalty <= finished[-1][0]:
            break  # no live beam is on course to beat the finished ones
    return finished or [(0.0, [])]


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
             num_beams=1, length_penalty=1.0, eot_id=None, use_cache=True):
    """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).
    temperature 0 is greedy; top_k / top_p keep the k likeliest tokens / the smallest set holding
    probability top_p; repetition_penalty > 1 discourages tokens already in the row; num_beams > 1 is
    beam search (best length-normalised log-probability, see beam_search). With eot_id, a row that produces
    it is finished: it is padded with eot_id, and generation stops once all rows are.
    Stop strings are text: generate_text handles them."""
    check_controls(temperature, top_k, top_p, repetition_penalty, num_beams, length_penalty, max_new_tokens)
    B = idx.size(0)
    if num_beams > 1:
        rows = [beam_search(model, idx[[b]], max_new_tokens, num_beams, length_penalty, repetition_penalty,
                            eot_id, use_cache)[0][1] for b in range(B)]
    else:
        decoder = BatchDecoder(model, B, max_len=idx.size(1) + max_new_tokens, use_cache=use_cache)
        ids = [decoder.add(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eot_id=eot_id)
               for prompt in idx.tolist()]
        new = {i: [] for i in ids}
        while decoder.rows:
            for step in decoder.step():
                new[step.row].append(step.token)
        rows = [new[i] for i in ids]
    n = max(len(r) for r in rows)
    pad = eot_id if eot_id is not None else 0
    new = torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long, device=idx.device)
    return torch.cat((idx, new.view(B, n)), dim=1)


# ---------------------------------------------------------------------------- text

def _held_back(text, stop):
    """How many characters at the end of text could be the start of a stop string: not shown yet."""
    for n in range(min(len(text), max((len(s) for s in stop), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0


class TextStream:
    """A completion's text as its tokens come (the end-of-text token is not pushed). push(token) returns the new text
    now final: a character a byte-level tokenizer cut in two, and an end that may be the start of a stop string, are
    held back until the next tokens tell; done is set once a stop string appears (the text stops just before it).
    finish(ended_by_model) returns the rest: cut by max_new_tokens, without a character cut in two
    (tokenizer.decode_complete); ended by the model, as it is. text: the completion so far."""

    def __init__(self, tokenizer, prompt_ids, stop=()):
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        self.stop = [s for s in stop if s]
        self.prompt_text = tokenizer.decode(self.prompt_ids)
        self.tokens, self.text, self.shown, self.done = [], '', 0, False

    def push(self, token):
        if self.done:
            return ''
        self.tokens.append(token)
        self._cut(_completion(self.tokenizer, self.prompt_ids, self.tokens, self.prompt_text, complete=True))
        end = len(self.text) if self.done else len(self.text) - _held_back(self.text, self.stop)
        return self._show(end)

    def finish(self, ended_by_model=False):
        ended = ended_by_model
        self._cut(_completion(self.tokenizer, self.prompt_ids, self.tokens, self.prompt_text, complete=not ended))
        return self._show(len(self.text))

    def _cut(self, text):
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        self.done = self.done or cut >= 0
        self.text = text[:cut] if cut >= 0 else text

    def _show(self, end):
        new = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return new


@torch.no_grad()
def generate_text(model, tokenizer, prompt_ids, num_samples=1, max_new_tokens=100, temperature=1.0, top_k=None,
                  top_p=None, repetition_penalty=1.0, num_beams=1, length_penalty=1.0, stop=(), use_cache=True,
                  on_text=None, progress=False, generator=None, sync=None, seed=None, compile=False):
    """Complete the prompt (a list of token ids) num_samples times; returns the completions as strings.
    A completion ends after max_new_tokens tokens (without the bytes of a character they cut in two, which a
    byte-level tokenizer can: tokenizer.decode_complete), at the tokenizer's end-of-text token, or just before the
    first of the stop strings; neither the end-of-text nor the stop string is part of it.
    on_text(row, text) receives each completion's new text as soon as it is final: while sampling, it
    streams; beam search only knows its winner at the end. Stop strings cut beam search's winner afterwards.
    seed: sample i draws from its own stream seeded seed + i (the same sample whatever num_samples is); generator,
    sync, compile: see generate_tokens and decoder.BatchDecoder (sampling only)."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_new_tokens, unit='tok', leave=False, dynamic_ncols=True)
    streams = [TextStream(tokenizer, prompt_ids, stop) for _ in range(num_samples)]
    ended = [False] * num_samples  # ended by the model (its end-of-text), not cut by max_new_tokens
    if num_beams > 1:
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
        hypotheses = beam_search(model, idx, max_new_tokens, num_beams, length_penalty, repetition_penalty,
                                 tokenizer.eot_id, use_cache, tokenizer.vocab_size)
        streams = streams[:len(hypotheses)]  # the search may finish fewer hypotheses than samples were asked for
        for i, (stream, (_, tokens)) in enumerate(zip(streams, hypotheses)):
            ended[i] = bool(tokens) and tokens[-1] == tokenizer.eot_id  # beam search's hypotheses keep it
            stream.tokens = tokens[:-1] if ended[i] else tokens
        if bar is not None:
            bar.update(max_new_tokens)
    else:
        decoder = BatchDecoder(model, num_samples, tokenizer.vocab_size, max_len=len(prompt_ids) + max_new_tokens,
                               use_cache=use_cache, compile=compile, sync=sync)
        rows = {decoder.add(prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            seed=None if seed is None else seed + i, eot_id=tokenizer.eot_id, generator=generator): i
                for i in range(num_samples)}
        while decoder.rows:
            if bar is not None:
                bar.update(1)
            for step in decoder.step():
                i = rows[step.row]
                if step.finished and step.token == tokenizer.eot_id:
                    ended[i] = True
                elif stop or on_text:
                    new = streams[i].push(step.token)
                    if new and on_text:
                        on_text(i, new)
                    if streams[i].done and not step.finished:
                        decoder.cancel(step.row)
                else:
                    streams[i].tokens.append(step.token)
    if bar is not None:
        bar.close()
    completions = []
    for i, stream in enumerate(streams):
        rest = stream.finish(ended_by_model=ended[i])
        if on_text and rest:
            on_text(i, rest)
        completions.append(stream.text)
    return completions


def _completion(tokenizer, prompt_ids, tokens, prompt_text, complete=False):
    # decoded together with the prompt: some tokenizers (SentencePiece) drop a word's leading space when
    # it is decoded alone. complete: without a character cut in two at the end
    decode = tokenizer.decode_complete if complete else tokenizer.decode
    text = decode(prompt_ids + tokens)
    if text.startswith(prompt_text):
        return text[len(prompt_text):]
    return decode(tokens)
