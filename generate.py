"""
Decoding: turning a GPT's next-token logits into text, one token at a time. The model knows nothing of it;
this module drives the model's forward pass (sample.py, eval.py and bench_sample.py use it):

- KVCache and Decoder: incremental decoding, each new token one position of work, over a context window
  that slides past block_size
- sampling controls: temperature (0 is greedy), top-k, top-p (nucleus), repetition penalty; several
  samples of one prompt are the rows of one batch
- beam search: num_beams, length_penalty, the algorithm of transformers' generate
- generate(model, idx, ...): nanoGPT's model.generate, with all of the above
- generate_text(): what needs a tokenizer: stop strings, the end-of-text token, streaming
- use_decoding_layout(): a faster memory layout of the weights for decoding on a CPU, applied by the caller
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


# ---------------------------------------------------------------------------- incremental decoding

class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one position
    of work instead of a forward pass over the whole context. Preallocated to max_len positions."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions filled

    def update(self, layer, k, v):
        """Store this layer's new keys/values at the current position; return all keys/values so far."""
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def reorder(self, batch_indices):
        """Keep the rows named by batch_indices (beam search reorders its beams every step)."""
        self.k = self.k[:, batch_indices]
        self.v = self.v[:, batch_indices]


def compute_dtype(weight):
    """The dtype the model computes in: autocast's where it is on (keys and values come out of the matmuls in
    it, so a cache in float32 would take twice the memory and a cast every step), else the weights'."""
    device_type = weight.device.type
    autocasting = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)  # not on meta
    return torch.get_autocast_dtype(device_type) if autocasting else weight.dtype


class Decoder:
    """Incremental decoding state: the sequence so far and, with use_cache, its KVCache.
    next_logits() gives the next position's (B, vocab) float32 logits; append(tokens) extends each row.
    Once the sequence outgrows block_size, the context window jumps forward by half a block (keeping
    the newest half): the cache is refilled once per half block instead of every step, and the
    no-cache path uses exactly the same windows, so both compute the same logits (to float rounding: the cache's
    attention sums in another order) and pick the same tokens but for near-ties. With max_new_tokens, the
    cache holds only the positions that many tokens can reach (at most block_size)."""

    def __init__(self, model, idx, use_cache=True, max_new_tokens=None):
        self.model, self.seq, self.use_cache = model, idx, use_cache
        self.block = model.config.block_size
        self.cache_len = self.block if max_new_tokens is None else min(self.block, idx.size(1) + max_new_tokens)
        self.start = max(0, idx.size(1) - self.block)  # a long prompt keeps its last block_size tokens
        self.cache = None
        self.fresh = idx.size(1)  # tokens not yet fed through the model

    @torch.no_grad()
    def next_logits(self):
        if self.seq.size(1) - self.start > self.block:
            self.start = self.seq.size(1) - self.block // 2
            self.cache = None  # positions shifted: the cached keys no longer apply
        if self.use_cache and self.cache is None:
            self.cache = KVCache(self.model.config, self.seq.size(0), self.cache_len, self.seq.device,
                                 compute_dtype(self.model.lm_head.weight))
            self.fresh = self.seq.size(1) - self.start
        # the tokens to feed, made here, outside inference mode, and contiguous: to torch.compile, a tensor made in
        # inference mode or a slice of the growing sequence (its stride changes every step) would be a new kind of input
        tokens = (self.seq[:, -self.fresh:] if self.use_cache else self.seq[:, self.start:]).contiguous()
        with torch.inference_mode():  # a few percent cheaper per step than no_grad alone
            logits, _ = self.model(tokens, cache=self.cache, last_only=True)
        self.fresh = 0
        # cloned outside inference mode: callers get an ordinary tensor they may modify in place or train on
        return logits[:, -1, :].float().clone()

    def append(self, tokens):
        """tokens: (B,), one more token per row, or (B, n): n more (a chat's next user turn)."""
        tokens = tokens.view(self.seq.size(0), -1)
        self.seq = torch.cat((self.seq, tokens), dim=1)
        self.fresh += tokens.size(1)

    def reorder(self, batch_indices):
        """Keep (and duplicate) the rows named by batch_indices, e.g. beam search's surviving beams."""
        self.seq = self.seq[batch_indices]
        if self.cache is not None:
            self.cache.reorder(batch_indices)


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


# ---------------------------------------------------------------------------- controls

def check_controls(temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0, num_beams=1,
                   length_penalty=1.0, max_new_tokens=1, num_samples=1):
    """Raise ValueError, with a one-line message, on settings that mean nothing."""
    if not 0 <= temperature < math.inf:  # nan and inf too: they make every probability nan
        raise ValueError(f'temperature={temperature} is negative or not finite: use 0 for greedy decoding or a finite '
                         f'positive value')
    if top_k is not None and top_k < 0:
        raise ValueError(f'top_k={top_k} is negative: use a positive number of tokens, or 0 / None for no limit')
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f'top_p={top_p} is outside (0, 1]: 1.0 keeps every token, 0.9 the smallest set holding 90% of the probability')
    if not 0 < repetition_penalty < math.inf:
        raise ValueError(f'repetition_penalty={repetition_penalty} must be positive: 1.0 is none, 1.2 discourages repeats')
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f'num_beams={num_beams} must be an integer of at least 1 (1 means no beam search)')
    if not math.isfinite(length_penalty):
        raise ValueError(f'length_penalty={length_penalty} must be a finite number (1.0 divides by the length)')
    if max_new_tokens < 0:
        raise ValueError(f'max_new_tokens={max_new_tokens} is negative')
    if num_samples < 1:
        raise ValueError(f'num_samples={num_samples} must be at least 1')
    if num_beams > 1 and num_samples > num_beams:
        raise ValueError(f'num_samples={num_samples} is more than num_beams={num_beams}: beam search returns at most its num_beams best beams')


# ---------------------------------------------------------------------------- logits processing

def penalise_repetition(logits, seen, penalty):
    """CTRL's repetition penalty (https://arxiv.org/abs/1909.05858): the logit of every token already in
    the row's sequence `seen` (B, T) is divided by penalty where positive and multiplied where negative,
    so penalty > 1 always lowers it. Returns new logits."""
    if penalty == 1.0:
        return logits
    scores = logits.gather(1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, seen, scores)


def filter_top_k(logits, top_k):
    """Keep the top_k largest logits of each row, set the rest to -inf."""
    if not top_k or top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k).values[:, [-1]]
    return logits.masked_fill(logits < kth, -float('inf'))


def filter_top_p(logits, top_p):
    """Nucleus sampling (https://arxiv.org/abs/1904.09751): keep the smallest set of most likely tokens whose
    probability adds up to at least top_p; set the rest to -inf."""
    if top_p is None or top_p >= 1.0:
        return logits
    # transformers' TopPLogitsWarper step by step, so that equal logits at the cut (common in bfloat16) go the same
    # way: the same (unstable) ascending sort puts equal logits in the same order, and the unlikeliest tokens are
    # dropped while they add up to at most 1 - top_p. In float64: summed in float32, the probabilities of a
    # 50,000-token vocabulary carry enough rounding error to move the cut by a token or two
    sorted_logits, order = torch.sort(logits.double(), descending=False)
    drop_sorted = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop_sorted[:, -1] = False  # the likeliest token always stays
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -float('inf'))


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token of each row from (B, vocab) logits. temperature 0 means greedy. generator: the random
    stream to draw from (torch's global one by default)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def _next_logits(decoder, vocab_size):
    logits = decoder.next_logits()
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits[:, vocab_size:] = -float('inf')  # the rows that pad the embedding up to a multiple of 64 are no tokens
    return logits


# ---------------------------------------------------------------------------- sampling and beam search

@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                    use_cache=True, vocab_size=None, generator=None, sync=None):
    """Yield the next token of every row of idx (B, T), as a (B,) tensor, max_new_tokens times.
    vocab_size: only ids below it may be picked (the tokenizer's size, when the model's is padded).
    generator: the random stream of the draws. sync(tokens): the tokens every process goes on with, when several
    run the model together (FSDP: all must run the same forward passes, and stop together)."""
    yield from continue_tokens(Decoder(model, idx, use_cache, max_new_tokens), max_new_tokens, temperature, top_k,
                               top_p, repetition_penalty, vocab_size, generator, sync)


@torch.no_grad()
def continue_tokens(decoder, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                    vocab_size=None, generator=None, sync=None):
    """generate_tokens on a Decoder the caller keeps: a conversation goes on in the same cache, turn after turn.
    Each token is appended to the decoder before it is yielded."""
    for _ in range(max_new_tokens):
        logits = penalise_repetition(_next_logits(decoder, vocab_size), decoder.seq, repetition_penalty)
        token = sample_token(logits, temperature, top_k, top_p, generator)
        if sync is not None:
            token = sync(token)
        decoder.append(token)
        yield token


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
    decoder = Decoder(model, idx.repeat(K, 1), use_cache, max_new_tokens)
    logp = torch.full((K,), -float('inf'), device=idx.device)
    logp[0] = 0.0  # the K beams start as the same prompt: extend only one of them at first
    finished = []
    for step in range(max_new_tokens):
        length = step + 1
        # the penalty applies to the log-probabilities, where transformers' beam search applies its logits processors
        # (penalised logits, then log-softmax, would give other scores and other beams)
        step_logp = penalise_repetition(F.log_softmax(_next_logits(decoder, vocab_size), dim=-1), decoder.seq,
                                        repetition_penalty)  # (K, V)
        V = step_logp.size(-1)
        # 2K candidates: even if the best K all end, K others remain to go on with
        total, flat = (logp[:, None] + step_logp).view(-1).topk(min(2 * K, K * V))
        beam, token = flat // V, flat % V
        ends = token == eot_id if eot_id is not None else torch.zeros_like(token, dtype=torch.bool)
        if length == max_new_tokens:
            ends[:] = True
        for rank in range(min(K, len(total))):
            if ends[rank] and total[rank] > -float('inf'):
                tokens = decoder.seq[beam[rank], T:].tolist() + [token[rank].item()]
                finished.append((total[rank].item() / length ** length_penalty, tokens))
        finished = sorted(finished, key=lambda h: -h[0])[:K]
        live = (~ends).nonzero().flatten()[:K]
        if len(live) == 0:
            break
        logp = total[live]
        if len(live) < K:  # fewer live candidates than beams (a tiny vocabulary): fill with dead rows
            logp = torch.cat((logp, logp.new_full((K - len(live),), -float('inf'))))
            live = torch.cat((live, live[:1].repeat(K - len(live))))
        decoder.reorder(beam[live])
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
    if num_beams > 1:
        rows = [beam_search(model, idx[[b]], max_new_tokens, num_beams, length_penalty, repetition_penalty,
                            eot_id, use_cache)[0][1] for b in range(idx.size(0))]
        n = max(len(r) for r in rows)
        pad = eot_id if eot_id is not None else 0
        new = torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long, device=idx.device)
        return torch.cat((idx, new.view(idx.size(0), n)), dim=1)
    steps, finished = [], torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for token in generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, use_cache):
        if eot_id is not None:
            token = token.masked_fill(finished, eot_id)
            finished |= token == eot_id
        steps.append(token)
        if eot_id is not None and finished.all():
            break
    return torch.cat([idx] + [t[:, None] for t in steps], dim=1)


# ---------------------------------------------------------------------------- text

def _held_back(text, stop):
    """How many characters at the end of text could be the start of a stop string: not shown yet."""
    for n in range(min(len(text), max((len(s) for s in stop), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0


@torch.no_grad()
def generate_text(model, tokenizer, prompt_ids, num_samples=1, max_new_tokens=100, temperature=1.0, top_k=None,
                  top_p=None, repetition_penalty=1.0, num_beams=1, length_penalty=1.0, stop=(), use_cache=True,
                  on_text=None, progress=False, generator=None, sync=None):
    """Complete the prompt (a list of token ids) num_samples times; returns the completions as strings.
    A completion ends after max_new_tokens tokens (without the bytes of a character they cut in two, which a
    byte-level tokenizer can: tokenizer.decode_complete), at the tokenizer's end-of-text token, or just before the
    first of the stop strings; neither the end-of-text nor the stop string is part of it.
    on_text(row, text) receives each completion's new text as soon as it is final: while sampling, it
    streams; beam search only knows its winner at the end. Stop strings cut beam search's winner afterwards.
    generator and sync: see generate_tokens (sampling only)."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    vocab_size = tokenizer.vocab_size
    stop = [s for s in stop if s]
    prompt_text = tokenizer.decode(prompt_ids)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_new_tokens, unit='tok', leave=False, dynamic_ncols=True)

    at_eot = [False] * num_samples  # sampling: the rows the model ended
    if num_beams > 1:
        hypotheses = beam_search(model, idx, max_new_tokens, num_beams, length_penalty, repetition_penalty,
                                 tokenizer.eot_id, use_cache, vocab_size)
        rows = [tokens for _, tokens in hypotheses[:num_samples]]
        if bar is not None:
            bar.update(max_new_tokens)
    else:
        rows = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        shown = [0] * num_samples
        steps = generate_tokens(model, idx.repeat(num_samples, 1), max_new_tokens, temperature, top_k, top_p,
                                repetition_penalty, use_cache, vocab_size, generator, sync)
        for token in steps:
            if bar is not None:
                bar.update(1)
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                if t == tokenizer.eot_id:
                    done[row] = at_eot[row] = True
                    continue
                rows[row].append(t)
                if stop or on_text:
                    # a character cut in two is held back: its rest may come with the next token
                    text = _completion(tokenizer, prompt_ids, rows[row], prompt_text, complete=True)
                    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                    if cut >= 0:
                        done[row] = True
                        text = text[:cut]
                    if on_text:
                        end = len(text) if done[row] else len(text) - _held_back(text, stop)
                        if end > shown[row]:
                            on_text(row, text[shown[row]:end])
                            shown[row] = end
            if all(done):
                steps.close()
                break
    if bar is not None:
        bar.close()

    completions = []
    for row, tokens in enumerate(rows):
        ended = num_beams == 1 and at_eot[row]
        if tokens and tokens[-1] == tokenizer.eot_id:  # beam search's hypotheses keep it
            tokens, ended = tokens[:-1], True
        # cut by max_new_tokens (or a stop string): without a character cut in two; ended by the model: as it is
        text = _completion(tokenizer, prompt_ids, tokens, prompt_text, complete=not ended)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        text = text[:cut] if cut >= 0 else text
        if on_text:
            start = shown[row] if num_beams == 1 else 0
            if len(text) > start:
                on_text(row, text[start:])
        completions.append(text)
    return completions


def _completion(tokenizer, prompt_ids, tokens, prompt_text, complete=False):
    # decoded together with the prompt: some tokenizers (SentencePiece) drop a word's leading space when
    # it is decoded alone. complete: without a character cut in two at the end
    decode = tokenizer.decode_complete if complete else tokenizer.decode
    text = decode(prompt_ids + tokens)
    if text.startswith(prompt_text):
        return text[len(prompt_text):]
    return decode(tokens)
