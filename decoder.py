"""
The decoder: sequences of different prompts continued together, one token per row per step, over a key/value cache
preallocated once. Every project path that decodes goes through it (generate.py's sampling, beam search, chat and
text; sample.py, eval.py, train.py's samples, serve.py).

- StaticCache: keys and values of max_rows rows x max_len positions, allocated once
- BatchDecoder: rows join (add) and leave (finished, cancel) while it runs; each row has its own prompt, length,
  stop, sampling settings and random stream, and gets exactly the tokens it gets decoded alone (but for float
  rounding: a batch multiplies matrices of another shape). A step feeds every active row's newest token at its own
  position in one forward pass of shapes that depend only on the batch (positions are a tensor, not Python ints), so
  it can be compiled once (on a GPU: CUDA graphs, which replay the whole step without Python)
- the context window slides past block_size as it always did here: when a row's window is full it jumps forward by
  half a block (the newest half is kept and refilled once per half block, not every step)
"""
import copy
import math
from collections import namedtuple

import torch
from torch.nn import functional as F

Step = namedtuple('Step', 'row token finished logprob top')


class BatchFull(RuntimeError):
    pass


def compute_dtype(weight):
    """The dtype the model computes in: autocast's where it is on (keys and values come out of the matmuls in
    it, so a cache in float32 would take twice the memory and a cast every step), else the weights'."""
    device_type = weight.device.type
    autocasting = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)  # not on meta
    return torch.get_autocast_dtype(device_type) if autocasting else weight.dtype


# ---------------------------------------------------------------------------- caches

class StaticCache:
    """Keys and values of every layer, each layer's a tensor (max_rows, n_head, max_len, head_dim) of its own (a
    compiled step writes into each in place; in-place writes into slices of one tensor for all layers make
    torch.compile's graph copy it whole). A row of the batch owns one slot; the active rows are the first slots."""

    def __init__(self, config, max_rows, max_len, device, dtype):
        shape = (max_rows, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    @staticmethod
    def bytes_for(config, max_rows, max_len, dtype):
        """The bytes a cache of these sizes takes."""
        return 2 * config.n_layer * max_rows * max_len * config.n_embd * torch.empty((), dtype=dtype).element_size()

    def copy_slot(self, source, target, length):
        """Slot target takes source's first length positions (a row moving down when one before it leaves)."""
        for t in self.k + self.v:
            t[target, :, :length] = t[source, :, :length]

    def gather_slots(self, slots, length):
        """Slots 0.. take the contents of slots (beam search keeping and duplicating its best beams)."""
        for t in self.k + self.v:
            t[:len(slots), :, :length] = t[slots, :, :length]


class PrefillView:
    """One slot of a StaticCache as the model's cache for T new tokens of one row after the past ones it holds (a
    prompt, a chat's next message, a window refilled). Query i sees keys up to past + i."""

    def __init__(self, cache, slot, past):
        self.cache, self.slot, self.past = cache, slot, past

    def positions(self, T):
        return torch.arange(self.past, self.past + T, device=self.cache.k[0].device)

    def attend(self, layer, q, k, v):
        T, end = q.size(2), self.past + q.size(2)
        keys, values = self.cache.k[layer][self.slot:self.slot + 1], self.cache.v[layer][self.slot:self.slot + 1]
        keys[:, :, self.past:end], values[:, :, self.past:end] = k, v
        keys, values = keys[:, :, :end], values[:, :, :end]
        if T == 1:  # one new token sees every key so far
            return F.scaled_dot_product_attention(q, keys, values)
        if self.past == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=self.past)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class StepView:
    """The first n slots of a StaticCache as the model's cache for one new token per row, each row at its own
    position (positions: (n,) tensor). Each row attends over the cache's first span positions, masked past its own.
    The span follows the longest row, so a step reads the cache positions in use, not all max_len of them (on a CPU,
    reading a full cache of 16 rows costs more than reading the weights). at: the one position of every row, where
    they all stand at one (eager only: a Python int): then plain slices and no mask, cheaper per step."""

    def __init__(self, cache, positions, span, at=None):
        self.cache, self.pos, self.span, self.at = cache, positions, span, at
        if at is None:
            self.rows = torch.arange(positions.size(0), device=positions.device)
            self.mask = (torch.arange(span, device=positions.device) <= positions[:, None])[:, None, None, :]

    def positions(self, T):
        return self.pos[:1] if self.at is not None else self.pos[:, None]

    def attend(self, layer, q, k, v):
        n = q.size(0)
        keys, values = self.cache.k[layer], self.cache.v[layer]
        if self.at is not None:
            keys[:n, :, self.at], values[:n, :, self.at] = k[:, :, 0], v[:, :, 0]
            return F.scaled_dot_product_attention(q, keys[:n, :, :self.span], values[:n, :, :self.span])
        keys[self.rows, :, self.pos] = k[:, :, 0]
        values[self.rows, :, self.pos] = v[:, :, 0]
        return F.scaled_dot_product_attention(q, keys[:n, :, :self.span], values[:n, :, :self.span],
                                              attn_mask=self.mask)


def forward_step(model, tokens, positions, cache, span, at=None):
    """Logits (n, vocab) of the next token of the first n slots, given each one's newest token (n, 1) at its
    position (n,). What compile=True compiles."""
    logits, _ = model(tokens, cache=StepView(cache, positions, span, at), last_only=True)
    return logits[:, -1, :]


# ---------------------------------------------------------------------------- sampling a row

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


# ---------------------------------------------------------------------------- the decoder

class Row:
    """One sequence being decoded: its tokens (prompt and generated), its window and its settings."""

    def __init__(self, id, tokens, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator, eot_id,
                 logprobs, block_size):
        self.id, self.tokens, self.max_new_tokens = id, list(tokens), max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty = repetition_penalty
        self.generator, self.eot_id, self.logprobs = generator, eot_id, logprobs
        self.start = max(0, len(self.tokens) - block_size)  # a long prompt keeps its last block_size tokens
        self.cached = 0  # positions of the window (from start) held in the cache
        self.new = 0  # tokens generated

    @property
    def window(self):
        return len(self.tokens) - self.start


class BatchDecoder:
    """Rows of different prompts decoded together. add() a row (its prompt runs through the model when the next step
    needs it), step() gives one token of every active row, each picked with the row's own settings and random
    stream; a row that produced its eot_id or max_new_tokens tokens leaves the batch, cancel() takes one out.
    For beam search and tests, next_logits() / append() / reorder() are the parts a step is made of.

    vocab_size: only ids below it may be picked (the tokenizer's size, when the model's is padded).
    max_len: positions kept per row (at most block_size; less saves memory when prompts and outputs are short).
    use_cache=False recomputes each row's window from scratch every step: the plain reference the cache is tested
    against (and a way around a suspected cache problem). compile: True compiles the one-token step with
    torch.compile (on a GPU with CUDA graphs), 'auto' on a GPU only, or a torch.compile backend to compile with.
    sync(tokens): the tokens every process goes on with, when several run the model together (FSDP: all must run the
    same forward passes and stop together)."""

    def __init__(self, model, max_rows=16, vocab_size=None, max_len=None, use_cache=True, compile=False, sync=None):
        self.model, self.max_rows, self.use_cache, self.sync = model, max_rows, use_cache, sync
        self.block = model.config.block_size
        self.max_len = min(self.block, max_len or self.block)
        self.vocab_size = vocab_size
        weight = model.lm_head.weight
        self.device = weight.device
        if compile == 'auto':
            compile = self.device.type == 'cuda'
        self.compiled = compile is not False and compile is not None
        self.forward_step = forward_step
        if compile is True:
            if self.device.type == 'cuda':  # CUDA graphs: the step replays without Python
                self.forward_step = torch.compile(forward_step, mode='reduce-overhead', dynamic=False)
            else:  # a C++ wrapper around the kernels: less Python per step (~7% faster at batch 1 here)
                self.forward_step = torch.compile(forward_step, dynamic=False, options={'cpp_wrapper': True})
        elif self.compiled:  # a torch.compile backend of the caller's (tests count graphs with one)
            self.forward_step = torch.compile(forward_step, backend=compile, dynamic=False)
        if self.compiled:  # one graph per number of rows and span, each a power of two: let dynamo keep them all
            graphs = (max_rows.bit_length() + 1) * max(1, self.max_len.bit_length() - 5)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs + 1)
        self.cache = StaticCache(model.config, max_rows, self.max_len, self.device, compute_dtype(weight)) \
            if use_cache else None
        if self.compiled and self.cache is not None and self.device.type == 'cuda':
            # the cache is written in place by every step: CUDA graphs replay it only at a fixed address
            for t in self.cache.k + self.cache.v:
                torch._dynamo.mark_static_address(t)
        self.rows = []  # the active rows, in slot order
        self.next_id = 0

    # -- rows joining and leaving

    @property
    def free_rows(self):
        return self.max_rows - len(self.rows)

    def tokens(self):
        """Every active row's tokens so far (prompt and generated), in slot order."""
        return [row.tokens for row in self.rows]

    def add(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
            seed=None, eot_id=None, logprobs=0, generator=None):
        """A new row continuing prompt_ids (at least one token); returns its id. seed: the row's own random stream
        (generator: one the caller keeps instead). Raises ValueError on bad settings, BatchFull without a free row."""
        check_controls(temperature, top_k, top_p, repetition_penalty, max_new_tokens=max_new_tokens)
        if len(prompt_ids) == 0:
            raise ValueError('the prompt is empty: give at least one token (e.g. the end-of-text token)')
        if self.free_rows == 0:
            raise BatchFull(f'all {self.max_rows} rows of the batch are decoding: wait for one to finish')
        if generator is None and temperature > 0:
            generator = torch.Generator(self.device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(2 ** 62, ()).item()))
        row = Row(self.next_id, prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator,
                  eot_id, logprobs, self.block)
        self.next_id += 1
        self.rows.append(row)
        return row.id

    def cancel(self, row_id):
        """Take a row out of the batch (a client went away); unknown or finished rows are ignored."""
        for slot, row in enumerate(self.rows):
            if row.id == row_id:
                self._remove(slot)
                return

    def _remove(self, slot):
        last = len(self.rows) - 1
        if slot != last and self.cache is not None:  # the last row moves down: the active rows stay the first slots
            self.cache.copy_slot(last, slot, self.rows[last].cached)
        self.rows[slot] = self.rows[last]
        self.rows.pop()

    # -- the parts of a step

    @torch.no_grad()
    def next_logits(self):
        """The float32 logits (rows, vocab) of every active row's next token, in slot order."""
        if not self.rows:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        with torch.inference_mode():  # a few percent cheaper per step than no_grad alone
            logits = self._cached_logits() if self.use_cache else self._plain_logits()
        logits = logits.float().clone()  # outside inference mode: an ordinary tensor callers may change in place
        if self.vocab_size is not None and self.vocab_size < logits.size(-1):
            logits[:, self.vocab_size:] = -float('inf')  # rows padding the embedding to a multiple of 64: no tokens
        return logits

    def _plain_logits(self):
        rows = []
        for row in self._slide_windows():
            tokens = torch.tensor([row.tokens[row.start:]], dtype=torch.long, device=self.device)
            rows.append(self.model(tokens, last_only=True)[0][0, -1])
        return torch.stack(rows)

    def _slide_windows(self):
        for row in self.rows:
            if row.window > self.block:  # the window is full: jump forward by half a block, refill it
                row.start, row.cached = len(row.tokens) - self.block // 2, 0
            elif row.window > self.max_len:
                raise ValueError(f'a row of {row.window} tokens does not fit the decoder made for {self.max_len}: '
                                 f'make it with a larger max_len')
        return self.rows

    def _cached_logits(self):
        rows = self._slide_windows()
        logits = [None] * len(rows)
        stepping = [slot for slot, row in enumerate(rows) if row.window - row.cached == 1]
        for slot, row in enumerate(rows):
            if row.window - row.cached > 1:  # new tokens to run through (a prompt, a message): this row alone
                tokens = torch.tensor([row.tokens[row.start + row.cached:]], dtype=torch.long, device=self.device)
                out, _ = self.model(tokens, cache=PrefillView(self.cache, slot, row.cached), last_only=True)
                logits[slot] = out[0, -1]
                row.cached = row.window
        if len(stepping) == len(rows):  # the usual step: every row has one new token, one forward pass for all
            tokens, positions = [[row.tokens[-1]] for row in rows], [row.cached for row in rows]
            longest = max(positions) + 1
            if self.compiled:
                # a graph per shape: the rows padded to a power of two (the padding rows are free slots, which write
                # at their position 0 and are refilled when a row takes them), the span rounded up to a power of two
                n = min(self.max_rows, _power_of_two(len(rows)))
                tokens, positions = tokens + [[0]] * (n - len(rows)), positions + [0] * (n - len(rows))
                span, at = min(self.max_len, _power_of_two(max(longest, 64))), None
            else:  # eager: the positions in use exactly; no mask where all rows stand at one position
                span, at = longest, longest - 1 if all(p + 1 == longest for p in positions) else None
            out = self.forward_step(self.model, torch.tensor(tokens, dtype=torch.long, device=self.device),
                                    torch.tensor(positions, dtype=torch.long, device=self.device), self.cache, span, at)
            for row in rows:
                row.cached += 1
            return out[:len(rows)]
        for slot in stepping:  # rows that still wait for their step while others were prefilled: one by one
            row = rows[slot]
            tokens = torch.tensor([[row.tokens[-1]]], dtype=torch.long, device=self.device)
            out, _ = self.model(tokens, cache=PrefillView(self.cache, slot, row.cached), last_only=True)
            logits[slot] = out[0, -1]
            row.cached += 1
        return torch.stack(logits)

    def append(self, tokens):
        """One more token for each active row (a (rows,) tensor or list), or a list of token lists: several (a
        chat's next message; they run through the model at the next step)."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        for row, new in zip(self.rows, tokens):
            row.tokens.extend(new if isinstance(new, list) else [new])

    def reorder(self, slots):
        """The active rows become copies of the rows in the given slots (beam search's surviving beams, which may
        repeat). Rows beyond len(slots) leave."""
        if self.cache is not None:
            self.cache.gather_slots(torch.tensor(slots, device=self.device), max(r.cached for r in self.rows))
        old, self.rows = self.rows, []
        for slot in slots:
            row = copy.copy(old[slot])  # settings, window and counts as they are; a new id and a token list of its own
            row.id, row.tokens = self.next_id, list(row.tokens)
            self.next_id += 1
            self.rows.append(row)

    # -- a step

    @torch.no_grad()
    def step(self):
        """One token for every active row: a list of Step(row, token, finished, logprob, top). finished: the row
        produced its eot_id (token is it) or its max_new_tokens-th token, and has left the batch. logprob: the
        token's log-probability under the model (before temperature, top-k, top-p and the repetition penalty); top:
        the row's `logprobs` likeliest tokens as [(token, logprob)], or None where it asked for none."""
        logits = self.next_logits()
        chosen = self._choose(logits)
        if self.sync is not None:
            chosen = self.sync(torch.tensor(chosen, device=self.device)).tolist()
        logp = F.log_softmax(logits, dim=-1) if any(r.logprobs for r in self.rows) else None
        steps = []
        for slot, (row, token) in enumerate(zip(self.rows, chosen)):
            row.tokens.append(token)
            row.new += 1
            finished = token == row.eot_id or row.new >= row.max_new_tokens
            logprob = top = None
            if row.logprobs:
                logprob = logp[slot, token].item()
                values, ids = logp[slot].topk(min(row.logprobs, logp.size(-1)))
                top = list(zip(ids.tolist(), values.tolist()))
            steps.append(Step(row.id, token, finished, logprob, top))
        for slot in reversed(range(len(self.rows))):
            if steps[slot].finished:
                self._remove(slot)
        return steps

    def _choose(self, logits):
        """Each row's next token from its logits, with its settings and random stream: exactly the draw it makes
        alone (each row draws from its own generator, one row at a time)."""
        chosen = logits.argmax(dim=-1).tolist()  # greedy rows: one argmax for all
        for slot, row in enumerate(self.rows):
            if row.temperature == 0 and row.repetition_penalty == 1.0:
                continue
            row_logits = logits[slot:slot + 1]
            if row.repetition_penalty != 1.0:
                seen = torch.tensor([row.tokens], dtype=torch.long, device=self.device)
                row_logits = penalise_repetition(row_logits, seen, row.repetition_penalty)
            chosen[slot] = sample_token(row_logits, row.temperature, row.top_k, row.top_p, row.generator).item()
        return chosen


def _power_of_two(n):
    """The smallest power of two of at least n."""
    return 1 << (n - 1).bit_length()
