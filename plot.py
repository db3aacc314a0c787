"""
Plot the loss curves of training runs, side by side, from their metrics.jsonl:

    python plot.py out-shakespeare-char-cpu                      # -> out-shakespeare-char-cpu/loss.png
    python plot.py out-a out-b --out=compare.png                 # several runs in one figure

Left: train loss (each logged step) and val loss (each evaluation) against iterations; right: the same against
wall time, which compares runs of different speed. train.py refreshes out_dir/loss.png itself at each evaluation.
"""
import os
import sys

from configurator import fail
from metrics import METRICS_NAME, PLOT_NAME, plot_runs


def main(argv):
    out, runs = None, []
    for arg in argv:
        if arg in ('-h', '--help'):
            print(__doc__.strip())
            return
        if arg.startswith('--out='):
            out = arg[len('--out='):]
        elif arg.startswith('--'):
            fail(f'unknown option {arg}: the arguments are run folders, and --out=FILE.png')
        else:
            runs.append(arg)
    if not runs:
        fail('name at least one run folder (an out_dir of train.py), e.g. python plot.py out-shakespeare-char-cpu')
    missing = [r for r in runs if not os.path.exists(os.path.join(r, METRICS_NAME))]
    if missing:
        fail(f'{missing[0]} has no {METRICS_NAME}: is it an out_dir of train.py (a run of this version or later)?')
    out = out or os.path.join(runs[0], PLOT_NAME)
    try:
        plot_runs(runs, out)
    except OSError as e:
        fail(f'cannot write {out}: {e.strerror}')
    print(f'wrote {out}')


if __name__ == '__main__':
    main(sys.argv[1:])
