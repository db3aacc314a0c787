"""
Plot the loss curves of training runs, side by side, from their metrics.jsonl:

    python plot.py out-shakespeare-char-cpu                      # -> out-shakespeare-char-cpu/loss.png
    python plot.py out-a out-b --out=compare.png                 # several runs in one figure

Left: train loss (each logged step) and val loss (each evaluation) against iterations; right: the same against
wall time, which compares runs of different speed. train.py refreshes out_dir/loss.png itself at each evaluation.
"""
import os
import sys

from configurator import fail, run_folder_arguments
from metrics import METRICS_NAME, PLOT_NAME, plot_runs


def main(argv):
    runs, out = run_folder_arguments(argv, __doc__, 'FILE.png', 'python plot.py out-shakespeare-char-cpu')
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
