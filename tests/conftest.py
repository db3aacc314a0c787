"""Shared test helpers: run the repository's scripts as a user would, on small data made here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
sys.path.insert(0, str(ROOT))

# a few kilobytes of verse, so character-level training has something to learn on any machine
TINY_TEXT = ''.join(
    f"{who}:\nShall I compare thee to a summer's day, number {i}?\nThou art more lovely and more temperate.\n\n"
    for i in range(120) for who in ('ROMEO', 'JULIET'))

# tiny model settings that train in a second or two on a CPU
TINY_TRAIN = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
              '--batch_size=8', '--gradient_accumulation_steps=1', '--eval_iters=4', '--log_interval=1',
              '--warmup_iters=5', '--learning_rate=3e-3', '--min_lr=3e-4', '--dropout=0.0']
# the same in several processes: dropout draws from each process's torch generator, so a process continuing with
# the wrong generator after a resume shows in the weights
DDP_TRAIN = [*TINY_TRAIN, '--gradient_accumulation_steps=2', '--dropout=0.1', '--eval_interval=4', '--eval_iters=2']


def torch_threads():
    """The number of threads torch computes with, in the scripts the tests start and in the tests' own models: the
    OMP_NUM_THREADS of the environment the suite runs in, so that it can be run at several thread counts; 1 where it
    is not set (tiny models run fastest on one thread, and test machines are shared)."""
    return os.environ.get('OMP_NUM_THREADS') or '1'


def script_env(**extra):
    """The environment of a script a test starts: unbuffered output, no Hugging Face hub, torch_threads() threads."""
    return {**os.environ, 'PYTHONUNBUFFERED': '1', 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': torch_threads(), **extra}


def run(script, *args, check=True, env=None, timeout=600, stdin=None):
    """Run a repository script with args from the repository root (stdin: text piped to it); return the
    CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          env=script_env(**(env or {})), capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} {" ".join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    return proc


def run_in_terminal(script, *args, columns=120, timeout=300):
    """Run a repository script with its stdout and stderr on one pseudo-terminal, columns wide, as a user's terminal
    holds them; return its exit code and what the terminal received, as text."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=script_env(),
                            stdout=slave, stderr=slave)
    os.close(slave)
    output = b''
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end closed: the script is over
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return proc.wait(timeout=timeout), output.decode('utf-8', 'replace')


def screen(output):
    """The lines a terminal shows after receiving output: '\r' returns to the line's start, and what follows is
    written over what was there (a progress bar redraws its line so)."""
    lines, line, column = [], [], 0
    for char in output:
        if char == '\n':
            lines.append(''.join(line).rstrip())
            line, column = [], 0
        elif char == '\r':
            column = 0
        else:
            line[column:column + 1] = [char]
            column += 1
    return lines + [''.join(line).rstrip()]


def torchrun(nproc, script, *args, timeout=600, env=None, check=True):
    """Run a repository script in nproc processes on this machine (torchrun, CPU: the gloo backend)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', script, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'torchrun {script} {" ".join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    return proc


def run_all(commands, at_once=2):
    """Run several (script, *args) commands, at_once at a time: scripts that fail early are mostly start-up
    time, which overlaps well. Returns their CompletedProcess, in order."""
    env = script_env()
    results = []
    for i in range(0, len(commands), at_once):
        procs = [subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for script, *args in commands[i:i + at_once]]
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


# Two code paths that compute the same logits (a KV cache or none, a batch or one row, ours or transformers', in a
# script or in this process) do it in another order: the logits differ in their last bits, up to a few 1e-6 in these
# tests. That cannot change an argmax unless the top two logits are nearly tied, which random data can hold. A test that
# compares the greedy tokens of two such paths exactly first checks that its data has no near-tie at any step.
NEAR_TIE = 1e-4  # 30x the largest difference seen between two paths' logits (3e-6)


def assert_no_near_tie(logits, what=''):
    """The top two of each row of logits (..., vocab) are more than NEAR_TIE apart: greedy decoding picks the same
    token from these logits as from another code path's, equal but for their last bits."""
    top = logits.detach().float().topk(2, dim=-1).values
    gap = (top[..., 0] - top[..., 1]).min().item()
    assert gap > NEAR_TIE, (f'near-tie in the test data{what}: two logits only {gap:.1e} apart, which last-bit '
                            f'differences between code paths can swap: pick data (a seed) with clear-cut choices')


def sharp_gpt(block_size, vocab_size, seed=0, **overrides):
    """A tiny GPT (2 layers, 32 wide, untied) for decoding tests, with sharper distributions than the 0.02 init (its
    head scaled by 20): no near-ties for argmax to trip on."""
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    args = dict(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                tie_weights=False)
    model = GPT(GPTConfig(**{**args, **overrides})).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def decoder_of(model, prompt, use_cache=True, max_new_tokens=None):
    """A decoder.BatchDecoder continuing every row of prompt (B, T), to be driven step by step (next_logits, append);
    decoder_of(...).tokens() is each row's sequence so far."""
    from decoder import BatchDecoder
    decoder = BatchDecoder(model, prompt.size(0), use_cache=use_cache,
                           max_len=None if max_new_tokens is None else prompt.size(1) + max_new_tokens)
    for row in prompt.tolist():
        decoder.add(row, 10 ** 9, temperature=0)
    return decoder


def assert_clean_error(proc, *fragments):
    """A bad input ends with a non-zero exit and a short message, never a traceback."""
    assert proc.returncode != 0, proc.stdout
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def val_losses(stdout):
    return [float(line.split('val loss ')[1].split(',')[0]) for line in stdout.splitlines() if line.startswith('step ')]


def final_weights(out_dir):
    """The checkpoint.json of the checkpoint in out_dir and its weights, read without our loader."""
    ckpt = json.loads((out_dir / 'checkpoint.json').read_text())
    return ckpt, load_file(out_dir / ckpt['model_file'])


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes tens of seconds (torch.compile); `-m "not slow"` leaves it out')


@pytest.fixture(scope='session')
def char_dataset(tmp_path_factory):
    """A character-level dataset prepared from TINY_TEXT by the real prepare script."""
    folder = tmp_path_factory.mktemp('char_data')
    text_file = folder / 'input.txt'
    text_file.write_text(TINY_TEXT, encoding='utf-8')
    run('data/shakespeare_char/prepare.py', f'--input={text_file}', f'--out_dir={folder}')
    return folder


@pytest.fixture(scope='module')
def torch_threads_here():
    """torch_threads() threads for the models a test runs in this process, as in the scripts it starts (so a result
    computed here and one printed by a script come from the same thread count): use with
    pytestmark = pytest.mark.usefixtures('torch_threads_here')."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(int(torch_threads()))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def hub_offline():
    """No Hugging Face hub access. huggingface_hub reads HF_HUB_OFFLINE once, at import: set both the
    variable and its constant."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('HF_HUB_OFFLINE', '1')
        import huggingface_hub.constants
        mp.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
        yield
