"""
What a training run leaves behind to look at: out_dir/metrics.jsonl, one JSON object per logged iteration
and per evaluation, and out_dir/loss.png, its plot.

    {"kind": "step", "iter": 120, "time": 14.2, "train_loss": 1.91, "lr": 0.0009, "tokens_per_sec": 51200, "mfu": null}
    {"kind": "eval", "iter": 120, "time": 14.9, "train_loss": 1.84, "val_loss": 1.86, "val_bits_per_byte": 2.69}
    {"kind": "event", "iter": 80, "time": 9.1, "what": "divergence", "detail": "the loss is not finite at ..."}

(an event: a recovery from divergence or from running out of memory, drawn as a dotted line on the plot)

time is the wall time of the run in seconds, continued across resumes. A resumed run appends to the file after
dropping what the interrupted run logged past the checkpoint it resumes from, so the curve goes on as if the run
had never stopped. plot_runs() draws one or several runs side by side (plot.py is its command line).
"""
import json
import os

from atomic_write import atomic_write_bytes, remove_dead_temporaries

METRICS_NAME = 'metrics.jsonl'
PLOT_NAME = 'loss.png'


def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, in order; a line cut short by a kill, or not a record, is left out."""
    path = os.path.join(out_dir, METRICS_NAME)
    records = []
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed run, half written
                if isinstance(record, dict) and isinstance(record.get('iter'), int) and record.get('kind') in ('step', 'eval', 'event'):
                    records.append(record)  # anything else is not ours: left out, not trusted
    return records


class MetricsLog:
    """Appends records to out_dir/metrics.jsonl. resume_iter: the iteration a resumed run starts from (None for a new
    run, whose log starts empty): records past it are dropped and the wall time goes on from the last one kept."""

    def __init__(self, out_dir, resume_iter=None):
        self.path = os.path.join(out_dir, METRICS_NAME)
        remove_dead_temporaries(out_dir, lambda name: name == METRICS_NAME)  # a killed run's rewrite of the log
        kept = [r for r in read_metrics(out_dir) if r['iter'] <= resume_iter] if resume_iter is not None else []
        text = ''.join(json.dumps(r) + '\n' for r in kept).encode('utf-8')
        atomic_write_bytes(self.path, lambda f: f.write(text))
        self.time_offset = max((r['time'] for r in kept if isinstance(r.get('time'), (int, float))), default=0.0)

    def rewind(self, iter_num):
        """Drop the records past iter_num: the steps a recovery from divergence undid (the wall time goes on)."""
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r['iter'] <= iter_num]
        text = ''.join(json.dumps(r) + '\n' for r in kept).encode('utf-8')
        atomic_write_bytes(self.path, lambda f: f.write(text))

    def log(self, kind, iter_num, elapsed, **values):
        """One record: kind 'step' or 'eval', the iteration, this process's elapsed seconds, and the figures."""
        record = dict(kind=kind, iter=iter_num, time=round(self.time_offset + elapsed, 3), **values)
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')


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
        records = read_metrics(out_dir)
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
