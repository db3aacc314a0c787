"""What a killed process leaves behind is cleaned by the next one: the temporaries of a metrics log, a dataset and a
checkpoint whose writer is dead go, a live writer's stay; prepare.py's workers end with it."""
import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_TEXT

from atomic_write import process_alive
from dataset import DatasetWriter
from metrics import MetricsLog
from tokenizer import make_tokenizer


@pytest.fixture(scope='module')
def pids():
    """(a dead process's pid, a live one's)."""
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    assert not process_alive(dead.pid)
    return dead.pid, os.getppid()


@pytest.mark.parametrize('names,clean', [
    (['metrics.jsonl'], lambda folder: MetricsLog(folder)),
    (['train.bin', 'val.mask.bin', 'meta.json', 'tokenizer.json'],
     lambda folder: DatasetWriter(folder, make_tokenizer('char', TINY_TEXT)).__exit__(None, None, None)),
], ids=['metrics log', 'dataset'])
def test_a_dead_writers_temporaries_go_a_live_ones_stay(tmp_path, pids, names, clean):
    dead, live = pids
    for name in names:
        for pid in pids:
            (tmp_path / f'{name}.tmp{pid}').write_bytes(b'half')
    (tmp_path / f'notes.txt.tmp{dead}').write_bytes(b'not ours')
    clean(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir() if '.tmp' in p.name)
    assert left == sorted([f'{name}.tmp{live}' for name in names] + [f'notes.txt.tmp{dead}'])


def test_ctrl_c_before_prepare_starts_writing_says_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C while prepare.py still reads its settings and lists its input (before its writing started) gave a
    traceback: it says the one line a Ctrl-C later says."""
    import prepare
    from configurator import config_keys
    for key in config_keys(vars(prepare)):  # main() sets the module's settings: they go back after the test
        monkeypatch.setattr(prepare, key, getattr(prepare, key))

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, 'input_files', interrupted)
    with pytest.raises(SystemExit) as exit:
        prepare.main([f'--input={tmp_path}', f'--out_dir={tmp_path / "out"}'])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err == 'error: interrupted: nothing was written\n', err


def children(pid):
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(child) for child in f.read().split()]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_prepare_workers_end_when_prepare_is_killed(tmp_path):
    """kill -9 of prepare.py mid-run: its worker processes end with it (they lived on under PID 1, minutes after)."""
    import time
    from conftest import ROOT, script_env
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n\n'.join(f'{i}: {TINY_TEXT[i % 500:]}' for i in range(600)), encoding='utf-8')
    proc = subprocess.Popen([sys.executable, str(ROOT / 'prepare.py'), f'--input={corpus}', f'--out_dir={tmp_path / "out"}',
                             '--tokenizer=bpe', '--vocab_size=2000', '--num_proc=2', '--batch_mb=0.2'], cwd=ROOT,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().startswith('preparing')
    deadline = time.time() + 30
    while len(children(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) >= 2, workers
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(process_alive(pid) and not zombie(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(process_alive(pid) and not zombie(pid) for pid in workers)


def zombie(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_training_processes_end_with_a_killed_torchrun_agent_and_free_out_dir(tmp_path, char_dataset):
    """kill -9 of torchrun's agent mid-run: both training processes save and stop (they trained on under PID 1,
    holding out_dir's lock), and the next run in out_dir resumes from their checkpoint."""
    import time
    from conftest import DDP_TRAIN, ROOT, run, script_env
    out = tmp_path / 'out'
    agent = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                              'train.py', *DDP_TRAIN, f'--dataset={char_dataset}', f'--out_dir={out}',
                              '--max_iters=100000', '--eval_interval=100000'], cwd=ROOT, env=script_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in agent.stdout:
        if line.startswith('iter 2:'):
            break
    ranks = children(agent.pid)
    assert len(ranks) == 2, ranks
    agent.kill()
    agent.wait()
    deadline = time.time() + 60
    while any(process_alive(pid) and not zombie(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) and not zombie(pid) for pid in ranks)
    saved = json.loads((out / 'checkpoint.json').read_text())['iter_num']
    proc = run('train.py', *DDP_TRAIN, f'--dataset={char_dataset}', f'--out_dir={out}', '--init_from=resume',
               f'--max_iters={saved + 1}')
    assert f'iter {saved + 1}:' in proc.stdout
