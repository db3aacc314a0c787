"""Tests for bench.py: argument handling, the figures it derives from train.py's log, stopping at the
target, and a two-sided comparison end to end."""
import re

import pytest
from conftest import TINY_TRAIN, assert_clean_error, run, torch_threads, val_losses

import bench
from model import GPT, GPTConfig

TINY_BENCH = [*TINY_TRAIN, '--eval_interval=5', '--always_save_checkpoint=False']


def run_bench(*args):
    return run('bench.py', *args, check=False)


def test_arguments_split_into_two_sides():
    options, a, b = bench.parse_args(['config/x.py', '--n_layer=2', '--runs=5', '--vs', 'config/y.py', '--steps=7'])
    assert (a, b) == (['config/x.py', '--n_layer=2'], ['config/y.py'])
    assert options == dict(runs=5, steps=7, target=None)
    # a B side without a config file is A plus those overrides; with --vs, runs default to 3 each
    options, a, b = bench.parse_args(['config/x.py', '--n_layer=2', '--vs', '--optimizer=muon', '--target=1.5'])
    assert b == ['config/x.py', '--n_layer=2', '--optimizer=muon']
    assert options == dict(runs=3, steps=None, target=1.5)
    options, a, b = bench.parse_args(['config/x.py'])
    assert b is None and options['runs'] == 1


@pytest.mark.parametrize('args,fragment', [
    (['--runs=two', 'config/x.py'], '--runs needs a number'),
    (['config/x.py', '--vs', '--lr=1', '--vs', '--lr=2'], '--vs appears twice'),
    (['--runs=2'], 'name a config to benchmark'),
    (['config/x.py', '--runs=0'], 'give at least 1'),
])
def test_bad_arguments_fail_with_one_line(args, fragment):
    proc = run_bench(*args)
    assert proc.returncode == 2
    assert_clean_error(proc, fragment)


def test_summary_figures_from_a_log():
    """Medians skip the first five logged iterations (compilation, warm-up); MFU is FLOPs / time / peak."""
    run = dict(iter_ms=[900.0, 50.0, 40.0, 30.0, 20.0] + [10.0, 12.0, 11.0, 500.0, 13.0], tokens_per_iter=1000,
               flops_per_token=6_000_000, peak_flops=1e12, peak_memory_mib=123.0, time_to_target=4.5,
               target_step=40, target_val_loss=1.2, evals=[(0, 4.0, 1.0), (40, 1.2, 4.5)], wall=6.0)
    s = bench.summarize(run)
    assert s['ms_per_iter'] == 12.0  # median of 10, 12, 11, 500, 13: an evaluation pause does not move it
    assert s['tokens_per_sec'] == pytest.approx(1000 / 0.012)
    assert s['mfu'] == pytest.approx(0.5)  # 6e6 FLOPs x 1000 tokens in 12 ms = 5e11 FLOP/s, half of 1e12
    assert (s['time_to_target'], s['target_step'], s['last_val_loss']) == (4.5, 40, 1.2)
    # no peak known (a CPU): no MFU
    assert bench.summarize(dict(run, peak_flops=None))['mfu'] is None


def test_run_stops_at_the_target_and_reads_the_log(char_dataset, monkeypatch, tmp_path):
    """A run that would go on for 100,000 steps is stopped at the first evaluation at or below the target;
    the figures come from train.py's own lines."""
    monkeypatch.setenv('OMP_NUM_THREADS', torch_threads())  # bench.run_train starts train.py in os.environ
    config = tmp_path / 'sparse_log.py'
    config.write_text('log_interval = 5\n')  # bench times every iteration all the same
    args = [str(config), *[a for a in TINY_BENCH if not a.startswith('--log_interval')], f'--dataset={char_dataset}',
            '--max_iters=100000']
    run = bench.run_train(args, target=3.2)
    assert run['returncode'] == 0
    losses = val_losses('\n'.join(run['lines']))
    first_hit = next(i for i, v in enumerate(losses) if v <= 3.2)
    assert losses[:first_hit + 1] == [v for _, v, _ in run['evals']]  # nothing was evaluated after the target
    assert run['target_val_loss'] == losses[first_hit] and run['target_step'] == 5 * first_hit
    assert 0 < run['time_to_target'] <= run['wall'] < 300
    assert run['tokens_per_iter'] == 8 * 32  # batch_size * block_size
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64, bias=False))
    assert run['flops_per_token'] == model.flops_per_token()
    assert run['peak_flops'] is None and run['memory_kind'] == 'RSS' and run['peak_memory_mib'] > 10
    assert len(run['iter_ms']) == run['target_step']  # one timing per iteration


def test_compare_two_sides(char_dataset):
    """A against B = A + overrides, alternating; the table's ratios are B / A of the medians it prints."""
    data = f'--dataset={char_dataset}'
    proc = run_bench(*TINY_BENCH, data, '--max_iters=1000', '--runs=2', '--target=3.2', '--vs', '--optimizer=muon',
                     '--muon_lr=0.03')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    order = re.findall(r'^([AB]) run (\d)/2', out, re.M)
    assert order == [('A', '1'), ('B', '1'), ('A', '2'), ('B', '2')]
    assert f'B: python train.py {" ".join(TINY_BENCH)} {data} --max_iters=1000 --optimizer=muon --muon_lr=0.03' in out
    row = re.search(r'^wall time to val loss <= 3.2 \(s\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$', out, re.M)
    a, b, ratio = map(float, row.groups())
    assert ratio == pytest.approx(b / a, rel=0.05, abs=0.01)  # the table rounds a and b
    per_run = {side: [float(t) for t in re.findall(rf'^{side} run \d/2: val loss [\d.]+ at step \d+ after ([\d.]+) s', out, re.M)]
               for side in 'AB'}
    assert a == pytest.approx(sum(per_run['A']) / 2, abs=0.11) and b == pytest.approx(sum(per_run['B']) / 2, abs=0.11)
    assert re.search(r'^ms per iteration\s+[\d.]+\s+[\d.]+\s+[\d.]+x$', out, re.M)
    assert re.search(r'^peak memory, RSS \(MiB\)\s+[\d,]+\s+[\d,]+\s+[\d.]+x$', out, re.M)
    assert 'A reaches val loss <= 3.2 in' in out


def test_a_failing_run_names_the_side_and_the_reason(char_dataset):
    proc = run_bench(*TINY_BENCH, f'--dataset={char_dataset}', '--n_layr=2')
    assert proc.returncode == 2
    assert_clean_error(proc, 'A (python train.py', "unknown config key 'n_layr'")


def test_gpu_acceptance_script_says_it_needs_a_gpu():
    proc = run('bench_gpu.py', '--device=cpu', check=False)
    assert proc.returncode == 2
    assert_clean_error(proc, 'measures a CUDA GPU', '--tiny=True')


@pytest.mark.slow
def test_gpu_acceptance_script_rehearses_on_the_cpu(char_dataset):
    """Every step of the GPU run (both Shakespeare configs to a target, the GPT-2 shape's throughput on random
    tokens, KV-cache sampling, a torchrun save-resume-finish under FSDP) with tiny models, ending in the table."""
    proc = run('bench_gpu.py', '--tiny=True', '--device=cpu', f'--dataset={char_dataset}')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout[proc.stdout.index('rehearsal (--tiny=True)'):]
    assert re.search(r'config/shakespeare_char_speedrun.py to val loss 4.5 +val [\d.]+ at step \d+ after', table)
    assert re.search(r'GPT-2 124M, bf16, compiled: ms per step +[\d.]+$', table, re.M)
    assert re.search(r'batch_size=auto: micro-batch, accumulation steps, peak MiB +\d+, \d+, [\d,]+$', table, re.M)
    assert re.search(r'decoding: 100 tokens with the cache / without +[\d,]+ / [\d,]+ tokens/s: .*same tokens: yes$',
                     table, re.M)
    assert re.search(r'decoding: batch 4, different prompts, eager +[\d,]+ tokens/s +[\d.]+x batch 1$', table, re.M)
    assert re.search(r'torchrun, 1 process, FSDP: train, save, resume, finish, with samples +ok in \d+ s; '
                     r'recompilations for the samples: 0$', table, re.M)
    assert re.search(r'resumed run, peak MiB by phase +resume \d+; training \d+; save \d+$', table, re.M)
