"""
Decoding on top of model.Decoder (incremental decoding with a KV cache), shared by sample.py, eval.py and
GPT.generate:

- sampling controls: temperature (0 is greedy), top-k, top-p (nucleus), repetition penalty; several
  samples of one prompt are the rows of one batch
- beam search: num_beams, length_penalty; the best length-normalised log-probability wins
- text: generate_text() adds what needs a tokenizer: stop strings, the end-of-text token, streaming
- loading: a model and its tokenizer from a checkpoint folder or from Hugging Face GPT-2 weights
"""
import math
import os

import torch
from torch.nn import functional as F

from model import Decoder


def check_controls(temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0, num_beams=1,
                   length_penalty=1.0, max_new_tokens=1, num_samples=1):
    """Raise ValueError, with a one-line message, on settings that mean nothing."""
    if not temperature >= 0:
        raise ValueError(f'temperature={temperature} is negative: use 0 for greedy decoding or a positive value')
    if top_k is not None and top_k < 0:
        raise ValueError(f'top_k={top_k} is negative: use a positive number of tokens, or 0 / None for no limit')
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f'top_p={top_p} is outside (0, 1]: 1.0 keeps every token, 0.9 the smallest set holding 90% of the probability')
    if not repetition_penalty > 0:
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
    # in float64: summed in float32, the probabilities of a 50,000-token vocabulary carry enough rounding error
    # to move the cut by a token or two
    sorted_logits, order = torch.sort(logits.double(), descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    before = F.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))  # probability of the tokens ranked above each one
    drop_sorted = before >= top_p  # the top token always stays (nothing is ranked above it)
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -float('inf'))


def sample_token(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick the next token of each row from (B, vocab) logits. temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)[:, 0]


def _next_logits(decoder, repetition_penalty, vocab_size):
    logits = decoder.next_logits()
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits[:, vocab_size:] = -float('inf')  # the rows that pad the embedding up to a multiple of 64 are no tokens
    return penalise_repetition(logits, decoder.seq, repetition_penalty)


# ---------------------------------------------------------------------------- sampling and beam search

@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                    use_cache=True, vocab_size=None):
    """Yield the next token of every row of idx (B, T), as a (B,) tensor, max_new_tokens times.
    vocab_size: only ids below it may be picked (the tokenizer's size, when the model's is padded)."""
    decoder = Decoder(model, idx, use_cache, max_new_tokens)
    for _ in range(max_new_tokens):
        token = sample_token(_next_logits(decoder, repetition_penalty, vocab_size), temperature, top_k, top_p)
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
        step_logp = F.log_softmax(_next_logits(decoder, repetition_penalty, vocab_size), dim=-1)  # (K, V)
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
def sequence_score(model, idx, tokens, length_penalty=1.0):
    """The beam score of continuing idx (1, T) by tokens, from one plain forward pass (T + len(tokens)
    must fit block_size): a reference for beam_search."""
    full = torch.cat([idx, torch.tensor([tokens], dtype=torch.long, device=idx.device)], dim=1)
    logits, _ = model(full[:, :-1])
    logp = F.log_softmax(logits.float(), dim=-1)[0, idx.size(1) - 1:]
    return logp.gather(1, full[0, idx.size(1):, None]).sum().item() / len(tokens) ** length_penalty


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
                  on_text=None, progress=False):
    """Complete the prompt (a list of token ids) num_samples times; returns the completions as strings.
    A completion ends after max_new_tokens tokens, at the tokenizer's end-of-text token, or just before
    the first of the stop strings; neither the end-of-text nor the stop string is part of it.
    on_text(row, text) receives each completion's new text as soon as it is final: while sampling, it
    streams; beam search only knows its winner at the end. Stop strings cut beam search's winner afterwards."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    vocab_size = tokenizer.vocab_size
    stop = [s for s in stop if s]
    prompt_text = tokenizer.decode(prompt_ids)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_new_tokens, unit='tok', leave=False, dynamic_ncols=True)

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
                                repetition_penalty, use_cache, vocab_size)
        for token in steps:
            if bar is not None:
                bar.update(1)
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                if t == tokenizer.eot_id:
                    done[row] = True
                    continue
                rows[row].append(t)
                if stop or on_text:
                    text = _completion(tokenizer, prompt_ids, rows[row], prompt_text)
                    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                    if cut >= 0:
                        done[row] = True
                        text = text[:cut]
                    if on_text:
                        # an incomplete UTF-8 character decodes as U+FFFD: wait for the rest of it
                        end = len(text) if done[row] else len(text.rstrip('\ufffd')) - _held_back(text, stop)
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
        if tokens and tokens[-1] == tokenizer.eot_id:
            tokens = tokens[:-1]
        text = _completion(tokenizer, prompt_ids, tokens, prompt_text)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        text = text[:cut] if cut >= 0 else text
        if on_text:
            start = shown[row] if num_beams == 1 else 0
            if len(text) > start:
                on_text(row, text[start:])
        completions.append(text)
    return completions


def _completion(tokenizer, prompt_ids, tokens, prompt_text):
    # decoded together with the prompt: some tokenizers (SentencePiece) drop a word's leading space when
    # it is decoded alone
    text = tokenizer.decode(prompt_ids + tokens)
    if text.startswith(prompt_text):
        return text[len(prompt_text):]
    return tokenizer.decode(tokens)


# ---------------------------------------------------------------------------- loading a model to run

def is_hf_model(source):
    """Whether source names GPT-2 weights to load through transformers: a GPT-2 name, or a folder with a
    Hugging Face config.json and none of our checkpoint.json."""
    from checkpoint import CHECKPOINT_NAME
    from hf_gpt2 import GPT2_NAMES
    return source in GPT2_NAMES or (os.path.isdir(source) and os.path.exists(os.path.join(source, 'config.json'))
                                    and not os.path.exists(os.path.join(source, CHECKPOINT_NAME)))


def load_inference_model(init_from, out_dir='out', device='cpu'):
    """The model to sample from or evaluate, and its tokenizer's description (None if it has none).
    init_from: 'resume' (the checkpoint in out_dir), a GPT-2 name (gpt2, gpt2-medium, gpt2-large,
    gpt2-xl), a Hugging Face GPT-2 folder, or a checkpoint folder. Raises CheckpointError or HFError."""
    import checkpoint
    import hf_gpt2
    if init_from == 'resume' or (os.path.exists(os.path.join(init_from, checkpoint.CHECKPOINT_NAME))
                                 and not is_hf_model(init_from)):
        model, ckpt = checkpoint.load_model(out_dir if init_from == 'resume' else init_from, device)
        return model, ckpt.get('tokenizer')
    model, description = hf_gpt2.load_gpt2(init_from)  # its errors say what init_from should be
    return model.to(device), description
