"""
What a training run leaves behind to look at: out_dir/metrics.jsonl, one JSON object per line, out_dir/loss.png,
its plot, out_dir/evals.jsonl, what eval.py measured of its checkpoints, and out_dir/report.html (report.py).
Every record of metrics.jsonl has a kind, the iteration and time, the wall time of the run in seconds, continued
across resumes:

    {"kind": "step", "iter": 120, "time": 14.2, "train_loss": 1.91, "lr": 0.0009, "grad_norm": 0.4, "tokens_per_sec": 51200, "mfu": null}
    {"kind": "eval", "iter": 120, "time": 14.9, "train_loss": 1.84, "val_loss": 1.86, "val_bits_per_byte": 2.69}
    {"kind": "run", "iter": 0, "time": 0.0, "settings": {"max_iters": 5000, ...}, "python": "3.11.2", "torch": "2.13.0", ...}
    {"kind": "sample", "iter": 500, "time": 60.1, "text": "ROMEO:\nWhat light ..."}
    {"kind": "event", "iter": 700, "time": 88.0, "what": "divergence", "detail": "the loss spiked to 9.2, ... at iteration 731: back to iteration 700, ..."}
    {"kind": "end", "iter": 5000, "time": 601.5, "peak_memory_mib": {"start": 310.2, "training": 812.0, "save": 830.4}, ...}

(an event: a recovery from divergence or from running out of memory, drawn as a dotted line on the plot)

'run' opens each start and resume of train.py: the settings that differ from train.py's defaults, the versions,
the machine and the data (report.run_facts says what each field is). 'sample' is a text train.py drew during
training (sample_interval). 'event' is anything that happened to the run, what: 'divergence', 'out_of_memory' or
another name, detail: a sentence for a person. 'end' closes a run that reached its end (not one stopped by a
signal): its peak memory in MiB by phase (runtime.MemoryPhases) and its best val loss. read_metrics() returns
'step' and 'eval' records unless asked for other kinds.

A resumed run appends to the file after dropping what the interrupted run logged past the checkpoint it resumes
from (records of every kind, and the evals.jsonl records of later checkpoints), so the curve goes on as if the run
had never stopped; a new run in the same out_dir starts both files afresh. plot_runs() draws one or several runs
side by side (plot.py is its command line).

evals.jsonl holds one record per eval.py run per checkpoint folder, with the checkpoint's iteration and what was
measured (the loss on some data, a multiple-choice task's accuracies, the figures of samples):

    {"iter": 5000, "date": "2025-01-31 12:00:00", "checkpoint": "best", "data": "data/x val", "tokens": 30000, "loss": 1.47, ...}
"""
import json
import math
import os

from atomic_write import atomic_write_bytes, remove_dead_temporaries

METRICS_NAME = 'metrics.jsonl'
EVALS_NAME = 'evals.jsonl'
PLOT_NAME = 'loss.png'
KINDS = ('step', 'eval', 'run', 'sample', 'event', 'end')  # of metrics.jsonl's records


def _read_jsonl(path):
    """The JSON objects with an integer 'iter' of a file, one a line, in order; a line cut short by a kill, or not
    such an object, is left out (it is not ours: not trusted)."""
    records = []
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed run, half written
                if isinstance(record, dict) and isinstance(record.get('iter'), int) and not isinstance(record['iter'], bool):
                    records.append(record)
    return records


def read_metrics(out_dir, kinds=('step', 'eval')):
    """The records of out_dir/metrics.jsonl of the given kinds (KINDS: all of them), in order."""
    return [r for r in _read_jsonl(os.path.join(out_dir, METRICS_NAME)) if r.get('kind') in kinds]


def read_evals(out_dir):
    """The records of out_dir/evals.jsonl (eval.py's measurements of this folder's checkpoints), in order."""
    return _read_jsonl(os.path.join(out_dir, EVALS_NAME))


def log_eval(out_dir, record):
    """Append one eval.py record (with the checkpoint's 'iter') to out_dir/evals.jsonl, in one write: two eval.py
    runs at once never interleave their lines. NaN (the standard error of one item) is written as null: JSON has no
    NaN."""
    line = json.dumps(_json_numbers(record)) + '\n'
    with open(os.path.join(out_dir, EVALS_NAME), 'a', encoding='utf-8') as f:
        f.write(line)


def _json_numbers(value):
    """value with every float that is not finite, at any depth, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_numbers(v) for v in value]
    return value


class MetricsError(Exception):
    """metrics.jsonl or evals.jsonl cannot be written (a full disk): the message says which, in a line."""


def _raise(message):
    raise MetricsError(message)


class MetricsLog:
    """Appends records to out_dir/metrics.jsonl. resume_iter: the iteration a resumed run starts from (None for a new
    run, whose log starts empty): records past it are dropped and the wall time goes on from the last one kept.
    on_error(message): called where the log cannot be written (a full disk), once nothing partial is left in it
    (train.py stops the run with that line); by default MetricsError is raised."""

    def __init__(self, out_dir, resume_iter=None, on_error=_raise):
        self.path, self.on_error = os.path.join(out_dir, METRICS_NAME), on_error
        remove_dead_temporaries(out_dir, lambda name: name == METRICS_NAME)  # a killed run's rewrite of the log
        kept = [r for r in read_metrics(out_dir, KINDS) if r['iter'] <= resume_iter] if resume_iter is not None else []
        self._rewrite(self.path, kept)
        evals_path = os.path.join(out_dir, EVALS_NAME)
        if os.path.exists(evals_path):  # measurements of checkpoints that the new run will write again, or never
            self._rewrite(evals_path, [r for r in read_evals(out_dir) if resume_iter is not None and r['iter'] <= resume_iter])
        self.time_offset = max((r['time'] for r in kept if isinstance(r.get('time'), (int, float))), default=0.0)

    def _rewrite(self, path, records):
        text = ''.join(json.dumps(r) + '\n' for r in records).encode('utf-8')
        try:
            atomic_write_bytes(path, lambda f: f.write(text))  # the old file stays whole where this fails
        except OSError as e:
            self.on_error(f'cannot write {path}: {e.strerror}')

    def rewind(self, iter_num):
        """Drop the records past iter_num: the steps a recovery from divergence undid (the wall time goes on)."""
        self._rewrite(self.path, [r for r in read_metrics(os.path.dirname(self.path), KINDS) if r['iter'] <= iter_num])

    def log(self, kind, iter_num, elapsed, **values):
        """One record: its kind (KINDS), the iteration, this process's elapsed seconds, and the figures. Appended in
        one write; one that fails midway (a full disk) is cut off again, so no half line is left."""
        record = dict(kind=kind, iter=iter_num, time=round(self.time_offset + elapsed, 3), **values)
        data = (json.dumps(record) + '\n').encode('utf-8')
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            return self.on_error(f'cannot write {self.path}: {e.strerror}')
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            os.ftruncate(fd, start)
            self.on_error(f'cannot write {self.path}: {e.strerror}')
        finally:
            os.close(fd)


def _numbers(record, *keys):
    return all(isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in keys)


def plot_runs(out_dirs, path, labels=None):
    """Train and val loss of each run against iterations (left) and wall time (right), saved as a PNG at path.
    Returns the number of runs with records."""
    import matplotlib
    matplotlib.use('Agg')  # files only: no window, works without a display
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    plotted = 0
    for i, out_dir in enumerate(out_dirs):
        records = read_metrics(out_dir, ('step', 'eval', 'event'))
        label = labels[i] if labels else os.path.basename(os.path.normpath(out_dir))
        color = f'C{i % 10}'
        steps = [r for r in records if r['kind'] == 'step' and _numbers(r, 'time', 'train_loss')]
        evals = [r for r in records if r['kind'] == 'eval' and _numbers(r, 'time', 'val_loss')]
        events = [r for r in records if r['kind'] == 'event' and _numbers(r, 'time')]
        plotted += bool(steps or evals)
        for ax, x in zip(axes, ('iter', 'time')):
            for n, event in enumerate(events):  # a recovery from divergence, an out of memory: where it happened
                ax.axvline(event[x], color=color, linestyle=':', linewidth=1,
                           label=f"{label} {event.get('what', 'event')}".replace('_', ' ') if n == 0 and x == 'iter' else None)
            if steps:
                ax.plot([r[x] for r in steps], [r['train_loss'] for r in steps], color=color, alpha=0.3, linewidth=1,
                        label=f'{label} train (logged steps)')
            if evals:
                ax.plot([r[x] for r in evals], [r['val_loss'] for r in evals], color=color, marker='o', markersize=3,
                        label=f'{label} val')
    for ax, xlabel in zip(axes, ('iteration', 'wall time (s)')):
        ax.set_xlabel(xlabel)
        ax.set_ylabel('loss')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + '.tmp.png')
    plt.close(fig)
    os.replace(path + '.tmp.png', path)  # a reader (an image viewer refreshing) never sees half a file
    return plotted
