"""
Fault injection: a tiny training run and its files, put through what goes wrong in real runs, many times,
with one table at the end.

    python faults.py                  # every fault; --kills=50 random kill -9s (half of them mid-save)
    python faults.py --kills=200 --seed=2

| fault | what must hold |
|---|---|
| kill -9 at a random moment | the folder holds a loadable checkpoint (or none yet); resuming from it and saving once more ends with the weights of an uninterrupted run, and no temporary file is left |
| a run that diverges (NaN) | it stops with one line; the last good checkpoint stays |
| a run that diverges to finite garbage (AdamW, Muon, recover) | it stops with one line; the good checkpoint stays, loadable |
| two runs in one out_dir | the second is refused with one line; once the first is killed, a third takes the folder over |
| disk full during a save / during prepare | one line; the previous checkpoint / dataset is intact, no temporary left |
| disk full outside a save (metrics.jsonl at a resume and between saves, export_hf.py) | one line; the checkpoint untouched, no half line or partial folder left |
| disk full at spread points of writing | the folder is byte for byte as before (in-process, a byte budget on the files) |
| Ctrl-C or SIGTERM | a checkpoint of that iteration; resuming from it gives the uninterrupted run's weights |
| damaged or crafted checkpoint files | one line naming the problem, at once, without a large allocation |
| damaged or crafted datasets (meta.json, the .bin files, tokenizer.json) | one line naming the file and the field, at once |
| sizes beyond the memory (batch, width, depth, samples) | one line saying what it needs and what is free, before allocating (peak under 1 GB) |
| bad settings | one line and exit code 2, never a traceback |

A full disk is imitated two ways: for whole scripts, a file-size limit (RLIMIT_FSIZE, Linux or macOS), which
makes writes fail the way a full disk does without filling one; in this process, a byte budget shared by all
the files being written (FullDisk), which a per-file limit cannot express. tests/test_faults.py runs each
fault a few times.
"""
import contextlib
import errno
import importlib.util
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.abspath(__file__))
TEXT = ''.join(f"{who}:\nShall I compare thee to a summer's day, number {i}?\nThou art more lovely and more temperate.\n\n"
               for i in range(150) for who in ('ROMEO', 'JULIET'))
TRAIN = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
         '--batch_size=8', '--gradient_accumulation_steps=1', '--eval_iters=1', '--log_interval=1',
         '--warmup_iters=2', '--learning_rate=3e-3', '--min_lr=3e-4', '--lr_decay_iters=10000', '--dropout=0.1']
ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TQDM_DISABLE='1')


def script(name, *args, **kw):
    """Start a repository script; returns the Popen (stdout and stderr as text pipes)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, name), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish_measured(proc, timeout=120):
    """finish(proc) and the peak resident memory of its process in MiB, as the kernel counted it (Linux, macOS): the
    process is reaped here, by wait4, which returns that count."""
    out, err = [], []
    readers = [threading.Thread(target=lambda f, into: into.append(f.read()), args=pair)
               for pair in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timed_out = not timer.is_alive()
    timer.cancel()
    for reader in readers:
        reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / (2**20 if sys.platform == 'darwin' else 1024)
    return ('timeout' if timed_out else proc.returncode), out[0], err[0], peak


def finish(proc, timeout=120):
    """(exit code, stdout, stderr) of proc; the code is 'timeout' (and proc killed) if it runs past timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return 'timeout', out, err + f'\n(killed after {timeout} s)'
    return proc.returncode, out, err


def one_line_error(code, err):
    """A non-zero exit (not a timeout) with exactly one line on stderr and no traceback."""
    lines = [line for line in err.strip().splitlines() if line]
    return code not in (0, 'timeout') and len(lines) == 1 and 'Traceback' not in err


def temporaries(folder):
    """The temporaries in folder (none where a run killed early did not create it yet)."""
    return [name for name in os.listdir(folder) if '.tmp' in name] if os.path.isdir(folder) else []


def read_all(folder):
    """Every file of folder, name -> bytes."""
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), 'rb') as f:
            files[name] = f.read()
    return files


def write_file(name, data):
    """A damage: overwrite the file name of a checkpoint folder with data (bytes)."""
    def damage(folder):
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(data)
    return damage


def limit_file_size(limit):
    """For preexec_fn: writes beyond limit bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


class FullDisk:
    """Within `with FullDisk(budget):`, the files dataset.py and atomic_write.py write (datasets and checkpoints)
    hold budget bytes in all, as on a disk with that much free space; past it, writes fail with ENOSPC."""

    def __init__(self, budget):
        self.left = budget

    def open(self, path, mode='r', *args, **kw):
        f = open(path, mode, *args, **kw)
        return _LimitedFile(f, self, path) if 'w' in mode or 'a' in mode else f

    def __enter__(self):
        import atomic_write
        import dataset
        self.modules = (atomic_write, dataset)
        for module in self.modules:
            module.open = self.open  # found before the builtin open by the module's own code
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            del module.open


class _LimitedFile:
    def __init__(self, f, disk, path):
        self._f, self._disk, self._path = f, disk, path

    def write(self, data):
        if len(data) > self._disk.left:
            self._disk.left = 0
            raise OSError(errno.ENOSPC, 'No space left on device', self._path)
        self._disk.left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):  # flush, fileno, close, ...
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class Lab:
    """A temporary folder with a prepared character dataset, where runs train and get hurt."""

    def __init__(self, folder):
        self.folder = folder
        self.data = os.path.join(folder, 'data')
        text_file = os.path.join(folder, 'input.txt')
        with open(text_file, 'w', encoding='utf-8') as f:
            f.write(TEXT)
        code, out, err = finish(script('data/shakespeare_char/prepare.py', f'--input={text_file}', f'--out_dir={self.data}'))
        assert code == 0, err
        self._references = {}

    def out(self, name):
        return os.path.join(self.folder, name)

    def train(self, out_dir, *args, **kw):
        return script('train.py', f'--dataset={self.data}', f'--out_dir={out_dir}', *TRAIN, *args, **kw)

    def reference(self, iters, eval_interval):
        """The weights of an uninterrupted run of iters iterations (cached)."""
        key = (iters, eval_interval)
        if key not in self._references:
            out = self.out(f'reference-{iters}-{eval_interval}')
            code, _, err = finish(self.train(out, f'--max_iters={iters}', f'--eval_interval={eval_interval}'))
            assert code == 0, err
            self._references[key] = weights(out)[1]
        return self._references[key]


def weights(out_dir):
    """(checkpoint.json, its weights), read the plain way: no code of the repository involved."""
    with open(os.path.join(out_dir, 'checkpoint.json'), encoding='utf-8') as f:
        ckpt = json.load(f)
    return ckpt, load_file(os.path.join(out_dir, ckpt['model_file']))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loadable(out_dir):
    """Whether the repository's own loader accepts out_dir's latest and best checkpoints (in a fresh process, as a user
    would)."""
    code = subprocess.run([sys.executable, '-c', f'from checkpoint import load_model; load_model({out_dir!r}, '
                           f'which="latest"); load_model({out_dir!r})'],
                          cwd=ROOT, env=ENV, capture_output=True).returncode
    return code == 0


# ---------------------------------------------------------------------------- the faults

def kill_trials(lab, n, rng):
    """kill -9 at random moments of a run that saves every 2 iterations: every other trial right after it starts
    a save. Then: the checkpoint loads, and resuming it to the next save matches the uninterrupted run."""
    counts = dict(trials=n, during_save=0, caught_mid_write=0, before_first_save=0, corrupt=0, temporaries_left=0,
                  resumed_exactly=0, resumed=0)
    for trial in range(n):
        out = lab.out(f'kill-{trial}')
        proc = lab.train(out, '--max_iters=100000', '--eval_interval=2', '--always_save_checkpoint=True')
        mid_save = trial % 2 == 0
        deadline = time.time() + rng.uniform(1.5, 6.0)
        for line in proc.stdout:
            if mid_save and line.startswith('saving checkpoint') and rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.01))  # somewhere inside the save
                break
            if not mid_save and time.time() > deadline:
                break
        proc.kill()
        proc.communicate()
        counts['during_save'] += mid_save
        counts['caught_mid_write'] += bool(temporaries(out))  # the kill left a half-written file: it hit a save
        if not os.path.exists(os.path.join(out, 'checkpoint.json')):
            counts['before_first_save'] += 1  # no checkpoint yet: nothing to lose
            continue
        if not loadable(out):
            counts['corrupt'] += 1
            continue
        saved = weights(out)[0]['iter_num']
        code, _, _ = finish(lab.train(out, '--init_from=resume', f'--max_iters={saved + 2}', '--eval_interval=2'))
        counts['resumed'] += 1
        counts['temporaries_left'] += bool(temporaries(out))
        counts['resumed_exactly'] += code == 0 and same_weights(weights(out)[1], lab.reference(saved + 2, 2))
    return counts


def divergence_trial(lab):
    """A good checkpoint at iteration 4, then a learning rate (the largest train.py takes) that overflows float32 within
    two steps."""
    out = lab.out('diverge')
    code, _, err = finish(lab.train(out, '--max_iters=4', '--eval_interval=4'))
    assert code == 0, err
    good = weights(out)[1]
    code, _, err = finish(lab.train(out, '--init_from=resume', '--max_iters=20', '--eval_interval=2',
                                    '--learning_rate=1e30', '--min_lr=1e29'))
    ckpt, kept = weights(out)
    return dict(one_line=one_line_error(code, err) and 'diverged' in err, kept=ckpt['iter_num'] == 4 and same_weights(good, kept),
                message=err.strip())


# runs that diverge to finite garbage from a good checkpoint at iteration 4: (its optimizer, the resumed run's
# settings). Before, the garbage (val losses of 300 to 2e11) was saved as the run's checkpoint
GARBAGE = {
    'AdamW, learning_rate=10': ('adamw', ['--learning_rate=10', '--min_lr=1']),
    'Muon, learning_rate=10': ('muon', ['--muon_lr=1e4', '--learning_rate=10', '--min_lr=1']),
    'recover, learning_rate=10': ('adamw', ['--learning_rate=10', '--min_lr=1', '--on_divergence=recover',
                                            '--max_recoveries=1']),
}


def garbage_trials(lab, at_once=2):
    """Each GARBAGE case, at_once at a time: [(name, one line saying the good checkpoint is kept?, kept and loadable?,
    message)]. Loadable: by the repository's loader, in this process."""
    from checkpoint import load_model
    good = {optimizer: lab.out(f'garbage-good-{optimizer}') for optimizer, _ in GARBAGE.values()}
    for proc in [lab.train(out, '--max_iters=4', '--eval_interval=4', f'--optimizer={optimizer}')
                 for optimizer, out in good.items()]:  # both at once
        code, _, err = finish(proc)
        assert code == 0, err
    results, names = [], list(GARBAGE)
    for i in range(0, len(names), at_once):
        started = []
        for name in names[i:i + at_once]:
            optimizer, args = GARBAGE[name]
            out = lab.out(f'garbage-{names.index(name)}')
            shutil.copytree(good[optimizer], out)
            started.append((name, out, lab.train(out, '--init_from=resume', '--max_iters=12', '--eval_interval=2', *args)))
        for name, out, proc in started:
            code, _, err = finish(proc)
            ckpt, kept = weights(out)
            said = one_line_error(code, err) and 'diverged' in err and 'the checkpoint of iteration 4' in err
            loaded = {k: v for k, v in load_model(out, which='latest')[0].state_dict().items() if k in kept}
            results.append((name, said, ckpt['iter_num'] == 4 and same_weights(weights(good[GARBAGE[name][0]])[1], kept)
                            and same_weights(loaded, kept), err.strip()))
    return results


def concurrent_trial(lab):
    """Run A trains; run B on the same out_dir; A is killed; run C on it."""
    out = lab.out('shared')
    first = lab.train(out, '--max_iters=100000', '--eval_interval=1000')
    for line in first.stdout:
        if line.startswith('iter 2:'):
            break
    code, _, refusal = finish(lab.train(out, '--max_iters=4', '--eval_interval=2'))
    refused = one_line_error(code, refusal) and f'process {first.pid}' in refusal
    first.kill()
    first.communicate()
    code, _, err = finish(lab.train(out, '--max_iters=4', '--eval_interval=2'))
    return dict(refused=refused, taken_over=code == 0 and weights(out)[0]['iter_num'] == 4, message=refusal.strip())


def disk_full_save_trial(lab):
    """A checkpoint at iteration 4; the resumed run's next save meets a full disk (its weight file is larger
    than the limit)."""
    out = lab.out('full-save')
    code, _, err = finish(lab.train(out, '--max_iters=4', '--eval_interval=4'))
    assert code == 0, err
    before = weights(out)
    limit = os.path.getsize(os.path.join(out, before[0]['model_file'])) // 2
    code, _, err = finish(lab.train(out, '--init_from=resume', '--max_iters=8', '--eval_interval=4',
                                    preexec_fn=limit_file_size(limit)))
    after = weights(out)
    return dict(one_line=one_line_error(code, err), intact=after[0]['iter_num'] == 4 and same_weights(before[1], after[1])
                and loadable(out), temporaries_left=len(temporaries(out)), message=err.strip())


def full_disk_outside_saves(lab):
    """A full disk (a file-size limit) where no checkpoint is being saved: when a resumed run rewrites metrics.jsonl at
    its start, when a run appends to it between saves, and when export_hf.py writes a Hugging Face folder (then a
    second export, with room, must succeed). [(case, one line?, checkpoint and log as before?, nothing partial left?,
    message)]."""
    good = lab.out('full-outside')
    code, _, err = finish(lab.train(good, '--max_iters=4', '--eval_interval=4'))
    assert code == 0, err
    before = read_all(good)
    log_size = os.path.getsize(os.path.join(good, 'metrics.jsonl'))
    results = []
    for case, limit, args in (('metrics.jsonl rewritten at a resume', log_size // 2, []),
                              ('metrics.jsonl appended between saves', log_size + 4096, ['--eval_interval=1000'])):
        out = lab.out(f'full-outside-{len(results)}')
        shutil.copytree(good, out)
        code, _, err = finish(lab.train(out, '--init_from=resume', '--max_iters=200', *args,
                                        preexec_fn=limit_file_size(limit)))
        after = read_all(out)
        with open(os.path.join(out, 'metrics.jsonl'), encoding='utf-8') as f:
            whole_lines = all(line.endswith('\n') and json.loads(line) for line in f)
        unchanged = all(after[name] == data for name, data in before.items() if name not in ('metrics.jsonl', '.lock'))
        results.append((case, one_line_error(code, err) and 'metrics.jsonl' in err and 'iteration 4' in err, unchanged,
                        whole_lines and not temporaries(out), err.strip()))
    hf_dir = lab.out('full-outside-hf')
    code, _, err = finish(script('export_hf.py', f'--out_dir={good}', f'--hf_dir={hf_dir}', '--verify=False',
                                 preexec_fn=limit_file_size(log_size)))
    nothing = not [name for name in os.listdir(lab.folder) if name.startswith('full-outside-hf')]
    again, _, _ = finish(script('export_hf.py', f'--out_dir={good}', f'--hf_dir={hf_dir}', '--verify=False'))
    results.append(('export_hf.py', one_line_error(code, err), read_all(good) == before and again == 0, nothing,
                    err.strip()))
    return results


def disk_full_prepare_trial(lab):
    """Re-preparing a dataset folder with more text than the disk can take."""
    folder = lab.out('full-prepare')
    shutil.copytree(lab.data, folder)
    before = read_all(folder)
    bigger = lab.out('bigger.txt')
    with open(bigger, 'w', encoding='utf-8') as f:  # distinct paragraphs: prepare.py drops duplicates
        f.write('\n\n'.join(f'{i}: {paragraph}' for i in range(8) for paragraph in TEXT.split('\n\n') if paragraph))
    limit = max(os.path.getsize(os.path.join(folder, 'train.bin')) * 2, 4096)
    code, _, err = finish(script('prepare.py', f'--input={bigger}', f'--out_dir={folder}', '--tokenizer=char',
                                 '--num_proc=1', preexec_fn=limit_file_size(limit)))
    after = read_all(folder)
    return dict(one_line=one_line_error(code, err), intact=before == after, message=err.strip())


def full_disk_sweep(folder, points):
    """A full disk at `points` places spread over writing a dataset and over saving a checkpoint (in this process,
    with FullDisk): each failure must leave the previous dataset / checkpoint as it was, and no temporary file.
    Returns counts."""
    import dataset
    from checkpoint import CheckpointError, load_model, save_checkpoint
    from model import GPT, GPTConfig
    from tokenizer import make_tokenizer
    counts = dict(trials=0, failed=0, intact=0, temporaries_left=0)

    def attempt(write, budget, target):
        before = read_all(target)
        try:
            with FullDisk(budget), contextlib.redirect_stdout(io.StringIO()):
                write()
        except (dataset.DatasetError, CheckpointError, OSError):
            counts['failed'] += 1
            counts['intact'] += read_all(target) == before
            counts['temporaries_left'] += bool(temporaries(target))
        counts['trials'] += 1

    data = os.path.join(folder, 'full-disk-data')
    with contextlib.redirect_stdout(io.StringIO()):  # write_text_dataset tells how many tokens each split has
        dataset.write_text_dataset(data, make_tokenizer('char', TEXT), TEXT)
    size = sum(len(b) for b in read_all(data).values())
    for i in range(points):
        attempt(lambda: dataset.write_text_dataset(data, make_tokenizer('char', TEXT + '#'), TEXT + '#' * i),
                size * i // points, data)
    out = os.path.join(folder, 'full-disk-checkpoint')
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    model = GPT(GPTConfig(**args))
    save_checkpoint(out, model, None, 1, 0.0, args, {}, None)
    size = sum(len(b) for b in read_all(out).values())
    for i in range(points):
        attempt(lambda: save_checkpoint(out, model, None, 2, 0.0, args, {}, None), size * i // points, out)
    load_model(out)
    return counts


def interrupt_trial(lab, signum, rng):
    """signum at a random iteration; then resume to 4 iterations past it and compare with an uninterrupted run."""
    out = lab.out(f'signal-{signum}-{rng.random():.6f}')
    proc = lab.train(out, '--max_iters=100000', '--eval_interval=1000')
    stop_after = rng.randint(3, 12)
    for line in proc.stdout:
        if line.startswith(f'iter {stop_after}:'):
            proc.send_signal(signum)
            break
    _, err = proc.communicate(timeout=120)
    ckpt = weights(out)[0] if os.path.exists(os.path.join(out, 'checkpoint.json')) else {'iter_num': None}
    stopped = proc.returncode == 128 + signum and ckpt['iter_num'] is not None and \
        f'at iteration {ckpt["iter_num"]}, checkpoint saved' in err
    exact = False
    if stopped:
        target = ckpt['iter_num'] + 4
        code, _, _ = finish(lab.train(out, '--init_from=resume', f'--max_iters={target}', '--eval_interval=1000'))
        exact = code == 0 and same_weights(weights(out)[1], lab.reference(target, 1000))
    return dict(stopped_and_saved=stopped, resumed_exactly=exact, message=err.strip())


def damaged_checkpoints(lab):
    """Each kind of damage to a good checkpoint, met by sample.py (DAMAGE) or by a resume (RESUME_DAMAGE):
    [(name, one clean line?, seconds, message)]."""
    good = lab.out('good')
    code, _, err = finish(lab.train(good, '--max_iters=2', '--eval_interval=2'))
    assert code == 0, err
    results = []
    for name, damage in {**DAMAGE, **RESUME_DAMAGE}.items():
        folder = damaged_copy(good, lab.out(f'damaged-{name}'), damage)
        t0 = time.time()
        if name in DAMAGE:
            proc = script('sample.py', f'--out_dir={folder}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5')
        else:
            proc = lab.train(folder, '--init_from=resume', '--max_iters=4', '--eval_interval=2')
        code, _, err = finish(proc, timeout=30)
        results.append((name, one_line_error(code, err), time.time() - t0, err.strip()))
    return results


def damaged_copy(good, folder, damage):
    """A copy of the checkpoint folder good, damaged. Without its best.json (most damages are to checkpoint.json),
    checkpoint.json is the checkpoint sample.py reads, as well as the one a resume reads."""
    shutil.copytree(good, folder, dirs_exist_ok=True)
    if os.path.exists(os.path.join(folder, 'best.json')):
        os.remove(os.path.join(folder, 'best.json'))
    damage(folder)
    return folder


def edit_json(change, name='checkpoint.json'):
    """A damage: change(document) edits the JSON file name in the folder (a checkpoint's, by default), as a dict."""
    def damage(folder):
        path = os.path.join(folder, name)
        with open(path, encoding='utf-8') as f:
            document = json.load(f)
        change(document)
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(document, f)
    return damage


def replace_model_file(data):
    def damage(folder):
        write_file(named_file(folder, 'model_file'), data)(folder)
    return damage


def named_file(folder, key):
    """The file checkpoint.json names under key ('model_file' or 'optimizer_file')."""
    with open(os.path.join(folder, 'checkpoint.json'), encoding='utf-8') as f:
        return json.load(f)[key]


def flip_bit(folder):
    """One bit of the weights flipped: the top exponent bit of the first float32 of the data (1.0 becomes inf)."""
    path = os.path.join(folder, named_file(folder, 'model_file'))
    with open(path, 'r+b') as f:
        start = 8 + int.from_bytes(f.read(8), 'little')
        f.seek(start + 3)  # little-endian float32: its 4th byte holds the sign and the top exponent bits
        byte = f.read(1)[0]
        f.seek(start + 3)
        f.write(bytes([byte ^ 0x40]))


def not_finite_weights(folder):
    """A valid safetensors file of the right shapes whose weights are all NaN, with its checksum recomputed (a crafted
    file, or one saved by a tool that does not check)."""
    import hashlib
    from safetensors.torch import save_file
    ckpt, tensors = weights(folder)
    save_file({k: torch.full_like(v, float('nan')) for k, v in tensors.items()}, os.path.join(folder, ckpt['model_file']))
    with open(os.path.join(folder, ckpt['model_file']), 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    edit_json(lambda c: c.update(model_sha256=digest))(folder)


def wrong_shape(folder):
    from safetensors.torch import save_file
    ckpt, tensors = weights(folder)
    tensors['transformer.h.0.attn.c_attn.weight'] = torch.zeros(7, 3)
    save_file(tensors, os.path.join(folder, ckpt['model_file']))


def without_rng(folder):
    """The optimizer file without its random generators' states."""
    from safetensors.torch import save_file
    path = os.path.join(folder, named_file(folder, 'optimizer_file'))
    save_file({k: v for k, v in load_file(path).items() if not k.startswith('rank')}, path)
    edit_json(lambda c: c.pop('optimizer_sha256', None))(folder)  # as a tool that records none would leave it


def with_rng(folder, tensor):
    """The optimizer file with rank 0's torch generator state replaced by tensor (its checksum dropped: a file of
    a tool that records none)."""
    from safetensors.torch import save_file
    path = os.path.join(folder, named_file(folder, 'optimizer_file'))
    save_file(dict(load_file(path), **{'rank0.torch': tensor}), path)
    edit_json(lambda c: c.pop('optimizer_sha256', None))(folder)


DAMAGE = {
    'huge n_layer': edit_json(lambda c: c['model_args'].update(n_layer=10**6)),
    'huge vocabulary': edit_json(lambda c: c['model_args'].update(vocab_size=10**9)),
    'huge context': edit_json(lambda c: c['model_args'].update(block_size=10**9)),
    'model_file outside the folder': edit_json(lambda c: c.update(model_file='../good/' + c['model_file'])),
    'model_file absolute': edit_json(lambda c: c.update(model_file='/etc/passwd')),
    'model_file not a string': edit_json(lambda c: c.update(model_file=5)),
    'model_args a list': edit_json(lambda c: c.update(model_args=[1, 2])),
    'model_args unknown field': edit_json(lambda c: c['model_args'].update(n_layers=2)),
    'n_head a string': edit_json(lambda c: c['model_args'].update(n_head='2')),
    'dropout out of range': edit_json(lambda c: c['model_args'].update(dropout=5)),
    'tokenizer a string': edit_json(lambda c: c.update(tokenizer='char')),
    'no model_file': edit_json(lambda c: c.pop('model_file')),
    'a JSON list': write_file('checkpoint.json', b'[1, 2, 3]'),
    'truncated JSON': write_file('checkpoint.json', b'{"model_file": "mo'),
    'weights not safetensors': replace_model_file(b'{"hello": "this is JSON, not weights"}' * 10),
    'weights truncated': replace_model_file(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":'),
    'a weight of the wrong shape': wrong_shape,
    'weights missing': lambda folder: os.remove(os.path.join(folder, named_file(folder, 'model_file'))),
    'iter_num a string': edit_json(lambda c: c.update(iter_num='10')),
    'config missing': edit_json(lambda c: c.pop('config')),
    'best.json truncated': write_file('best.json', b'{"model_file": "mo'),
    'nested 100,000 deep': write_file('checkpoint.json', b'{"model_file": ' + b'[' * 100_000 + b']' * 100_000 + b'}'),
    'a 5,000-digit integer': write_file('checkpoint.json', b'{"iter_num": ' + b'7' * 5000 + b'}'),
    'a flipped exponent bit': flip_bit,
    'weights all NaN': not_finite_weights,
}
# damage only a resume meets (sampling needs neither the optimizer nor the random generators)
RESUME_DAMAGE = {
    'random generators missing': without_rng,
    'process states not a list': edit_json(lambda c: c['training_state'].update(ranks='rank0')),
    'optimizer groups missing': edit_json(lambda c: c['optimizer'].pop('param_groups')),
    'optimizer file missing': lambda folder: os.remove(os.path.join(folder, named_file(folder, 'optimizer_file'))),
    'evals_since_best a string': edit_json(lambda c: c['training_state'].update(evals_since_best='x')),
    'data_rng of another generator': edit_json(lambda c: c['training_state']['ranks'][0].update(
        data_rng=__import__('numpy').random.PCG64DXSM(0).state)),
    'a random generator of the wrong size': lambda folder: with_rng(folder, torch.zeros(7, dtype=torch.uint8)),
    'a random generator of the wrong dtype': lambda folder: with_rng(folder, torch.zeros(5056, dtype=torch.float32)),
}


def edit_meta(change):
    """A damage: change(meta) edits the dataset's meta.json, as a dict."""
    return edit_json(change, 'meta.json')


def replace_with_folder(name):
    def damage(folder):
        os.remove(os.path.join(folder, name))
        os.mkdir(os.path.join(folder, name))
    return damage


def cut_file(name, keep):
    """A damage: the file name cut to its first keep bytes."""
    def damage(folder):
        with open(os.path.join(folder, name), 'r+b') as f:
            f.truncate(keep)
    return damage


def with_tokenizer_file(data):
    """A damage: the meta names a tokenizer.json, and the file holds data."""
    def damage(folder):
        edit_meta(lambda m: m['tokenizer'].update(tokenizer_file='tokenizer.json'))(folder)
        write_file('tokenizer.json', data)(folder)
    return damage


def nested(depth):
    return ('[' * depth + ']' * depth).encode()


# damage to a prepared dataset (a char dataset of uint16 ids; chat datasets hold masks too): name -> damage
DATASET_DAMAGE = {
    'meta.json not JSON': write_file('meta.json', b'{"tokenizer": {"kind": "ch'),
    'meta.json empty': write_file('meta.json', b''),
    'meta.json not UTF-8': write_file('meta.json', '{"dtype": "uint16", "x": "ol\u00e1"}'.encode('latin-1')),
    'meta.json a list': write_file('meta.json', b'[1, 2, 3]'),
    'meta.json nested 100,000 deep': write_file('meta.json', nested(100_000)),
    'meta.json a 5,000-digit number': write_file('meta.json', b'{"vocab_size": ' + b'9' * 5000 + b'}'),
    'meta.json a directory': replace_with_folder('meta.json'),
    'no dtype': edit_meta(lambda m: m.pop('dtype')),
    'no tokenizer': edit_meta(lambda m: m.pop('tokenizer')),
    'no vocab_size': edit_meta(lambda m: m.pop('vocab_size')),
    'dtype object': edit_meta(lambda m: m.update(dtype='object')),
    'dtype float64': edit_meta(lambda m: m.update(dtype='float64')),
    'dtype evil': edit_meta(lambda m: m.update(dtype='evil')),
    'dtype of the wrong width': edit_meta(lambda m: m.update(dtype='uint32')),
    'vocab_size 1e12': edit_meta(lambda m: m.update(vocab_size=1e12)),
    'vocab_size 10**12': edit_meta(lambda m: m.update(vocab_size=10**12)),
    'vocab_size a string': edit_meta(lambda m: m.update(vocab_size='65')),
    'vocab_size below the ids': edit_meta(lambda m: m.update(vocab_size=3)),
    'bytes_per_token a string': edit_meta(lambda m: m.update(bytes_per_token='1.0')),
    'val_tokens a string': edit_meta(lambda m: m.update(val_tokens='100')),
    'val_tokens negative': edit_meta(lambda m: m.update(val_tokens=-1)),
    'tokenizer a string': edit_meta(lambda m: m.update(tokenizer='char')),
    'tokenizer of no kind': edit_meta(lambda m: m.update(tokenizer={'kind': 'evil'})),
    'chat a string': edit_meta(lambda m: m.update(chat='yes')),
    'cleaning a string': edit_meta(lambda m: m.update(cleaning='NFC')),
    'cleaning without normalize': edit_meta(lambda m: m.update(cleaning=dict(
        clean_wiki=False, unescape_html=True, normalize_whitespace=True))),
    'cleaning.normalize evil': edit_meta(lambda m: m.update(cleaning=dict(
        clean_wiki=False, unescape_html=True, normalize='NFX', normalize_whitespace=True))),
    'cleaning.clean_wiki a string': edit_meta(lambda m: m.update(cleaning=dict(
        clean_wiki='no', unescape_html=True, normalize='NFC', normalize_whitespace=True))),
    'train.bin empty': write_file('train.bin', b''),
    'train.bin a directory': replace_with_folder('train.bin'),
    'train.bin of an odd size': cut_file('train.bin', 1001),
    'train.bin shorter than meta.json says': cut_file('train.bin', 1000),
    'tokenizer.json random bytes': with_tokenizer_file(random.Random(0).randbytes(100_000)),
    'tokenizer.json a JSON list': with_tokenizer_file(b'[1, 2]'),
    'tokenizer.json outside the folder': edit_meta(lambda m: m['tokenizer'].update(tokenizer_file='../x.json')),
}
# damage to a chat dataset's masks
CHAT_DATASET_DAMAGE = {
    'train.mask.bin shorter than train.bin': cut_file('train.mask.bin', 10),
    'val.mask.bin missing': lambda folder: os.remove(os.path.join(folder, 'val.mask.bin')),
    'val.mask.bin a directory': replace_with_folder('val.mask.bin'),
}


def damaged_datasets(lab):
    """Each DATASET_DAMAGE met by train.py, a few at a time: [(name, one clean line?, seconds, message)]."""
    results, names = [], list(DATASET_DAMAGE)
    for i in range(0, len(names), 2):
        started = []
        for name in names[i:i + 2]:
            folder = lab.out(f'dataset-{len(results) + len(started)}')
            shutil.copytree(lab.data, folder)
            DATASET_DAMAGE[name](folder)
            started.append((name, time.time(), script('train.py', f'--dataset={folder}', f'--out_dir={folder}-out',
                                                      *TRAIN, '--max_iters=2')))
        for name, t0, proc in started:
            code, _, err = finish(proc, timeout=60)
            results.append((name, one_line_error(code, err), time.time() - t0, err.strip()))
    return results


# settings that must each give one line and exit code 2: (script, arguments, a fragment of the message)
BAD_SETTINGS = [
    ('train.py', ['--eval_interval=0'], 'eval_interval'),
    ('train.py', ['--log_interval=0'], 'log_interval'),
    ('train.py', ['--gradient_accumulation_steps=0'], 'gradient_accumulation_steps'),
    ('train.py', ['--batch_size=-1'], 'batch_size'),
    ('train.py', ['--batch_size=0'], 'batch_size'),
    ('train.py', ['--block_size=0'], 'block_size'),
    ('train.py', ['--eval_iters=0'], 'eval_iters'),
    ('train.py', ['--n_embd=0'], 'n_embd'),
    ('train.py', ['--n_embd=-8', '--n_head=2'], 'n_embd'),
    ('train.py', ['--n_layer=0'], 'n_layer'),
    ('train.py', ['--max_iters=-1'], 'max_iters'),
    ('train.py', ['--threads=-1'], 'threads'),
    ('train.py', ['--beta2=1.5'], 'beta2'),
    ('train.py', ['--dropout=1.0'], 'dropout'),
    ('train.py', ['--device=cuda'], 'no CUDA GPU'),
    ('train.py', ['--device=tpu'], "device='tpu'"),
    ('train.py', ['--out_dir=/proc/version/out'], 'out_dir'),
    ('sample.py', ['--device=cuda'], 'no CUDA GPU'),
    ('eval.py', ['--device=cuda'], 'no CUDA GPU'),
    ('train.py', ['--seed=-1'], 'seed=-1 must not be negative'),
    ('train.py', ['--learning_rate=1e38'], 'learning_rate=1e+38 must be a number of at most 1e+30'),
    ('train.py', ['--threads=100000'], 'threads=100000 is more than 4 per core'),
    *([('train.py', ['--wandb_log=True'], 'wandb_log=True needs wandb')] if importlib.util.find_spec('wandb') is None
      else []),
]


# sizes that ask for more memory than the machine has: (script, arguments, a fragment of the message). Refused from
# plan.py's estimate before anything is allocated; they used to end in the allocator's traceback, after seconds
# and gigabytes, or (200,000 layers) build the model for minutes
HUGE_SIZES = [
    ('train.py', ['--batch_size=1000000000'], 'micro-batches of 1,000,000,000 x 32 tokens needs about'),
    ('train.py', ['--n_embd=1048576'], '2 layers of 1048576 channels'),
    ('train.py', ['--n_layer=200000'], '200000 layers of 32 channels'),
    ('sample.py', ['--num_samples=10000000'], 'sampling 10,000,000 rows'),
    ('sample.py', ['--num_beams=10000000', '--num_samples=1'], 'sampling 10,000,000 beams'),
]


def huge_sizes(lab, at_once=2):
    """Every HUGE_SIZES line through its script (sample.py on a checkpoint of the lab's), at_once at a time:
    [(script, args, one clean line saying what it needs and what is free?, seconds, peak MiB, message)]."""
    lab.reference(2, 2)
    results = []
    for i in range(0, len(HUGE_SIZES), at_once):
        started = []
        for j, (name, args, fragment) in enumerate(HUGE_SIZES[i:i + at_once], start=i):
            where = ([f'--dataset={lab.data}', f'--out_dir={lab.out(f"huge-{j}")}', *TRAIN] if name == 'train.py' else
                     [f'--out_dir={lab.out("reference-2-2")}', '--device=cpu', '--max_new_tokens=5'])
            started.append((name, args, fragment, time.time(), script(name, *where, *args)))
        for name, args, fragment, t0, proc in started:
            code, _, err, peak = finish_measured(proc, timeout=60)
            ok = one_line_error(code, err) and fragment in err and 'GiB free' in err
            results.append((name, args, ok, time.time() - t0, peak, err.strip()))
    return results


def bad_settings(lab, at_once=2):
    """Every BAD_SETTINGS line through its script, at_once at a time (most of their time is start-up):
    [(script, args, one clean line with the fragment?, message)]."""
    results = []
    for i in range(0, len(BAD_SETTINGS), at_once):
        procs = []
        for j, (name, args, fragment) in enumerate(BAD_SETTINGS[i:i + at_once], start=i):
            extra = [f'--dataset={lab.data}', f'--out_dir={lab.out(f"settings-{j}")}', *TRAIN[:1]] if name == 'train.py' else []
            procs.append((name, args, fragment, script(name, *extra, *args)))
        for name, args, fragment, proc in procs:
            code, _, err = finish(proc)
            results.append((name, args, one_line_error(code, err) and code == 2 and fragment in err, err.strip()))
    return results


# ---------------------------------------------------------------------------- the table

def main(argv):
    from configurator import configure
    # --kills: kill -9 trials; --signals: Ctrl-C / SIGTERM trials (alternating); --full_disk_points: places of a
    # full disk in a dataset write and in a save (each); --seed: of the random moments
    settings = configure(dict(kills=50, signals=6, full_disk_points=25, seed=1337, __file__=__file__), argv)
    rng = random.Random(settings['seed'])
    rows = []

    def row(fault, trials, outcome):
        rows.append((fault, trials, outcome))
        print(f'{fault}: {outcome}', file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as folder:
        lab = Lab(folder)
        k = kill_trials(lab, settings['kills'], rng)
        row('kill -9 at random moments', k['trials'],
            f"{k['during_save']} aimed at a save ({k['caught_mid_write']} left a half-written file), "
            f"{k['before_first_save']} before the first save; corrupt {k['corrupt']}; "
            f"resumed {k['resumed']}, exactly {k['resumed_exactly']}; temporaries left after the next save {k['temporaries_left']}")
        d = divergence_trial(lab)
        row('NaN: a diverging run', 1, f"stopped with one line: {d['one_line']}; good checkpoint kept: {d['kept']}")
        g = garbage_trials(lab)
        row('divergence to finite garbage', len(g), f"stopped with one line: {sum(r[1] for r in g)}; good checkpoint "
                                                    f"kept and loadable: {sum(r[2] for r in g)}")
        c = concurrent_trial(lab)
        row('two runs in one out_dir', 1, f"second refused: {c['refused']}; dead run's lock taken over: {c['taken_over']}")
        s = disk_full_save_trial(lab)
        row('disk full during a save', 1, f"one line: {s['one_line']}; old checkpoint intact: {s['intact']}; "
                                          f"temporaries left {s['temporaries_left']}")
        o = full_disk_outside_saves(lab)
        row('disk full outside a save (metrics, export)', len(o), f"one line: {sum(r[1] for r in o)}; checkpoint "
            f"untouched: {sum(r[2] for r in o)}; nothing partial: {sum(r[3] for r in o)}")
        p = disk_full_prepare_trial(lab)
        row('disk full during prepare', 1, f"one line: {p['one_line']}; old dataset intact: {p['intact']}")
        f = full_disk_sweep(folder, settings['full_disk_points'])
        row('disk full at spread points of a dataset write / a save', f['trials'],
            f"failed {f['failed']}; left as before {f['intact']}; temporaries left {f['temporaries_left']}")
        signals = [interrupt_trial(lab, (signal.SIGINT, signal.SIGTERM)[i % 2], rng) for i in range(settings['signals'])]
        row('Ctrl-C / SIGTERM mid-run', len(signals), f"stopped and saved {sum(r['stopped_and_saved'] for r in signals)}; "
                                                      f"resumed exactly {sum(r['resumed_exactly'] for r in signals)}")
        damaged = damaged_checkpoints(lab)
        row('damaged or crafted checkpoints', len(damaged),
            f"one clean line {sum(r[1] for r in damaged)}; slowest {max(r[2] for r in damaged):.1f} s")
        datasets = damaged_datasets(lab)
        row('damaged or crafted datasets', len(datasets),
            f"one clean line {sum(r[1] for r in datasets)}; slowest {max(r[2] for r in datasets):.1f} s")
        huge = huge_sizes(lab)
        row('sizes beyond the memory', len(huge), f"one clean line {sum(r[2] for r in huge)}; slowest "
            f"{max(r[3] for r in huge):.1f} s; largest peak {max(r[4] for r in huge):,.0f} MiB")
        swept = bad_settings(lab)
        row('bad settings', len(swept), f"one clean line, exit 2: {sum(r[2] for r in swept)}")
    width = max(len(r[0]) for r in rows)
    print(f"{'fault':{width}}  trials  outcome")
    for fault, trials, outcome in rows:
        print(f'{fault:{width}}  {trials:>6}  {outcome}')
    for name, ok, _, message in damaged:
        if not ok:
            print(f'damaged checkpoint {name!r}: {message[-300:]}')
    for name, ok, _, message in datasets:
        if not ok:
            print(f'damaged dataset {name!r}: {message[-300:]}')
    for name, args, ok, _, _, message in huge:
        if not ok:
            print(f"{name} {' '.join(args)}: {message[-300:]}")
    for name, args, ok, message in swept:
        if not ok:
            print(f"{name} {' '.join(args)}: {message[-300:]}")


if __name__ == '__main__':
    main(sys.argv[1:])
