"""
Figures of generated text, for judging a model by its samples as well as by its loss: how varied they are, how
much they repeat themselves, how much they copy the training text. eval.py --samples=N prints them per model.

Everything is counted in words (runs of letters and digits, or single punctuation marks), so models with
different tokenizers are measured alike:
- distinct-n: distinct n-grams over all n-grams of all samples (Li et al. 2016); low means repetitive
- repeated n-grams: the share of each sample's n-grams that already occurred earlier in the same sample
- longest repeat: the longest run of words that occurs twice in a sample (the two may overlap)
- copied n-grams: the share of the samples' n-grams found verbatim in the training text (memorisation)
- self-perplexity: the model's perplexity on its own samples (in tokens)
"""
import math
import re

WORD = re.compile(r'\w+|[^\w\s]')


def words(text):
    return WORD.findall(text)


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct(samples, n):
    """Distinct n-grams over all n-grams of all samples (lists of words); None where there are none."""
    grams = [g for sample in samples for g in ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_share(sample, n=4):
    """The share of the sample's n-grams that already occurred earlier in it; None if it has none."""
    seen, repeats, grams = set(), 0, ngrams(sample, n)
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else None


def longest_repeat(sample):
    """The length in words of the longest run of words that occurs at least twice in the sample (overlaps count):
    the longest common prefix of two suffixes, found by sorting the suffixes."""
    suffixes = sorted(range(len(sample)), key=lambda i: sample[i:])
    best = 0
    for a, b in zip(suffixes, suffixes[1:]):
        n = 0
        while a + n < len(sample) and b + n < len(sample) and sample[a + n] == sample[b + n]:
            n += 1
        best = max(best, n)
    return best


def ngram_set(text, n=8):
    """The n-grams of a (training) text, to look samples up in."""
    return set(ngrams(words(text), n))


def copied_share(samples, train_ngrams, n=8):
    """The share of all the samples' n-grams found in train_ngrams; None if the samples have none."""
    grams = [g for sample in samples for g in ngrams(sample, n)]
    return sum(g in train_ngrams for g in grams) / len(grams) if grams else None


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def quality(texts, train_ngrams=None):
    """The figures of a list of generated texts, as a dict (None where a figure cannot be computed)."""
    samples = [words(t) for t in texts]
    figures = {f'distinct-{n}': distinct(samples, n) for n in (1, 2, 3, 4)}
    figures['repeated 4-grams'] = mean(repeated_share(s) for s in samples)
    figures['longest repeat'] = max((longest_repeat(s) for s in samples), default=None)
    figures['copied 8-grams'] = copied_share(samples, train_ngrams) if train_ngrams is not None else None
    return figures


def self_perplexity(model, prompt, samples):
    """The model's perplexity on its own samples (lists of token ids that followed the token ids of prompt): exp of
    the mean loss of the sampled tokens, each given the prompt and the sample before it. Low: the model finds its
    text predictable (often: repetitive); high: it wanders. None if the samples hold no token."""
    from multiple_choice import choice_logprobs  # a continuation's log-likelihood; it brings torch, which only this needs
    samples = [sample for sample in samples if sample]
    if not samples:
        return None
    logprobs = choice_logprobs(model, [(prompt, sample) for sample in samples], model.config.block_size,
                               device=next(model.parameters()).device)
    return math.exp(-sum(logprobs) / sum(map(len, samples)))
