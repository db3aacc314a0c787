"""install.sh, quickstart.sh and test.sh decide what to install and what to run; these tests check the
decisions offline in a second or two, installing nothing: the venv's python is a fake that records every
call and plays a scenario (is torch importable, what would pip's dry run install from each source, is
CUDA available), and a fake nvidia-smi (and uname) on PATH plays the machine."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import ROOT

CPU_INDEX = 'https://download.pytorch.org/whl/cpu'

# The fake python. Sources of PyTorch, told apart by the arguments install.sh gives pip: 'cpu_index'
# (--index-url), 'pin' (torch==2.13.0) and 'plain' (anything else); each is null (pip fails: offline, or no
# such release) or what the dry run would install: {"torch": version, "extra": [other distributions]}.
FAKE_PYTHON = r'''
import json, os, sys

args = sys.argv[1:]
scenario = json.load(open(os.environ['FAKE_SCENARIO']))
with open(scenario['log'], 'a') as log:
    log.write(json.dumps(args) + '\n')


def real_python():  # what the fake does not play, the real interpreter runs (install.sh's report parser)
    os.execv(sys.executable, [sys.executable, *args])


if args[:1] == ['-c']:
    code = args[1]
    if 'version_info' in code:  # install.sh's "Python 3.10 or newer?"
        sys.exit(0 if scenario.get('python_ok', True) else 1)
    if 'import torch' in code:
        if scenario.get('torch') is None:
            sys.exit("ModuleNotFoundError: No module named 'torch'")
        print(scenario.get('cuda', False) if 'cuda.is_available' in code else scenario['torch'])
        sys.exit(0)
    if 'import pip' in code:  # pip new enough for --dry-run --report
        sys.exit(0)
    real_python()
if args == ['--version']:
    print('Python 3.11.7' if scenario.get('python_ok', True) else 'Python 3.8.10')
    sys.exit(0)
if args[:2] == ['-m', 'venv']:  # a new venv whose python is this fake again
    os.makedirs(os.path.join(args[2], 'bin'))
    shutil_src = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), 'python')
    with open(shutil_src) as src, open(os.path.join(args[2], 'bin', 'python'), 'w') as dst:
        dst.write(src.read())
    os.chmod(os.path.join(args[2], 'bin', 'python'), 0o755)
    sys.exit(0)
if args[:3] == ['-m', 'pip', 'install'] and '--dry-run' in args:
    source = 'cpu_index' if '--index-url' in args else 'pin' if 'torch==2.13.0' in args else 'plain'
    found = scenario['sources'].get(source)
    if found is None:
        sys.exit('ERROR: No matching distribution found for torch')
    names = [('torch', found['torch'])] + [(name, '1.0') for name in found['extra']]
    report = {'version': '1', 'install': [{'metadata': {'name': n, 'version': v},
                                           'download_info': {'url': f'file:///wheels/{n}-{v}-py3-none-any.whl'}}
                                          for n, v in names]}
    with open(args[args.index('--report') + 1], 'w') as f:
        json.dump(report, f)
    sys.exit(0)
if args[:1] == ['-']:
    real_python()
sys.exit(0)  # a real pip install, pytest, prepare.py, train.py, sample.py: recorded only
'''

GPU_LIST = 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f3c5c9a-1c2d-4e5f-8a9b-0c1d2e3f4a5b)'
NVIDIA_SMI = {  # what nvidia-smi -L does on each kind of machine
    'gpu': f'echo "{GPU_LIST}"',
    'no driver': 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver." >&2; exit 9',
    'no devices': 'echo "No devices were found"',
}

CPU_BUILD = {'torch': '2.15.0+cpu', 'extra': ['sympy', 'filelock']}
PIN_CPU_BUILD = {'torch': '2.13.0+cpu', 'extra': ['sympy']}
CUDA_BUILD = {'torch': '2.14.1', 'extra': ['sympy', 'nvidia-cublas-cu12', 'nvidia_cudnn_cu12', 'triton']}
TRITON_ONLY = {'torch': '2.14.1', 'extra': ['sympy', 'triton']}
UNDERSCORED_CUDA = {'torch': '2.14.1', 'extra': ['nvidia_nccl_cu12']}


def write_executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class Machine:
    """A temporary machine: a fake venv (or none yet), fake nvidia-smi and uname, a scenario, a call log."""

    def __init__(self, tmp_path, torch=None, sources=None, cuda=False, nvidia_smi='no driver', system='Linux',
                 python_ok=True, make_venv=True):
        self.tmp = tmp_path
        self.venv = tmp_path / 'venv'
        self.log = tmp_path / 'calls.jsonl'
        self.scenario = tmp_path / 'scenario.json'
        self.scenario.write_text(json.dumps(dict(log=str(self.log), torch=torch, cuda=cuda, python_ok=python_ok,
                                                 sources=sources or {})))
        fake = tmp_path / 'fake' / 'fake_python.py'
        fake.parent.mkdir()
        fake.write_text(FAKE_PYTHON)
        self.python = f'#!/bin/sh\nexec "{sys.executable}" "{fake}" "$@"\n'
        write_executable(tmp_path / 'fake' / 'python', self.python)  # the fake's template, for -m venv
        if make_venv:
            write_executable(self.venv / 'bin' / 'python', self.python)
        self.bin = tmp_path / 'bin'
        write_executable(self.bin / 'nvidia-smi', f'#!/bin/sh\n{NVIDIA_SMI[nvidia_smi]}\n')
        write_executable(self.bin / 'uname', f'#!/bin/sh\necho {system}\n')
        write_executable(self.bin / 'python3-old', self.python)  # a base python, for PYTHON=

    def run(self, script, *args, root=ROOT, **env):
        full_env = {k: v for k, v in os.environ.items() if k not in ('VENV', 'PYTHON', 'TORCH_CUDA_OK')}
        full_env.update(PATH=f'{self.bin}{os.pathsep}{os.environ["PATH"]}', FAKE_SCENARIO=str(self.scenario),
                        VENV=str(self.venv), **env)
        return subprocess.run(['bash', str(root / script), *args], cwd=self.tmp, env=full_env, capture_output=True,
                              text=True, timeout=60)

    def calls(self):
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def dry_runs(self):
        return [c for c in self.calls() if c[:3] == ['-m', 'pip', 'install'] and '--dry-run' in c]

    def installs(self):
        """The real pip installs (no dry run), in order."""
        return [c[3:] for c in self.calls() if c[:3] == ['-m', 'pip', 'install'] and '--dry-run' not in c]

    def torch_installs(self):
        return [c for c in self.installs() if any(a == 'torch' or a.startswith('torch==') for a in c)]


def ok(proc):
    assert proc.returncode == 0, f'{proc.stdout}\n{proc.stderr}'
    return proc


def installs_requirements(machine, name='requirements.txt'):
    last = machine.installs()[-1]
    return last[-2:] == ['-r', str(ROOT / name)]


# --- install.sh: which PyTorch --------------------------------------------------------------------------

def test_cpu_machine_online_takes_the_cpu_index(tmp_path):
    m = Machine(tmp_path, sources=dict(cpu_index=CPU_BUILD, pin=PIN_CPU_BUILD, plain=CUDA_BUILD))
    proc = ok(m.run('install.sh'))
    assert len(m.dry_runs()) == 1  # the first acceptable source wins: the others are not even asked
    assert m.torch_installs() == [['torch==2.15.0+cpu', '--index-url', CPU_INDEX, '--timeout', '10', '--retries', '1']]
    assert installs_requirements(m)
    assert 'torch 2.15.0+cpu, a CPU build' in proc.stdout


def test_cpu_index_is_asked_with_a_short_network_timeout(tmp_path):
    m = Machine(tmp_path, sources=dict(cpu_index=CPU_BUILD))
    ok(m.run('install.sh'))
    (dry,) = m.dry_runs()
    assert dry[dry.index('--index-url') + 1] == CPU_INDEX
    assert int(dry[dry.index('--timeout') + 1]) <= 15 and int(dry[dry.index('--retries') + 1]) <= 1


@pytest.mark.parametrize('cpu_index', [None, CUDA_BUILD], ids=['cpu index unreachable', 'cpu index gives cuda'])
def test_cpu_machine_offline_takes_the_pinned_cpu_build(tmp_path, cpu_index):
    # offline, pip's configured find-links still answer a --index-url query, possibly with a CUDA build
    m = Machine(tmp_path, sources=dict(cpu_index=cpu_index, pin=PIN_CPU_BUILD, plain=CUDA_BUILD))
    proc = ok(m.run('install.sh'))
    assert len(m.dry_runs()) == 2
    assert m.torch_installs() == [['torch==2.13.0+cpu']]
    assert installs_requirements(m)
    assert ('not available' if cpu_index is None else 'a CUDA build') in proc.stdout


def test_cpu_machine_falls_back_to_any_cpu_build_on_the_configured_index(tmp_path):
    m = Machine(tmp_path, sources=dict(cpu_index=None, pin=None, plain=CPU_BUILD))
    ok(m.run('install.sh'))
    assert len(m.dry_runs()) == 3
    assert m.torch_installs() == [['torch==2.15.0+cpu']]


@pytest.mark.parametrize('pin, plain', [(CUDA_BUILD, CUDA_BUILD), (TRITON_ONLY, UNDERSCORED_CUDA), (None, None)],
                         ids=['cuda builds', 'triton and nvidia_ spellings', 'nothing at all'])
def test_cpu_machine_with_only_cuda_builds_says_what_to_do_and_installs_nothing(tmp_path, pin, plain):
    m = Machine(tmp_path, sources=dict(cpu_index=None, pin=pin, plain=plain))
    proc = m.run('install.sh')
    assert proc.returncode != 0
    assert len(m.dry_runs()) == 3
    assert m.installs() == []  # neither torch nor the requirements (which would pull the CUDA build)
    assert 'no CPU build of PyTorch' in proc.stderr
    assert f'--index-url {CPU_INDEX}' in proc.stderr and 'TORCH_CUDA_OK=1' in proc.stderr
    assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('nvidia_smi', NVIDIA_SMI)
def test_nvidia_gpu_gets_the_default_build_and_a_broken_nvidia_smi_does_not_count(tmp_path, nvidia_smi):
    m = Machine(tmp_path, nvidia_smi=nvidia_smi, sources=dict(cpu_index=CPU_BUILD, plain=CUDA_BUILD))
    ok(m.run('install.sh'))
    if nvidia_smi == 'gpu':
        assert m.dry_runs() == [] and m.torch_installs() == [['torch']]
    else:
        assert len(m.dry_runs()) == 1 and m.torch_installs()[0][0] == 'torch==2.15.0+cpu'
    assert installs_requirements(m)


def test_macos_gets_the_default_build(tmp_path):
    m = Machine(tmp_path, system='Darwin', sources=dict(cpu_index=CPU_BUILD))
    ok(m.run('install.sh'))
    assert m.dry_runs() == [] and m.torch_installs() == [['torch']]


def test_torch_cuda_ok_accepts_the_default_build(tmp_path):
    m = Machine(tmp_path, sources=dict(cpu_index=None, pin=CUDA_BUILD, plain=CUDA_BUILD))
    proc = ok(m.run('install.sh', TORCH_CUDA_OK='1'))
    assert m.dry_runs() == [] and m.torch_installs() == [['torch']]
    assert 'TORCH_CUDA_OK=1' in proc.stdout


@pytest.mark.parametrize('args, requirements', [([], 'requirements.txt'), (['--dev'], 'requirements-dev.txt'),
                                                (['--serve'], 'requirements-serve.txt')])
def test_torch_in_the_venv_is_kept(tmp_path, args, requirements):
    m = Machine(tmp_path, torch='2.13.0+cpu', nvidia_smi='gpu', sources=dict(cpu_index=CPU_BUILD, plain=CUDA_BUILD))
    proc = ok(m.run('install.sh', *args))
    assert m.dry_runs() == [] and m.torch_installs() == []
    assert m.installs() == [['--quiet', '-r', str(ROOT / requirements)]]  # still checked: a no-op when satisfied
    assert 'PyTorch 2.13.0+cpu is in the venv already' in proc.stdout


def test_torch_older_than_requirements_is_replaced_by_a_cpu_build(tmp_path):
    """Left in place, requirements.txt (torch>=2.6) would have pip upgrade it to the index's default: CUDA on Linux."""
    m = Machine(tmp_path, torch='2.4.1+cpu', sources=dict(cpu_index=CPU_BUILD, plain=CUDA_BUILD))
    proc = ok(m.run('install.sh'))
    assert ['-m', 'pip', 'uninstall', '--quiet', '--yes', 'torch'] in m.calls()
    assert m.torch_installs()[0][0] == 'torch==2.15.0+cpu' and '--index-url' in m.torch_installs()[0]
    assert 'older than 2.6' in proc.stdout


def test_missing_venv_is_created_with_the_named_python(tmp_path):
    m = Machine(tmp_path, make_venv=False, sources=dict(cpu_index=CPU_BUILD))
    ok(m.run('install.sh', PYTHON='python3-old'))
    assert ['-m', 'venv', str(m.venv)] in m.calls()
    assert (m.venv / 'bin' / 'python').exists() and m.torch_installs()[0][0] == 'torch==2.15.0+cpu'


@pytest.mark.parametrize('make_venv', [False, True], ids=['new venv', 'existing venv'])
def test_python_older_than_3_10_is_refused(tmp_path, make_venv):
    m = Machine(tmp_path, python_ok=False, make_venv=make_venv, sources=dict(cpu_index=CPU_BUILD))
    proc = m.run('install.sh', PYTHON='python3-old')
    assert proc.returncode != 0 and 'Python 3.10 or newer' in proc.stderr
    assert m.installs() == [] and m.dry_runs() == []
    assert make_venv or not m.venv.exists()  # no venv made from a Python too old


def test_install_rejects_unknown_arguments(tmp_path):
    m = Machine(tmp_path)
    proc = m.run('install.sh', '--cuda')
    assert proc.returncode == 2 and 'usage' in proc.stderr and m.calls() == []


# --- quickstart.sh and test.sh: what runs ------------------------------------------------------------

def copy_front_door(tmp_path):
    """The scripts in a folder of their own, where prepared data and checkpoints can be faked freely."""
    repo = tmp_path / 'repo'
    (repo / '.ci').mkdir(parents=True)
    for name in ('install.sh', 'quickstart.sh', 'test.sh', 'requirements.txt', 'requirements-dev.txt', '.ci/run'):
        shutil.copy(ROOT / name, repo / name)
    return repo


# train.py --init_from=auto resumes where a checkpoint is (tests/test_fit.py), so a second run goes on, or ends at once
@pytest.mark.parametrize('cuda, prepared, checkpoint, expect', [
    (False, [], None, ('prepare', 'config/shakespeare_char_cpu.py', 'out-shakespeare-char-cpu')),
    (False, ['train.bin', 'val.bin', 'meta.json'], 'out-shakespeare-char-cpu',
     (None, 'config/shakespeare_char_cpu.py', 'out-shakespeare-char-cpu')),
    # meta.json is missing (an interrupted prepare): prepare again; the CPU run's checkpoint is not the GPU's
    (True, ['train.bin', 'val.bin'], 'out-shakespeare-char-cpu',
     ('prepare', 'config/shakespeare_char.py', 'out-shakespeare-char')),
    (True, ['train.bin', 'val.bin', 'meta.json'], 'out-shakespeare-char',
     (None, 'config/shakespeare_char.py', 'out-shakespeare-char')),
], ids=['cpu fresh', 'cpu second run', 'gpu half prepared', 'gpu second run'])
def test_quickstart_prepares_trains_or_resumes_and_samples(tmp_path, cuda, prepared, checkpoint, expect):
    repo = copy_front_door(tmp_path)
    data = repo / 'data' / 'shakespeare_char'
    data.mkdir(parents=True)
    for name in prepared:
        (data / name).write_text('x')
    if checkpoint:
        (repo / checkpoint).mkdir()
        (repo / checkpoint / 'checkpoint.json').write_text('{}')
    m = Machine(tmp_path, torch='2.13.0+cpu', cuda=cuda)
    ok(m.run('quickstart.sh', root=repo))
    scripts = [c for c in m.calls() if c and c[0].endswith('.py')]
    prepare, config, out_dir = expect
    assert scripts == ([['data/shakespeare_char/prepare.py']] if prepare else []) + [
        ['train.py', config, f'--out_dir={out_dir}', '--init_from=auto'],
        ['sample.py', f'--out_dir={out_dir}', '--start=ROMEO:', '--num_samples=2', '--max_new_tokens=300']]
    assert m.installs() == [['--quiet', '-r', str(repo / 'requirements.txt')]]  # install.sh ran first


def test_quickstart_stops_when_install_fails(tmp_path):
    repo = copy_front_door(tmp_path)
    m = Machine(tmp_path, sources=dict(cpu_index=None, pin=CUDA_BUILD, plain=CUDA_BUILD))
    proc = m.run('quickstart.sh', root=repo)
    assert proc.returncode != 0 and 'TORCH_CUDA_OK=1' in proc.stderr
    assert not [c for c in m.calls() if c and c[0].endswith('.py')]


WORKERS = ['-n', '2', '--dist', 'loadfile']  # pytest-xdist: two worker processes, whole files each


@pytest.mark.parametrize('script, args, pytest_args', [
    ('test.sh', ['-k', 'tokenizer'], [*WORKERS, 'tests', '-k', 'tokenizer']),
    ('.ci/run', [], [*WORKERS, 'tests']),
    ('test.sh', ['-x', 'tests/test_a.py::test_b'], [*WORKERS, '-x', 'tests/test_a.py::test_b']),  # that test only
])
def test_test_command_installs_dev_requirements_and_passes_arguments_to_pytest(tmp_path, script, args, pytest_args):
    repo = copy_front_door(tmp_path)
    (repo / 'tests').mkdir()
    (repo / 'tests' / 'test_a.py').write_text('def test_b():\n    pass\n')
    m = Machine(tmp_path, torch='2.13.0+cpu')
    ok(m.run(script, *args, root=repo))
    assert m.installs() == [['--quiet', '-r', str(repo / 'requirements-dev.txt')]]
    assert m.calls()[-1] == ['-m', 'pytest', '-q', '-rs', *pytest_args]


def test_tiny_shakespeare_ships_with_the_repository_byte_for_byte():
    path = ROOT / 'data' / 'shakespeare_char' / 'input.txt'
    raw = path.read_bytes()
    assert len(raw.decode('utf-8')) == 1_115_394 and b'\r' not in raw and raw.startswith(b'First Citizen:\n')
    if shutil.which('git') and (ROOT / '.git').exists():  # tracked (not ignored) and never end-of-line converted
        rel = 'data/shakespeare_char/input.txt'
        assert subprocess.run(['git', 'check-ignore', '-q', rel], cwd=ROOT).returncode == 1
        attrs = subprocess.run(['git', 'check-attr', 'text', 'eol', rel], cwd=ROOT, capture_output=True, text=True).stdout
        assert f'{rel}: text: unset' in attrs, attrs
