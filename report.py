"""
A report page of a training run, or of several side by side: one self-contained HTML file (inline CSS, curves
drawn as inline SVG, no script, nothing fetched), to read in any browser or send to someone:

    python report.py out-shakespeare-char                   # -> out-shakespeare-char/report.html
    python report.py out-a out-b --out=compare.html          # several runs, a column (and a colour) each

It shows the loss curves against iterations and wall time, time, tokens/s, MFU and peak memory, the settings that
differ from train.py's defaults, the machine and the versions, the data and tokenizer, the samples drawn during
training, the events of the run (divergence, out of memory), and what eval.py measured of its checkpoints (loss,
multiple-choice accuracy, the figures of samples). All of it comes from the files the run left in out_dir
(metrics.py describes them): metrics.jsonl, evals.jsonl and checkpoint.json. train.py writes out_dir/report.html at
the end of training; run_facts() is what it records for the page when it starts.
"""
import html
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

from atomic_write import atomic_write_bytes
from configurator import fail, run_folder_arguments
from metrics import KINDS, METRICS_NAME, read_evals, read_metrics
from tokenizer import tokenizer_name

REPORT_NAME = 'report.html'
CHECKPOINT_JSON = 'checkpoint.json'  # checkpoint.CHECKPOINT_NAME, not imported: that would load PyTorch for a page
COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf']
MAX_POINTS = 1000  # per curve: a long run's step records are averaged in groups down to this many
SAMPLE_FIGURES = ('distinct-1', 'distinct-2', 'distinct-3', 'distinct-4', 'repeated 4-grams', 'longest repeat',
                  'copied 8-grams', 'self-perplexity')  # sample_quality.quality's, in its order


# -----------------------------------------------------------------------------
# what train.py records for the page when a run starts (the 'run' record of metrics.jsonl)

def run_facts(config, device, dtype, world_size, **facts):
    """The 'run' record's fields: settings, the settings that differ from the script's defaults (config is
    configurator's Config); python, torch, cuda, os, cpu, cpus, threads, device, device_name, dtype, world_size,
    parallel, commit (of this repository, when it is a git checkout), started; and facts, as given (train.py's:
    dataset, tokenizer, vocab_size, split_tokens, parameters, flops_per_token, tokens_per_iter, peak_flops)."""
    import torch  # here, not at the top: the page itself is drawn without PyTorch
    defaults = getattr(config, 'defaults', {})
    settings = {k: v for k, v in config.items() if k in defaults and v != defaults[k]}
    cpu = cpu_name()
    if device.startswith('cuda'):
        device_name = torch.cuda.get_device_name(device)
    elif device.startswith('mps'):
        device_name = f'Apple GPU ({platform.machine()})'
    else:
        device_name = cpu
    if 'tokenizer' in facts and isinstance(facts['tokenizer'], dict):
        facts['tokenizer'] = tokenizer_name(facts['tokenizer'])
    return dict(settings=settings, python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda if device.startswith('cuda') else None, os=platform.platform(), cpu=cpu,
                cpus=os.cpu_count(), threads=torch.get_num_threads(), device=device, device_name=device_name,
                dtype=dtype, world_size=world_size, parallel=config.get('parallel') if world_size > 1 else None,
                commit=git_commit(), started=time.strftime('%Y-%m-%d %H:%M:%S'), **facts)


def cpu_name():
    """The CPU's model name ('AMD EPYC 7763 64-Core Processor'), or what the platform says."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def git_commit():
    """The commit this code was checked out at, '+' when it has uncommitted changes; None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, 'GIT_OPTIONAL_LOCKS': '0'}  # read only: never take the index lock from a git command
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True, text=True,
                                timeout=5, env=env)
        if commit.returncode:
            return None
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                               capture_output=True, text=True, timeout=5, env=env).stdout.strip()
        return commit.stdout.strip() + ('+' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return None


# -----------------------------------------------------------------------------
# a run, as the page reads it from its folder

class Run:
    """What out_dir holds about one run: its records by kind, eval.py's records, its checkpoint.json (or None)."""

    def __init__(self, out_dir, label=None):
        self.out_dir = out_dir
        self.label = label or os.path.basename(os.path.normpath(out_dir))
        self.records = read_metrics(out_dir, KINDS)
        self.evals = read_evals(out_dir)
        try:
            with open(os.path.join(out_dir, CHECKPOINT_JSON), encoding='utf-8') as f:
                self.checkpoint = json.load(f)
        except (OSError, ValueError):
            self.checkpoint = None
        if not isinstance(self.checkpoint, dict):
            self.checkpoint = None
        self.starts = self.kind('run')
        # the latest start's facts: a resume on another machine reports that machine. A run recorded before
        # report.py existed has none: its checkpoint says what data it read
        self.facts = self.starts[-1] if self.starts else {}
        if not self.starts and self.checkpoint:
            tokenizer = self.checkpoint.get('tokenizer')
            self.facts = dict(dataset=self.checkpoint.get('config', {}).get('dataset'),
                              tokenizer=tokenizer_name(tokenizer) if isinstance(tokenizer, dict) else None)

    def kind(self, kind):
        return [r for r in self.records if r['kind'] == kind]

    def curve(self, kind, x, y):
        """[(x, y)] of the records of kind where both are finite numbers."""
        return [(r[x], r[y]) for r in self.kind(kind) if number(r.get(x)) and number(r.get(y))]

    def settings(self):
        """{key: value} of the settings that differ from train.py's defaults (the whole config of a run recorded
        before report.py existed, from its checkpoint), and whether they are the differences."""
        if self.facts.get('settings') is not None:
            return self.facts['settings'], True
        return (self.checkpoint or {}).get('config', {}), False

    def config(self, key):
        """A setting's value: the run's own where it differs from the defaults, else the checkpoint's, else None."""
        settings, _ = self.settings()
        if key in settings:
            return settings[key]
        return (self.checkpoint or {}).get('config', {}).get(key)


def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -----------------------------------------------------------------------------
# formatting

def esc(value):
    return html.escape(str(value), quote=True)


def fmt(value, digits=4):
    """A figure for a table cell: numbers rounded, thousands separated, nothing as an en dash."""
    if value is None or value == '':
        return '–'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, int):
        return f'{value:,}'
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f'{value:,.{digits}f}' if abs(value) < 1e6 else f'{value:.3e}'
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(number(v) or v is None for v in value):
        return fmt(value[0]) + ('' if value[1] is None else f' ± {value[1]:.4f}')  # (mean, standard error)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def duration(seconds):
    if not number(seconds):
        return '–'
    if seconds < 60:
        return f'{seconds:.1f} s'
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f'{minutes} min {s:02d} s'
    hours, minutes = divmod(minutes, 60)
    return f'{hours} h {minutes:02d} min'


def table(header, rows, cls=''):
    """An HTML table; header and rows are lists of cells, already HTML (esc() the text in them)."""
    head = ''.join(f'<th>{h}</th>' for h in header)
    body = ''.join('<tr>' + ''.join(f'<td>{c}</td>' for c in row) + '</tr>' for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def swatch(i):
    return f'<span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>'


def run_header(runs):
    return [''] + [f'{swatch(i)}{esc(run.label)}' for i, run in enumerate(runs)]


# -----------------------------------------------------------------------------
# the curves: inline SVG, drawn here

def nice_ticks(lo, hi, count=5):
    """About count round numbers spanning [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def thin(points, most=MAX_POINTS):
    """points, averaged in consecutive groups down to at most `most` of them (a long run logs every step)."""
    if len(points) <= most:
        return points
    size = math.ceil(len(points) / most)
    groups = [points[i:i + size] for i in range(0, len(points), size)]
    return [(sum(p[0] for p in g) / len(g), sum(p[1] for p in g) / len(g)) for g in groups]


def chart(runs, x, xlabel, width=560, height=320):
    """Train loss (each logged step, a thin line) and val loss (each evaluation, a line with a dot per point) of
    every run against x ('iter' or 'time'), and each event as a red dashed vertical line."""
    left, right, top, bottom = 56, 12, 12, 42
    series = []
    for i, run in enumerate(runs):
        series.append((i, 'train', thin(run.curve('step', x, 'train_loss'))))
        series.append((i, 'val', run.curve('eval', x, 'val_loss')))
    points = [p for *_, pts in series for p in pts]
    if not points:
        return '<p class="empty">no loss recorded yet (metrics.jsonl has no step or evaluation records)</p>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(0, min(xs)), max(xs) or 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda v: left + (v - x0) / ((x1 - x0) or 1) * (width - left - right)  # noqa: E731
    sy = lambda v: top + (y1 - v) / ((y1 - y0) or 1) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg class="chart" data-x="{x}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="loss against {esc(xlabel)}">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="plot"/>']
    for t in nice_ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in nice_ticks(x0, x1):
        label = f'{t:,.0f}' if x == 'iter' or t >= 10 else f'{t:g}'
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{height - bottom}" class="grid"/>'
                     f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" class="axis">'
                 f'{esc(xlabel)}</text><text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2})">loss</text>')
    for i, run in enumerate(runs):
        for event in run.kind('event'):
            if number(event.get(x)):
                parts.append(f'<line x1="{sx(event[x]):.1f}" x2="{sx(event[x]):.1f}" y1="{top}" y2="{height - bottom}" '
                             f'class="event"><title>{esc(run.label)}: {esc(event.get("what"))} at iteration '
                             f'{event["iter"]}: {esc(event.get("detail", ""))}</title></line>')
    for i, name, pts in series:
        if not pts:
            continue
        color = COLORS[i % len(COLORS)]
        d = 'M' + ' L'.join(f'{sx(a):.1f},{sy(b):.1f}' for a, b in pts)
        parts.append(f'<path d="{d}" class="{name}" data-run="{i}" data-points="{len(pts)}" stroke="{color}"/>')
        if name == 'val':
            parts.extend(f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="3" fill="{color}" class="val-point">'
                         f'<title>{esc(runs[i].label)}: val loss {b:.4f} at {x} {a:g}</title></circle>' for a, b in pts)
    parts.append('</svg>')
    return ''.join(parts)


# -----------------------------------------------------------------------------
# the sections of the page

def summary(runs):
    rows = {name: [] for name in ('status', 'iterations', 'wall time', 'tokens seen', 'tokens/s (median of steps)',
                                  'MFU (last)', 'best val loss', 'last val loss', 'last val bits/byte', 'parameters',
                                  'training FLOPs per token', 'peak memory (MiB)', '(re)starts', 'events')}
    for run in runs:
        steps, evals, ends = run.kind('step'), run.kind('eval'), run.kind('end')
        # the furthest record (file order can differ: an event logged by another tool after the end)
        last = max(run.records, key=lambda r: (r['iter'], r['kind'] == 'end'), default=None)
        max_iters = run.config('max_iters')
        if last is None:
            status = 'no records'
        elif last['kind'] == 'end':
            status = f"ended at iteration {last['iter']:,}"
        else:
            status = f"running, or stopped (no end record): last record at iteration {last['iter']:,}"
        rows['status'].append(esc(status))
        iters = last['iter'] if last else (run.checkpoint or {}).get('iter_num')
        rows['iterations'].append(esc(fmt(iters) + (f' of {max_iters:,}' if isinstance(max_iters, int) else '')))
        times = [r['time'] for r in run.records if number(r.get('time'))]
        rows['wall time'].append(esc(duration(max(times) if times else None)))
        per_iter = run.facts.get('tokens_per_iter')
        rows['tokens seen'].append(esc(fmt(iters * per_iter if number(per_iter) and iters else None)))
        speeds = [r['tokens_per_sec'] for r in steps if number(r.get('tokens_per_sec'))]
        rows['tokens/s (median of steps)'].append(esc(fmt(round(statistics.median(speeds)) if speeds else None)))
        mfus = [r['mfu'] for r in steps if number(r.get('mfu'))]
        no_mfu = 'n/a (no peak FLOP/s known for this device)' if steps else None
        rows['MFU (last)'].append(esc(fmt(f'{mfus[-1] * 100:.2f}%' if mfus else no_mfu)))
        val = [r['val_loss'] for r in evals if number(r.get('val_loss'))]
        rows['best val loss'].append(esc(fmt(min(val) if val else (run.checkpoint or {}).get('best_val_loss'))))
        rows['last val loss'].append(esc(fmt(val[-1] if val else None)))
        bpb = [r['val_bits_per_byte'] for r in evals if number(r.get('val_bits_per_byte'))]
        rows['last val bits/byte'].append(esc(fmt(bpb[-1] if bpb else None)))
        rows['parameters'].append(esc(fmt(run.facts.get('parameters'))))
        rows['training FLOPs per token'].append(esc(fmt(run.facts.get('flops_per_token'))))
        peaks = ends[-1].get('peak_memory_mib') if ends else None
        peaks = {k: v for k, v in peaks.items() if number(v)} if isinstance(peaks, dict) else {}
        what = 'allocated by PyTorch' if str(run.facts.get('device', '')).startswith('cuda') else 'resident'
        by_phase = ', '.join(f'{k} {v:,.0f}' for k, v in peaks.items())
        rows['peak memory (MiB)'].append(esc(f'{max(peaks.values()):,.0f} ({what}; by phase: {by_phase})' if peaks
                                             else '–'))
        starts = ', '.join(f"iteration {r['iter']:,} ({r.get('started', '?')})" for r in run.starts)
        rows['(re)starts'].append(esc(starts or '–'))
        rows['events'].append(esc(len(run.kind('event'))))
    return table(run_header(runs), [[esc(name), *cells] for name, cells in rows.items()], 'figures')


def settings_section(runs):
    per_run = [run.settings() for run in runs]
    keys = sorted({k for settings, _ in per_run for k in settings})
    if not keys:
        return '<p class="empty">every setting at train.py\'s default</p>'
    rows = []
    for key in keys:
        cells = []
        for settings, diff in per_run:
            cells.append(f'<code>{esc(repr(settings[key]))}</code>' if key in settings else
                         '<span class="default">default</span>' if diff else '–')
        rows.append([f'<code>{esc(key)}</code>', *cells])
    note = '' if all(diff for _, diff in per_run) else (
        '<p class="note">a run recorded before report.py existed shows its whole config (from its checkpoint)</p>')
    return table(run_header(runs), rows, 'settings') + note


MACHINE = (('device', 'device'), ('device name', 'device_name'), ('CPU', 'cpu'), ('CPU cores', 'cpus'),
           ('torch threads', 'threads'), ('dtype', 'dtype'), ('processes', 'world_size'), ('parallel', 'parallel'),
           ('PyTorch', 'torch'), ('CUDA', 'cuda'), ('Python', 'python'), ('OS', 'os'), ('commit', 'commit'))
DATA = (('dataset', 'dataset'), ('tokenizer', 'tokenizer'), ('vocabulary', 'vocab_size'),
        ('tokens per iteration', 'tokens_per_iter'))


def facts_section(runs, fields):
    rows = [[esc(name), *(esc(fmt(run.facts.get(key))) for run in runs)] for name, key in fields]
    return table(run_header(runs), rows, 'facts')


def data_section(runs):
    rows = [[esc(name), *(esc(fmt(run.facts.get(key))) for run in runs)] for name, key in DATA]
    splits = [run.facts.get('split_tokens') or {} for run in runs]
    for split in ('train', 'val'):
        rows.append([esc(f'{split} tokens'), *(esc(fmt(s.get(split))) for s in splits)])
    return table(run_header(runs), rows, 'facts')


def events_section(runs):
    rows = [[f'{swatch(i)}{esc(run.label)}', esc(f"{e['iter']:,}"), esc(duration(e.get('time'))),
             f'<b>{esc(e.get("what", "?"))}</b>', esc(e.get('detail', ''))]
            for i, run in enumerate(runs) for e in run.kind('event')]
    if not rows:
        return '<p class="empty">none: no divergence, no out-of-memory retry, nothing else logged</p>'
    return table(['run', 'iteration', 'time', 'what', 'detail'], rows, 'events')


def samples_section(runs):
    columns = []
    for i, run in enumerate(runs):
        samples = run.kind('sample')
        body = ''.join(f'<div class="sample"><div class="at">iteration {s["iter"]:,} · {esc(duration(s.get("time")))}'
                       f'</div><pre>{esc(s.get("text", ""))}</pre></div>' for s in samples)
        columns.append(f'<div class="column"><h3>{swatch(i)}{esc(run.label)}</h3>'
                       f'{body or "<p class=empty>no sample drawn (sample_interval=0)</p>"}</div>')
    return f'<div class="columns">{"".join(columns)}</div>'


def evals_section(runs):
    """eval.py's records of each run's checkpoints: losses, multiple-choice accuracies, the figures of samples."""
    loss_rows, task_rows, figure_rows = [], [], []
    for i, run in enumerate(runs):
        name = f'{swatch(i)}{esc(run.label)}'
        for e in run.evals:
            at = [name, esc(e.get('date', '')), esc(f"{e.get('checkpoint', '')} ({e['iter']:,})")]
            if 'loss' in e:
                bpb = fmt(e.get('bits_per_byte')) + ('*' if e.get('lossy') else '')
                loss_rows.append([*at, esc(e.get('data', '')), esc(fmt(e.get('tokens'))), esc(fmt(e.get('loss'))),
                                  esc(fmt(e.get('perplexity'), 3)), esc(bpb)])
            if 'task' in e:
                task_rows.append([*at, esc(e['task']), esc(fmt(e.get('items'))), esc(fmt(e.get('shots'))),
                                  *(esc(fmt(e.get(k))) for k in ('acc', 'acc_norm', 'acc_token', 'chance'))])
            if isinstance(e.get('sample_figures'), dict):
                figures = e['sample_figures']
                figure_rows.append([*at, esc(fmt(e.get('samples'))),
                                    *(esc(fmt(figures.get(k), 3)) for k in SAMPLE_FIGURES)])
    parts = []
    if loss_rows:
        parts.append('<h3>Loss</h3>' + table(['run', 'date', 'checkpoint (iteration)', 'data', 'tokens', 'loss',
                                              'perplexity', 'bits/byte'], loss_rows, 'eval-loss'))
    if task_rows:
        parts.append('<h3>Multiple choice</h3>' + table(['run', 'date', 'checkpoint (iteration)', 'task', 'items',
                                                         'shots', 'acc', 'acc_norm', 'acc_token', 'chance'],
                                                        task_rows, 'eval-task'))
    if figure_rows:
        parts.append('<h3>Samples</h3>' + table(['run', 'date', 'checkpoint (iteration)', 'samples', *SAMPLE_FIGURES],
                                                figure_rows, 'eval-samples'))
    if not parts:
        return ('<p class="empty">none yet: <code>python eval.py --out_dir=OUT_DIR --samples=20</code> (and '
                '<code>--task=...</code>) record theirs here</p>')
    return ''.join(parts)


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #1d1d1f; background: #fff; font-size: 14px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin: 12px 0 6px; }
.meta, .note, .empty { color: #666; }
table { border-collapse: collapse; margin: 6px 0; } th, td { border: 1px solid #ddd; padding: 3px 8px;
        text-align: left; vertical-align: top; } th { background: #f4f4f6; } td code { font-size: 12px; }
.figures td:first-child, .facts td:first-child, .settings td:first-child { font-weight: 600; white-space: nowrap; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }
.default { color: #999; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
svg.chart { background: #fff; font-size: 11px; } svg .plot { fill: #fbfbfd; stroke: #ccc; }
svg .grid { stroke: #e6e6e6; } svg .axis { font-size: 12px; } svg text { fill: #444; }
svg path { fill: none; stroke-linejoin: round; } svg path.train { stroke-width: 1.2; opacity: 0.45; }
svg path.val { stroke-width: 2; } svg .event { stroke: #d00; stroke-dasharray: 4 3; stroke-width: 1.5; }
.legend { color: #444; margin: 4px 0; }
.columns { display: flex; gap: 16px; align-items: flex-start; } .column { flex: 1; min-width: 0; }
.column > div.sample { max-height: none; }
.sample .at { color: #666; font-size: 12px; margin-top: 8px; }
pre { white-space: pre-wrap; word-break: break-word; background: #f7f7f9; border: 1px solid #e4e4e8;
      padding: 6px 8px; margin: 2px 0; font-size: 12px; max-height: 240px; overflow: auto; }
"""


def render(runs):
    """The page of runs (Run objects), as a string."""
    title = 'Training report: ' + ', '.join(run.label for run in runs)
    legend = ('<p class="legend">' + ' '.join(f'{swatch(i)}{esc(run.label)}' for i, run in enumerate(runs)) +
              ' — thin line: train loss of each logged step; line with dots: val loss of each evaluation; '
              'red dashed line: an event</p>')
    sections = [
        ('Summary', summary(runs)),
        ('Loss curves', legend + '<div class="charts">' + chart(runs, 'iter', 'iteration') +
         chart(runs, 'time', 'wall time (s)') + '</div>'),
        ('Events (divergence, out of memory, ...)', events_section(runs)),
        ('Evaluations (eval.py)', evals_section(runs)),
        ('Settings that differ from the defaults', settings_section(runs)),
        ('Machine and software', facts_section(runs, MACHINE)),
        ('Data and tokenizer', data_section(runs)),
        ('Samples drawn during training', samples_section(runs)),
    ]
    body = ''.join(f'<section><h2>{esc(name)}</h2>{content}</section>' for name, content in sections)
    folders = ', '.join(f'<code>{esc(os.path.abspath(run.out_dir))}</code>' for run in runs)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{CSS}</style></head><body><h1>{esc(title)}</h1>'
            f'<p class="meta">written {esc(time.strftime("%Y-%m-%d %H:%M:%S"))} by report.py from {folders}</p>'
            f'{body}</body></html>\n')


def write_report(out_dirs, path=None, labels=None):
    """Write the page of the runs in out_dirs at path (the first run's report.html by default), whole or not at all
    (a browser refreshing never sees half of it). Returns the number of runs that had records."""
    path = path or os.path.join(out_dirs[0], REPORT_NAME)
    runs = [Run(d, labels[i] if labels else None) for i, d in enumerate(out_dirs)]
    page = render(runs).encode('utf-8')
    atomic_write_bytes(path, lambda f: f.write(page))
    return sum(bool(run.records) for run in runs)


def main(argv):
    runs, out = run_folder_arguments(argv, __doc__, 'FILE.html', 'python report.py out-shakespeare-char')
    for folder in runs:
        if not os.path.isdir(folder):
            fail(f'{folder} is not a folder: name the out_dir of a training run')
        if not os.path.exists(os.path.join(folder, METRICS_NAME)) and not os.path.exists(
                os.path.join(folder, CHECKPOINT_JSON)):
            fail(f'{folder} has neither {METRICS_NAME} nor {CHECKPOINT_JSON}: is it an out_dir of train.py?')
    out = out or os.path.join(runs[0], REPORT_NAME)
    try:
        write_report(runs, out)
    except OSError as e:
        fail(f'cannot write {out}: {e.strerror}')
    print(f'wrote {out}')


if __name__ == '__main__':
    main(sys.argv[1:])
