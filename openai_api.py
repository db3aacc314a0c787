"""
The HTTP side of serve.py: the subset of OpenAI's API that clients use, over FastAPI.

    GET  /v1/models              the models given at start
    POST /v1/completions         prompt(s) -> text: max_tokens, temperature, top_p, top_k (ours), repetition_penalty
                                 (ours), stop, seed, n, stream (server-sent events), logprobs and echo as the legacy
                                 completions API defines them (what evaluation harnesses use to score a text)
    POST /v1/chat/completions    messages -> a reply, for chat fine-tunes (their template)
    GET  /                       the playground page
    GET  /health                 requests open, rows busy and waiting, tokens decoded

Each request is checked whole before it reaches the model: a bad one gets a 4xx with OpenAI's error object, in one
sentence that says what to change. Decoding itself is serving.Scheduler's (one per model), handed in by serve.py.
"""
import asyncio
import hmac
import json
import math
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dataset import normalize_unicode
from tokenizer import CHAT_ROLES, ChatTokenizer, UnknownCharactersError

MAX_LOGPROBS = 5  # the legacy API's limit on logprobs
MAX_STOP = 4  # and on stop strings


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status, message, param=None, code=None):
    kind = {401: 'authentication_error', 404: 'invalid_request_error', 429: 'rate_limit_error'}.get(
        status, 'invalid_request_error' if status < 500 else 'server_error')
    return JSONResponse({'error': {'message': message, 'type': kind, 'param': param, 'code': code}}, status)


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # a request's JSON
    max_tokens: int = 512  # the most tokens one choice may ask for
    max_n: int = 8  # choices per request (prompts x n)
    max_requests: int = 64  # requests being decoded or waiting, streams included: more get a 429


@dataclass
class ServedModel:
    id: str
    tokenizer: object
    block_size: int
    scheduler: object  # serving.Scheduler
    normalize: str = 'NFC'  # prompts in the Unicode form the training text was prepared in, as sample.py does

    @property
    def chat(self):
        return isinstance(self.tokenizer, ChatTokenizer)


# ---------------------------------------------------------------------------- reading a request

async def read_json(request, limit):
    """The request's JSON object; 413 past limit bytes (counted as they arrive: a Content-Length can lie or be
    missing), 400 for anything but a JSON object."""
    length = request.headers.get('content-length')
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f'the request body is over the limit of {limit} bytes (or its Content-Length is not a number)')
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f'the request body is over the limit of {limit} bytes')
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]] nested deeper than Python's stack
        raise ApiError(400, 'the request body is not valid JSON') from None
    if not isinstance(data, dict):
        raise ApiError(400, 'the request body must be a JSON object, e.g. {"model": ..., "prompt": "Hello"}')
    return data


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def integer(body, key, default, lo, hi):
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value) or not lo <= value <= hi:
        raise ApiError(400, f'{key}={json.dumps(value)[:40]} must be an integer from {lo} to {hi}', key)
    return value


def number(body, key, default, lo, hi, lo_open=False):
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not (
            lo < value <= hi if lo_open else lo <= value <= hi):
        raise ApiError(400, f'{key}={json.dumps(value)[:40]} must be a number in {"(" if lo_open else "["}{lo}, {hi}]',
                       key)
    return float(value)


def boolean(body, key, default=False):
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f'{key} must be true or false', key)
    return value


def stop_strings(body):
    stop = body.get('stop')
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f'stop must be a non-empty string or a list of at most {MAX_STOP} of them', 'stop')
    return stop


def not_supported(body, defaults):
    """Fields of OpenAI's API this server cannot honour: an error rather than an answer that ignores them."""
    for key, default in defaults.items():
        if body.get(key) not in (None, default):
            raise ApiError(400, f'{key} is not supported by this server (leave it out)', key)


def sampling(body, max_tokens):
    """The decoding settings of BatchDecoder.add, checked."""
    top_k = integer(body, 'top_k', 0, 0, 1 << 30)
    top_p = number(body, 'top_p', 1.0, 0, 1, lo_open=True)
    seed = integer(body, 'seed', None, 0, (1 << 63) - 1)
    return dict(max_new_tokens=max_tokens, temperature=number(body, 'temperature', 1.0, 0, 2),
                top_k=top_k or None, top_p=None if top_p == 1.0 else top_p,
                repetition_penalty=number(body, 'repetition_penalty', 1.0, 0, 10, lo_open=True), seed=seed)


def encode(served, text, param='prompt'):
    """A text's token ids, as sample.py encodes a prompt; 400 for characters or words the vocabulary lacks."""
    tok = served.tokenizer
    text = normalize_unicode(text, served.normalize)
    try:
        ids = tok.encode(text)
    except UnknownCharactersError as e:
        raise ApiError(400, f"the {param} has {len(e.chars)} character(s) model {served.id} does not know: "
                            f"{', '.join(map(repr, e.chars[:10]))}", param) from None
    words = tok.unknown_words(text)
    if words:
        raise ApiError(400, f"the {param} has {len(words)} word(s) model {served.id} does not know: "
                            f"{', '.join(map(repr, words[:10]))}", param)
    return ids


def prompts_of(served, body):
    """The prompts of a completions request, as lists of token ids: a string, a list of strings, a list of token
    ids, or a list of lists of token ids."""
    prompt = body.get('prompt')
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, 'prompt must be a string, a list of strings, a list of token ids or a list of such '
                            'lists', 'prompt')
    ids = []
    for p in prompts:
        if isinstance(p, str):
            p = encode(served, p)
            if not p:
                if served.tokenizer.eot_id is None:
                    raise ApiError(400, 'the prompt is empty (and this model has no end-of-text token to start '
                                        'from): give some text', 'prompt')
                p = [served.tokenizer.eot_id]  # GPT-2's way to start from nothing: a fresh document
        elif not p or not all(_is_int(t) and 0 <= t < served.tokenizer.vocab_size for t in p):
            raise ApiError(400, f'a prompt of token ids must be a non-empty list of integers from 0 to '
                                f'{served.tokenizer.vocab_size - 1}', 'prompt')
        ids.append(p)
    return ids


def check_context(served, prompt_ids):
    """400 for a prompt longer than the model's context. A completion may go past it: the decoder's window slides
    (by half a block when full, as sample.py's does)."""
    longest = max(map(len, prompt_ids))
    if longest > served.block_size:
        raise ApiError(400, f"model {served.id}'s context is {served.block_size} tokens and the prompt has {longest}: "
                            f'shorten it', 'prompt', 'context_length_exceeded')


def chat_prompt(served, body):
    """The ids of a conversation in the model's chat template, ending where the assistant's reply starts."""
    if not served.chat:
        raise ApiError(400, f'model {served.id} has no chat template (it is not a chat fine-tune, see prepare_chat.py): '
                            f'use /v1/completions', 'model', 'model_not_chat')
    messages = body.get('messages')
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, 'messages must be a non-empty list of {"role": ..., "content": ...}', 'messages')
    ids = []
    for m in messages:
        content = m.get('content') if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str)
                       for p in content):
                raise ApiError(400, 'a message\'s content parts must all be {"type": "text", "text": ...}',
                               'messages')
            content = ''.join(p['text'] for p in content)
        if not isinstance(m, dict) or m.get('role') not in CHAT_ROLES or not isinstance(content, str):
            raise ApiError(400, f'each message must be an object with a role ({", ".join(CHAT_ROLES)}) and a text '
                                f'content', 'messages')
        marker = served.tokenizer.marker_ids[m['role']]
        ids += marker + encode(served, content, 'messages') + [served.tokenizer.end_id]
    return ids + served.tokenizer.marker_ids['assistant']


# ---------------------------------------------------------------------------- results

class Collected:
    """One choice's text and token records as they arrive; its legacy logprobs object."""

    def __init__(self, tokenizer, context_ids):
        self.tokenizer, self.ids = tokenizer, list(context_ids)  # ids: what text_offset counts from
        self.text, self.records = '', []

    def add(self, event):
        self.text += event.get('text', '')
        self.records += event.get('tokens') or []

    def logprobs(self, records):
        """The legacy completions API's logprobs of records [(id, logprob, top)]; text_offset counts characters
        from the prompt's start."""
        decode = self.tokenizer.decode
        out = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
        for token, logprob, top in records:
            out['text_offset'].append(len(self.tokenizer.decode_complete(self.ids)) if self.ids else 0)
            self.ids.append(token)
            out['tokens'].append(decode([token]))
            out['token_logprobs'].append(finite(logprob))
            out['top_logprobs'].append(None if top is None else {decode([t]): finite(lp) for t, lp in top})
        return out


def finite(logprob):
    """JSON has no -Infinity (a token the model gives no probability at all): OpenAI's stand-in for it."""
    return logprob if logprob is None or math.isfinite(logprob) else -9999.0


def new_id(prefix):
    return f'{prefix}-{uuid.uuid4().hex[:24]}'


class EventStream(StreamingResponse):
    """Server-sent events whose on_close runs however the response ends: finished, failed, or cut off by the client
    (Starlette then cancels the stream, perhaps before the generator ever ran, so its own finally cannot be relied
    on to free the request's slot)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def queued(first, events):
    """first and the events queued behind it, where one choice's new text follows its own: joined into one. A client
    that reads slower than the batch decodes (many clients on few cores) gets fewer, longer chunks instead of one
    chunk a token, whose sending would take the cores from decoding."""
    out = [first]
    while not events.empty():
        event, last = events.get_nowait(), out[-1]
        if 'text' in event and 'text' in last and event['choice'] == last['choice'] and not event.get('echo') \
                and not last.get('echo'):
            out[-1] = {'choice': last['choice'], 'text': last['text'] + event['text'],
                       'tokens': (last['tokens'] or []) + (event['tokens'] or [])}
        else:
            out.append(event)
    return out


def sse(data):
    return f'data: {json.dumps(data)}\n\n'


# ---------------------------------------------------------------------------- the app

def make_app(models, limits=None, api_key=None, page=None):
    """models: {id: ServedModel}, in the order given at start (the first is the default). api_key: required as
    'Authorization: Bearer KEY' on /v1 when set. page: the playground's HTML."""
    limits = limits or Limits()
    app = FastAPI(title='nanoGPT', docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    state = {'open': 0}  # requests in flight

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        message = {404: f'no such endpoint: {request.method} {request.url.path}',
                   405: f'{request.method} is not allowed on {request.url.path}'}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, message)

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug: the client gets one line, the log the traceback (uvicorn's)
        return error_response(500, f'the server failed on this request ({type(e).__name__})')

    def authorize(request):
        if api_key is None:
            return
        given = request.headers.get('authorization', '')
        if not hmac.compare_digest(given.encode(), f'Bearer {api_key}'.encode()):
            raise ApiError(401, 'a valid API key is required: send "Authorization: Bearer KEY" (the --api_key the '
                                'server was started with)', code='invalid_api_key')

    def model_of(body):
        name = body.get('model', next(iter(models)))
        if not isinstance(name, str) or name not in models:
            raise ApiError(404, f'the model {json.dumps(name)[:80]} is not served here; served: {", ".join(models)}',
                           'model', 'model_not_found')
        return models[name]

    def describe(served):
        return {'id': served.id, 'object': 'model', 'created': created, 'owned_by': 'nanogpt',
                'chat': served.chat, 'context_length': served.block_size}

    @app.get('/', response_class=HTMLResponse)
    async def playground():
        if page is None:
            raise HTTPException(404)
        return page

    @app.get('/health')
    async def health(request: Request):
        """What the server is doing: requests open, and per model its rows in the batch and waiting for one."""
        authorize(request)
        return {'status': 'ok', 'open_requests': state['open'],
                'models': {m.id: m.scheduler.health() for m in models.values()}}

    @app.get('/v1/models')
    async def list_models(request: Request):
        authorize(request)
        return {'object': 'list', 'data': [describe(m) for m in models.values()]}

    @app.get('/v1/models/{name:path}')
    async def get_model(name: str, request: Request):
        authorize(request)
        return describe(model_of({'model': name}))


    def submit(served, prompts, n, settings, stop, eot_id, logprobs=None, echo=False):
        """Hand a request to its model's scheduler; returns the job, its queue of events, and close() (frees the
        request's slot and takes its rows out of the batch, if they are still there: call it however it ends)."""
        if state['open'] >= limits.max_requests:
            raise ApiError(429, f'the server is busy ({limits.max_requests} requests open): retry shortly',
                           code='too_many_requests')
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):  # from the decoding thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is stopping
                pass

        state['open'] += 1
        job = served.scheduler.submit(prompts, n, settings, emit, stop, eot_id, logprobs, echo)
        closed = []

        def close():
            if not closed:
                closed.append(True)
                state['open'] -= 1
                job.cancelled = True
                served.scheduler.poke()
        return job, events, close

    async def collect(request, job, events, close):
        """Wait for every choice of a job (not streamed); a client that hangs up meanwhile cancels it."""
        async def watch():  # the body is read: the next message is the disconnect
            while (await request.receive())['type'] != 'http.disconnect':
                pass
            close()
            events.put_nowait({'error': 'the client went away', 'status': 499})

        watcher = asyncio.create_task(watch())
        try:
            results, left = [[] for _ in job.choices], len(job.choices)
            while left:
                event = await events.get()
                if 'error' in event:
                    raise ApiError(event['status'], event['error'])
                results[event['choice']].append(event)
                left -= 'finish_reason' in event
            return results
        finally:
            watcher.cancel()
            close()

    def usage(prompts, n, completion_tokens):
        prompt_tokens = sum(map(len, prompts)) * n
        return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
                'total_tokens': prompt_tokens + completion_tokens}

    def include_usage(body):
        options = body.get('stream_options')
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, 'stream_options must be an object, e.g. {"include_usage": true}', 'stream_options')
        return boolean(options or {}, 'include_usage')

    async def stream_events(job, events, chunk, finish_chunk, usage_chunk):
        """The server-sent events of a job: chunk(index, event) for new text, finish_chunk(index, reason) at each
        choice's end, usage_chunk(completion_tokens) (or None) at the very end, then [DONE]."""
        left, generated = len(job.choices), 0
        while left:
            for event in queued(await events.get(), events):
                if 'error' in event:
                    kind = 'invalid_request_error' if event['status'] < 500 else 'server_error'
                    yield sse({'error': {'message': event['error'], 'type': kind, 'param': None, 'code': None}})
                    return
                if 'finish_reason' in event:
                    left -= 1
                    data = finish_chunk(event['choice'], event['finish_reason'])
                else:
                    generated += 0 if event.get('echo') else len(event.get('tokens') or [])
                    data = chunk(event['choice'], event)
                if data is not None:
                    yield sse(data)
        last = usage_chunk(generated)
        if last is not None:
            yield sse(last)
        yield 'data: [DONE]\n\n'

    @app.post('/v1/completions')
    async def completions(request: Request):
        authorize(request)
        body = await read_json(request, limits.max_body_bytes)
        served = model_of(body)
        not_supported(body, {'best_of': 1, 'suffix': None, 'logit_bias': {}, 'presence_penalty': 0,
                             'frequency_penalty': 0})
        n = integer(body, 'n', 1, 1, limits.max_n)
        max_tokens = integer(body, 'max_tokens', 16, 0, limits.max_tokens)
        stop, stream, echo = stop_strings(body), boolean(body, 'stream'), boolean(body, 'echo')
        logprobs = integer(body, 'logprobs', None, 0, MAX_LOGPROBS)
        with_usage = include_usage(body)
        prompts = prompts_of(served, body)
        if len(prompts) * n > limits.max_n:
            raise ApiError(400, f'{len(prompts)} prompts x n={n} is more than the {limits.max_n} completions one '
                                f'request may ask for', 'n')
        check_context(served, prompts)
        settings = sampling(body, max_tokens)
        job, events, close = submit(served, prompts, n, settings, stop, served.tokenizer.eot_id, logprobs, echo)
        head = {'id': new_id('cmpl'), 'object': 'text_completion', 'created': int(time.time()), 'model': served.id}
        # what text_offset counts from: the prompt's start, whether or not it is echoed
        collected = [Collected(served.tokenizer, [] if echo else prompts[c.prompt_index]) for c in job.choices]

        if stream:
            pending = [[] for _ in job.choices]  # token records whose text is still held back

            def chunk(i, event):
                pending[i] += event.get('tokens') or []
                if not event['text']:
                    return None
                return piece(i, event['text'], None)

            def piece(i, text, reason):
                records, pending[i] = pending[i], []
                lp = collected[i].logprobs(records) if logprobs is not None else None
                return {**head, 'choices': [{'index': i, 'text': text, 'logprobs': lp, 'finish_reason': reason}]}

            def usage_chunk(generated):
                return {**head, 'choices': [], 'usage': usage(prompts, n, generated)} if with_usage else None
            return EventStream(stream_events(job, events, chunk, lambda i, r: piece(i, '', r), usage_chunk), close)

        results = await collect(request, job, events, close)
        choices, generated = [], 0
        for i, (c, events_of_choice) in enumerate(zip(collected, results)):
            for event in events_of_choice[:-1]:
                c.add(event)
                generated += 0 if event.get('echo') else len(event.get('tokens') or [])
            lp = c.logprobs(c.records) if logprobs is not None else None
            choices.append({'index': i, 'text': c.text, 'logprobs': lp,
                            'finish_reason': events_of_choice[-1]['finish_reason']})
        return {**head, 'choices': choices, 'usage': usage(prompts, n, generated)}

    @app.post('/v1/chat/completions')
    async def chat_completions(request: Request):
        authorize(request)
        body = await read_json(request, limits.max_body_bytes)
        served = model_of(body)
        not_supported(body, {'logit_bias': {}, 'presence_penalty': 0, 'frequency_penalty': 0, 'logprobs': False,
                             'tools': None, 'functions': None})
        prompt = chat_prompt(served, body)
        n = integer(body, 'n', 1, 1, limits.max_n)
        key = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
        check_context(served, [prompt])
        settings = sampling(body, integer(body, key, limits.max_tokens, 1, limits.max_tokens))
        stop, stream, with_usage = stop_strings(body), boolean(body, 'stream'), include_usage(body)
        job, events, close = submit(served, [prompt], n, settings, stop, served.tokenizer.end_id)
        head = {'id': new_id('chatcmpl'), 'object': 'chat.completion', 'created': int(time.time()),
                'model': served.id}

        if stream:
            head['object'] = 'chat.completion.chunk'
            started = set()

            def delta(i, content, reason=None):
                d = {} if reason else {'content': content}
                if i not in started:
                    started.add(i)
                    d['role'] = 'assistant'
                return {**head, 'choices': [{'index': i, 'delta': d, 'logprobs': None, 'finish_reason': reason}]}

            def usage_chunk(generated):
                return {**head, 'choices': [], 'usage': usage([prompt], n, generated)} if with_usage else None
            return EventStream(stream_events(job, events, lambda i, e: delta(i, e['text']) if e['text'] else None,
                                             lambda i, r: delta(i, '', r), usage_chunk), close)

        results = await collect(request, job, events, close)
        choices, generated = [], 0
        for i, events_of_choice in enumerate(results):
            text = ''.join(e.get('text', '') for e in events_of_choice[:-1])
            generated += sum(len(e.get('tokens') or []) for e in events_of_choice[:-1])
            choices.append({'index': i, 'message': {'role': 'assistant', 'content': text}, 'logprobs': None,
                            'finish_reason': events_of_choice[-1]['finish_reason']})
        return {**head, 'choices': choices, 'usage': usage([prompt], n, generated)}

    return app
