"""
Many clients, one model (serve.py's engine): every request's rows are decoded together, as the rows of one
decoder.BatchDecoder, instead of one request after another. A background thread owns the model and its decoder:

    waiting rows --admit while rows are free--> the batch --step: one token for every row--> each row's TextStream
        --> its request's events (text as it becomes final, the tokens' log-probabilities, why it finished)

A request (Job) is a prompt or several, each continued n times (its Choices, one row each). The thread never blocks
on a client: it hands events to job.emit, which the HTTP side (openai_api.py) passes to the client's connection. A
client that goes away sets job.cancelled, and its rows leave the batch before the next step.
"""
import sys
import threading
import traceback
from collections import deque

import torch
from torch.nn import functional as F

from decoder import BatchDecoder
from generate import TextStream


class Choice:
    """One row of a request: a prompt continued once, with its own seed."""

    def __init__(self, index, prompt_index, prompt_ids, seed):
        self.index, self.prompt_index, self.prompt_ids, self.seed = index, prompt_index, prompt_ids, seed


class Job:
    """One request: prompts (lists of token ids) each continued n times, with the decoding settings (those of
    BatchDecoder.add), stop strings, and what to report. Choice i*n + j continues prompt i with seed + j, as row j of
    sample.py's batch draws with seed + j. emit(event) is called from the decoding thread with a dict:
    {'choice', 'text', 'tokens'}: new final text, and the tokens decoded since the last event, as (id, logprob,
    [(id, logprob)] of the logprobs likeliest or None); with echo, first the prompt's text, with 'echo': True and,
    with logprobs, its tokens (score_prompt's records);
    {'choice', 'finish_reason'}: 'stop' (the end-of-text token or a stop string) or 'length' (max_new_tokens);
    {'error', 'status'}: the request failed (the message is for the client: no traceback)."""

    def __init__(self, prompts, n, settings, emit, stop=(), eot_id=None, logprobs=None, echo=False):
        self.settings, self.emit, self.stop, self.eot_id = settings, emit, list(stop), eot_id
        self.logprobs, self.echo = logprobs, echo  # logprobs: None, or how many likeliest tokens to report (0-5)
        seed = settings.get('seed')
        self.choices = [Choice(i * n + j, i, ids, None if seed is None else seed + j)
                        for i, ids in enumerate(prompts) for j in range(n)]
        self.prompt_scores = {}  # prompt index -> its tokens' log-probabilities (echo with logprobs)
        self.cancelled = False  # set by the HTTP side when the client is gone


class _Row:
    def __init__(self, job, choice, stream):
        self.job, self.choice, self.stream = job, choice, stream


@torch.no_grad()
def score_prompt(model, ids, top=0):
    """Each token of ids as (id, its log-probability given the tokens before it, [(id, logprob)] of the top likeliest
    tokens there), the first as (id, None, None), having no context: one forward pass over the prompt, what the
    completions API's echo with logprobs reports. ids must fit the model's block_size."""
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    with torch.inference_mode():
        logits, _ = model(idx)
    logp = F.log_softmax(logits[0, :-1].float(), dim=-1)  # position t predicts token t + 1
    chosen = logp.gather(1, idx[0, 1:, None])[:, 0].tolist()
    tops = [[] for _ in chosen]
    if top:
        values, tokens = logp.topk(min(top, logp.size(-1)), dim=-1)
        tops = [list(zip(t, v)) for t, v in zip(tokens.tolist(), values.tolist())]
    return [(ids[0], None, None)] + [(t, lp, tp) for t, lp, tp in zip(ids[1:], chosen, tops)]


class Scheduler:
    """Owns one model's BatchDecoder in a background thread (start()): submit(job) queues a request's rows."""

    def __init__(self, model, tokenizer, max_rows=16, autocast=None, name='model'):
        self.model, self.tokenizer, self.max_rows, self.name = model, tokenizer, max_rows, name
        self.autocast = autocast  # a context manager factory: autocast is per thread, so it is entered in the thread
        self.decoder = BatchDecoder(model, max_rows, vocab_size=tokenizer.vocab_size)
        self.waiting = deque()  # (job, choice) not yet in the batch
        self.rows = {}  # the decoder's row id -> _Row
        self.tokens_decoded = 0  # since start, every row's: for /health, and to see rows leave when clients go
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f'decode {name}', daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, prompts, n, settings, emit, stop=(), eot_id=None, logprobs=None, echo=False):
        """Queue a request (the arguments of Job); returns its Job, whose cancelled the caller may set."""
        job = Job(prompts, n, settings, emit, stop, eot_id, logprobs, echo)
        with self.wake:
            self.waiting.extend((job, choice) for choice in job.choices)
            self.wake.notify()
        return job

    def poke(self):
        """Wake the thread (a job was cancelled: its rows should leave now, not at the next step)."""
        with self.wake:
            self.wake.notify()

    def health(self):
        return {'busy_rows': len(self.rows), 'waiting_rows': len(self.waiting), 'tokens_decoded': self.tokens_decoded}

    def _run(self):
        with self.autocast() if self.autocast else torch.no_grad():
            while True:
                with self.wake:
                    while not self.rows and not self.waiting:
                        self.wake.wait()
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.rows:
                        self._step()
                except Exception as e:  # a bug, or out of memory: the batch's requests fail, the server goes on
                    for row in {id(r.job): r for r in self.rows.values()}.values():
                        self._fail(row.job, e)
                    self.rows.clear()
                    self.decoder = BatchDecoder(self.model, self.max_rows, vocab_size=self.tokenizer.vocab_size)

    def _drop_cancelled(self):
        with self.wake:
            if any(job.cancelled for job, _ in self.waiting):
                self.waiting = deque((job, choice) for job, choice in self.waiting if not job.cancelled)
        for row_id, row in list(self.rows.items()):
            if row.job.cancelled:
                self.decoder.cancel(row_id)
                del self.rows[row_id]

    def _admit(self):
        while self.decoder.free_rows > 0:
            with self.wake:
                if not self.waiting:
                    return
                job, choice = self.waiting.popleft()
            if job.cancelled:
                continue
            try:
                self._start(job, choice)
            except Exception as e:  # a bug, or out of memory: this request fails, the server goes on
                self._fail(job, e)

    def _start(self, job, choice):
        s = job.settings
        if job.echo:
            records = None
            if job.logprobs is not None:
                if choice.prompt_index not in job.prompt_scores:
                    job.prompt_scores[choice.prompt_index] = score_prompt(self.model, choice.prompt_ids, job.logprobs)
                records = job.prompt_scores[choice.prompt_index]
            job.emit({'choice': choice.index, 'text': self.tokenizer.decode(choice.prompt_ids), 'tokens': records,
                      'echo': True})
        if s['max_new_tokens'] == 0:  # scoring only (echo): nothing to decode
            job.emit({'choice': choice.index, 'finish_reason': 'length'})
            return
        # logprobs=0 asks for the chosen tokens' log-probabilities alone: the decoder reports them with a top of 1
        top = 0 if job.logprobs is None else max(1, job.logprobs)
        row_id = self.decoder.add(choice.prompt_ids, s['max_new_tokens'], s['temperature'], s['top_k'], s['top_p'],
                                  s['repetition_penalty'], choice.seed, job.eot_id, top)
        self.rows[row_id] = _Row(job, choice, TextStream(self.tokenizer, choice.prompt_ids, job.stop))

    def _step(self):
        steps = self.decoder.step()
        self.tokens_decoded += len(steps)
        for step in steps:
            row = self.rows.get(step.row)
            if row is None:
                continue
            job, index = row.job, row.choice.index
            ended_by_model = step.finished and step.token == job.eot_id
            text, tokens = '', []
            if not ended_by_model:
                text = row.stream.push(step.token)
                top = None if job.logprobs is None else step.top[:job.logprobs]
                tokens = [(step.token, step.logprob, top)]
            reason = 'stop' if ended_by_model or row.stream.done else 'length' if step.finished else None
            if reason:
                text += row.stream.finish(ended_by_model)
                if not step.finished:
                    self.decoder.cancel(step.row)  # a stop string: the row leaves before its end
                del self.rows[step.row]
            if text or tokens:
                job.emit({'choice': index, 'text': text, 'tokens': tokens or None})
            if reason:
                job.emit({'choice': index, 'finish_reason': reason})

    def _fail(self, job, error):
        job.cancelled = True
        if isinstance(error, ValueError):  # settings the decoder refused: the client's to fix
            job.emit({'error': str(error), 'status': 400})
            return
        print(f'serve.py: a request to {self.name} failed:', file=sys.stderr)
        traceback.print_exception(error)  # for the server's log; the client gets one line
        job.emit({'error': f'the server failed on this request ({type(error).__name__}); it is logged', 'status': 500})
