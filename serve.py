"""
Talk to your model: an OpenAI-compatible server and a playground page in the browser.

    python serve.py --out_dir=out-shakespeare-char                  # then open http://127.0.0.1:8000
    python serve.py --out_dir=out-shakespeare-char,out-chat-char    # several models: a comma between them
    python serve.py --out_dir=gpt2 --port=8080                      # GPT-2's weights, or a Hugging Face folder

Any OpenAI client then works, e.g. `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`. Requests that
arrive together are decoded together, as the rows of one batch. It listens on 127.0.0.1 (this machine only);
--host=0.0.0.0 opens it to the network, which takes an --api_key that clients must send. `--help` lists every setting.
"""
import os
import socket
import time

import torch
import uvicorn

from checkpoint import CheckpointError, load_model
from configurator import configure, fail
from dataset import DatasetError, unicode_form
from generate import use_decoding_layout
from hf_gpt2 import HFError
from openai_api import Limits, ServedModel, make_app
from runtime import autocast, resolve_device, resolve_dtype
from serving import Scheduler
from tokenizer import TokenizerError, load_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'  # the model(s) to serve: checkpoint folders of train.py, GPT-2 names, Hugging Face folders; several: A,B
checkpoint = 'best'  # of a checkpoint folder: 'best' (lowest val loss) or 'latest'
host = '127.0.0.1'  # the address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every network (needs api_key)
port = 8000  # 0 picks a free port (the URL is printed)
api_key = ''  # when set, clients must send "Authorization: Bearer <api_key>"; required for a host other than loopback
batch_size = 16  # rows decoded together per model: requests (x n) beyond it wait for a free row
max_tokens = 512  # the most tokens a request may ask for per completion
max_n = 8  # the most completions per request (n, times the prompts of a list)
max_requests = 64  # requests decoding or waiting at once, streams included; more get 429 (retry later)
max_body_kb = 1024  # the largest request body
normalize = 'NFC'  # Unicode normal form of prompts, as sample.py's --normalize; '' keeps them as sent
device = 'auto'  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
threads = 0  # torch's CPU threads; 0: every core but one, which the HTTP side and the clients' streams need
dtype = 'auto'  # 'auto' (bfloat16 where supported, else float16 on CUDA, float32 on CPU), 'float32', ...
# -----------------------------------------------------------------------------
configure(globals())

LOOPBACK = ('127.0.0.1', 'localhost', '::1')
if host not in LOOPBACK and not api_key:
    fail(f'--host={host} lets other machines use this one: also pass --api_key=SECRET (clients send it as '
         f'"Authorization: Bearer SECRET"), or keep --host=127.0.0.1')
for name, value in (('threads', threads or 1), ('batch_size', batch_size), ('max_tokens', max_tokens),
                    ('max_n', max_n), ('max_requests', max_requests), ('max_body_kb', max_body_kb)):
    if value < 1:
        fail(f'--{name}={value} must be at least 1')
try:
    normalize = unicode_form(normalize)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
except (DatasetError, ValueError) as e:
    fail(e)

# the port first: a port in use is said in one line before the models take their time to load
try:
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ':' in host else socket.AF_INET)
except OSError as e:
    fail(f'cannot listen on {host}:{port} ({e.strerror or e}): pick another --port (0 picks a free one), or stop '
         f'the program that holds it')
t0 = time.time()
if device == 'cpu':
    # a core for the thread that streams the text and takes requests: decoding on every core starves it (compare
    # python bench_serve.py --threads=N for N = every core and every core but one)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores - 1))
sources = [s.strip() for s in out_dir.split(',') if s.strip()]
if len(set(sources)) < len(sources):
    fail(f'--out_dir={out_dir} names a model twice')
# a model's name in requests: its folder's name (out-shakespeare-char, gpt2), or the whole path where two share one
names = [os.path.basename(os.path.normpath(s)) for s in sources]
names = [n if names.count(n) == 1 else s for n, s in zip(names, sources)]
models = {}
for name, source in zip(names, sources):
    try:
        model, description, _ = load_model(source, device, which=checkpoint)
        if description is None:
            fail(f'{source} has no tokenizer (no tokenizer files beside its weights): serve a folder that has one')
        tokenizer = load_tokenizer(description, source)
    except (CheckpointError, HFError, TokenizerError) as e:
        fail(e)
    use_decoding_layout(model.eval())  # faster one-token steps on a CPU, the same results to float rounding
    scheduler = Scheduler(model, tokenizer, batch_size, lambda: autocast(device, dtype), name).start()
    models[name] = ServedModel(name, tokenizer, model.config.block_size, scheduler, normalize)
if not models:
    fail('--out_dir names no model: pass --out_dir=FOLDER (or several, FOLDER,OTHER)')

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'playground.html'), encoding='utf-8') as f:
    page = f.read()
limits = Limits(max_body_bytes=max_body_kb * 1024, max_tokens=max_tokens, max_n=max_n, max_requests=max_requests)
app = make_app(models, limits, api_key or None, page)

bound = listener.getsockname()
url = f"http://{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}"
print(f"serving {', '.join(models)} on {device} ({time.time() - t0:.1f}s to load) at {url}: the playground is "
      f"{url}/, the API {url}/v1", flush=True)
server = uvicorn.Server(uvicorn.Config(app, log_level='warning', access_log=False, timeout_graceful_shutdown=1))
server.run(sockets=[listener])
