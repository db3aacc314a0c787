"""The report page (report.py): what a run records for it in metrics.jsonl and evals.jsonl, a resume dropping what
was recorded past its checkpoint, and the page itself against what train.py and eval.py printed, read from the
file and then as a person sees it, in a real browser (headless Chromium): the curves drawn, the tables filled,
nothing fetched, a screenshot that is not blank."""
import ast
import itertools
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from conftest import TINY_TRAIN, assert_clean_error, run, run_all, val_losses
from metrics import KINDS, MetricsLog, log_eval, read_evals, read_metrics
from report import COLORS, REPORT_NAME

# a task whose characters are all in the tiny dataset's vocabulary (conftest.TINY_TEXT)
TASK = [dict(context="ROMEO:\nShall I compare thee to a summer's", choices=[' day', ' dya', ' yad'], label=0),
        dict(context='JULIET:\nThou art more lovely and more', choices=[' temperate.', ' etarepmet.'], label=0)]
EVENTS = [dict(iter=7, time=0.5, what='divergence', detail='loss 9.1 above 3 x its median: back to iteration 4'),
          dict(iter=9, time=0.7, what='out_of_memory', detail='micro-batch 8 -> 4, accumulation 1 -> 2')]


def test_a_resume_drops_every_kind_recorded_past_its_checkpoint_and_read_metrics_stays_as_it_was(tmp_path):
    log = MetricsLog(tmp_path)
    for i in range(0, 12, 2):  # one record of every kind at each iteration, as if the run had logged them
        for kind in KINDS:
            log.log(kind, i, i / 10, value=i)
        log_eval(tmp_path, dict(iter=i, loss=float(i), acc=[0.5, float('nan')]))
    assert [r['kind'] for r in read_metrics(tmp_path)] == ['step', 'eval'] * 6  # what plot.py and older readers get
    assert read_evals(tmp_path)[0]['acc'] == [0.5, None]  # JSON has no NaN
    MetricsLog(tmp_path, resume_iter=6)
    assert [(r['kind'], r['iter']) for r in read_metrics(tmp_path, KINDS)] == [(k, i) for i in (0, 2, 4, 6) for k in KINDS]
    assert [r['iter'] for r in read_evals(tmp_path)] == [0, 2, 4, 6]
    MetricsLog(tmp_path)  # a new run in the same folder: nothing of the old one is its
    assert read_metrics(tmp_path, KINDS) == [] and read_evals(tmp_path) == []


class Page(HTMLParser):
    """The elements of an HTML page as (tag, attributes, text inside it) in document order, and its text."""

    def __init__(self, text):
        super().__init__()
        self.elements, self.open = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = [tag, dict(attrs), '']
        self.elements.append(element)
        if tag not in ('br', 'meta', 'line', 'rect', 'circle', 'path', 'img', 'link', 'input', 'hr'):
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for element in self.open:
            element[2] += data

    def inside(self, element):
        """The elements from element to the next one of its tag (or the end)."""
        start = self.elements.index(element)
        end = next((i for i in range(start + 1, len(self.elements)) if self.elements[i][0] == element[0]),
                   len(self.elements))
        return self.elements[start:end]

    def find(self, tag, **attrs):
        return [e for e in self.elements if e[0] == tag and all(e[1].get(k) == v for k, v in attrs.items())]

    def rows(self, table_class):
        """The cells' text of each row of the tables of that class (the header row first)."""
        rows, inside = [], False
        for tag, attrs, text in self.elements:
            if tag == 'table':
                inside = attrs.get('class') == table_class
            elif tag == 'tr' and inside:
                rows.append([])
            elif tag in ('td', 'th') and inside:
                rows[-1].append(text.strip())
        return rows


def points(path):
    """The (x, y) pixel points of an SVG path 'Mx,y Lx,y ...'."""
    return [tuple(map(float, p.strip().lstrip('ML').split(','))) for p in path[1]['d'].split(' L')]


@pytest.fixture(scope='module')
def runs(char_dataset, tmp_path_factory):
    """Two tiny runs (the second with a report.html it cannot write), eval.py's loss, samples and task figures of the
    first, two events logged as train.py's recovery logs them, and the page of both from report.py."""
    folder = tmp_path_factory.mktemp('report')
    a, b = folder / 'a', folder / 'b'
    (b / REPORT_NAME).mkdir(parents=True)  # a folder where the page should go: the run must end well all the same
    trained = run_all([('train.py', f'--dataset={char_dataset}', f'--out_dir={a}', *TINY_TRAIN, '--max_iters=12',
                        '--eval_interval=4', '--sample_interval=4', '--sample_start=ROMEO:'),
                       ('train.py', f'--dataset={char_dataset}', f'--out_dir={b}', *TINY_TRAIN, '--max_iters=8',
                        '--eval_interval=4', '--n_layer=1')])
    assert [p.returncode for p in trained] == [0, 0], [p.stderr for p in trained]
    written_by_train = (a / REPORT_NAME).read_text(encoding='utf-8')
    task = folder / 'task.jsonl'
    task.write_text(''.join(json.dumps(item) + '\n' for item in TASK), encoding='utf-8')
    evals = run_all([('eval.py', f'--out_dir={a}', '--samples=2', '--sample_tokens=20', '--progress=False'),
                     ('eval.py', f'--out_dir={a}', f'--task={task}', '--progress=False')])
    assert [p.returncode for p in evals] == [0, 0], [p.stderr for p in evals]
    log = MetricsLog(a, resume_iter=12)  # as a resumed run opens the log, keeping all it has
    for event in EVENTS:
        log.log('event', event['iter'], event['time'], what=event['what'], detail=event['detail'])
    page = folder / 'compare.html'
    assert run('report.py', a, b, f'--out={page}').stdout == f'wrote {page}\n'
    return dict(a=a, b=b, page=page, trained=trained, evals=evals, written_by_train=written_by_train, folder=folder)


def printed_rows(stdout):
    """The rows of eval.py's printed tables, as cells (columns are 2 or more spaces apart)."""
    return [re.split(r'\s{2,}', line.strip()) for line in stdout.splitlines() if line.strip()]


def test_the_page_holds_what_train_and_eval_printed(runs, char_dataset):
    trained_a, trained_b = runs['trained']
    note = [line for line in trained_b.stdout.splitlines() if 'cannot write' in line]
    assert len(note) == 1 and note[0].startswith(f"note: cannot write the report page in {runs['b']}"), trained_b.stdout
    assert 'REPORT_NAME' not in json.loads((runs['a'] / 'checkpoint.json').read_text())['config']  # not a setting
    text = runs['page'].read_text(encoding='utf-8')
    page = Page(text)
    # the curves: a point per evaluation (val) and per logged step (train) of each run in each chart, and the events
    evals = val_losses(trained_a.stdout), val_losses(trained_b.stdout)
    steps = [[line for line in proc.stdout.splitlines() if line.startswith('iter ')] for proc in runs['trained']]
    assert [len(evals[0]), len(evals[1]), len(steps[0]), len(steps[1])] == [4, 3, 12, 8]
    for x in ('iter', 'time'):
        chart = page.inside(page.find('svg', **{'data-x': x})[0])
        for i in (0, 1):
            [val] = [e for e in chart if e[0] == 'path' and e[1]['class'] == 'val' and e[1]['data-run'] == str(i)]
            [train] = [e for e in chart if e[0] == 'path' and e[1]['class'] == 'train' and e[1]['data-run'] == str(i)]
            pixels = points(val)
            assert len(pixels) == len(evals[i]) and len(points(train)) == len(steps[i])
            assert [px for px, _ in pixels] == sorted(px for px, _ in pixels)  # left to right in iterations and time
            for j, k in itertools.combinations(range(len(pixels)), 2):  # lower loss, lower on the page (y grows down)
                if evals[i][j] != evals[i][k]:
                    assert (evals[i][j] < evals[i][k]) == (pixels[j][1] > pixels[k][1])
        assert len([e for e in chart if e[0] == 'line' and e[1].get('class') == 'event']) == len(EVENTS)
    # the tables, against what the scripts printed and the data
    summary = {row[0]: row[1:] for row in page.rows('figures')}
    assert summary['last val loss'] == [f'{evals[0][-1]:.4f}', f'{evals[1][-1]:.4f}']
    assert summary['best val loss'] == [f'{min(evals[0]):.4f}', f'{min(evals[1]):.4f}']
    assert summary['iterations'] == ['12 of 12', '8 of 8'] and summary['events'] == ['2', '0']
    assert summary['status'] == ['ended at iteration 12', 'ended at iteration 8']
    assert summary['tokens seen'] == [f'{12 * 8 * 32:,}', f'{8 * 8 * 32:,}']  # iterations x batch_size x block_size
    assert all(re.fullmatch(r'[\d,]+ \(resident; by phase: start [\d,]+, training [\d,]+, save [\d,]+\)', cell)
               for cell in summary['peak memory (MiB)']), summary['peak memory (MiB)']
    settings = {row[0]: row[1:] for row in page.rows('settings')}
    assert settings['n_layer'] == ['2', '1'] and settings['sample_interval'] == ['4', 'default']
    assert settings['max_iters'] == ['12', '8'] and 'n_head' in settings and 'seed' not in settings
    import torch
    facts = {row[0]: row[1:] for row in page.rows('facts')}
    assert facts['PyTorch'] == [torch.__version__] * 2 and facts['processes'] == ['1', '1']
    assert facts['device'] == ['cpu', 'cpu'] and facts['tokenizer'] == ['a char tokenizer'] * 2
    assert facts['train tokens'] == [f"{os.path.getsize(char_dataset / 'train.bin') // 2:,}"] * 2  # uint16 ids
    samples = [ast.literal_eval(line.split(': ', 1)[1]) for line in trained_a.stdout.splitlines()
               if line.startswith('sample at step')]
    assert len(samples) == 4 and [e[2] for e in page.find('pre')] == samples
    loss_printed, task_printed = (printed_rows(proc.stdout) for proc in runs['evals'])
    [loss_row] = page.rows('eval-loss')[1:]
    assert loss_row[4:] == loss_printed[1][2:]  # tokens, loss, perplexity, bits/byte
    [figures_row] = page.rows('eval-samples')[1:]
    assert figures_row[3:] == [cell.replace('n/a', '–') for cell in loss_printed[3][1:]]  # samples and 8 figures
    [task_row] = page.rows('eval-task')[1:]
    assert task_row[3:] == task_printed[1][1:]  # task, items, shots, acc, acc_norm, acc_token, chance
    events = page.rows('events')[1:]
    assert [(r[1], r[3], r[4]) for r in events] == [(str(e['iter']), e['what'], e['detail']) for e in EVENTS]
    # train.py's own page of run a, written at its end: the same run, before eval.py and the events
    own = Page(runs['written_by_train'])
    assert [e[2] for e in own.find('pre')] == samples and len(own.find('path', **{'class': 'val'})) == 2
    # self-contained: not one URL, so nothing to fetch (no src, href, @import, url(...), script or link)
    for needle in ('http:', 'https:', 'src=', 'href=', 'url(', '@import', '<script', '<link', '<img', '<iframe'):
        assert needle not in text, needle


def test_report_py_says_what_is_wrong(tmp_path):
    assert_clean_error(run('report.py', check=False), 'name at least one run folder')
    assert_clean_error(run('report.py', tmp_path, check=False), 'neither metrics.jsonl nor checkpoint.json')
    assert_clean_error(run('report.py', tmp_path / 'nothing', check=False), 'is not a folder')


# the test's own instrument, in a copy of the page (the page itself has no script): what the browser laid out and
# painted, and every resource it loaded, written into the DOM that --dump-dom prints
MEASURE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY, r.width, r.height]; };
const seen = {
  charts: [...document.querySelectorAll('svg.chart')].map(box),
  paths: [...document.querySelectorAll('svg.chart path')].map(p => ({cls: p.getAttribute('class'), run: p.dataset.run,
          length: p.getTotalLength(), box: box(p)})),
  tables: [...document.querySelectorAll('table')].map(t => ({cls: t.className, box: box(t),
           cells: t.querySelectorAll('td').length,
           shown: [...t.querySelectorAll('td')].filter(c => c.innerText.trim() && box(c)[2] > 0).length})),
  resources: performance.getEntriesByType('resource').map(r => r.name),
};
const out = document.createElement('pre');
out.id = 'seen'; out.hidden = true; out.textContent = JSON.stringify(seen); document.body.appendChild(out);
</script>"""
WINDOW = (1280, 2000)


def browser():
    """Headless Chromium, or a one-line skip where it is not installed (a failure under CI, whose .ci/run installs
    it where the machine allows: a page no browser opened is not tested)."""
    found = shutil.which('chromium') or shutil.which('chromium-browser')
    if found:
        return found
    reason = 'chromium is not installed (Debian: apt-get install chromium): the report page was not opened in a browser'
    if os.environ.get('CI'):
        pytest.fail(f'{reason}; .ci/run installs it where the machine allows (root, apt-get)', pytrace=False)
    pytest.skip(reason)


def chromium(folder, *args):
    """Run headless Chromium with the network closed (every host name unresolvable). --no-sandbox: test machines
    and containers run as root, where Chromium's sandbox refuses to start; the page is our own file."""
    cmd = [browser(), '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
           '--hide-scrollbars', '--force-device-scale-factor=1', f'--window-size={WINDOW[0]},{WINDOW[1]}',
           '--host-resolver-rules=MAP * ~NOTFOUND', f'--user-data-dir={folder / "profile"}', *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_page_in_a_browser(runs):
    """What a person sees: the curves drawn in each run's colour, every table cell filled, nothing fetched."""
    page = runs['page']
    measured = page.with_name('measured.html')  # beside the page: a relative path would resolve alike
    measured.write_text(page.read_text(encoding='utf-8').replace('</body>', MEASURE + '</body>'), encoding='utf-8')
    dom = Page(chromium(runs['folder'], '--dump-dom', measured.as_uri()))
    [(_, _, seen)] = dom.find('pre', id='seen')
    seen = json.loads(seen)
    assert seen['resources'] == []  # nothing loaded but the page
    assert len(seen['charts']) == 2 and all(w == 560 and h == 320 for _, _, w, h in seen['charts'])
    (left, top, width, height), second = seen['charts']
    assert second[0] > left + width or second[1] > top + height  # side by side, or one under the other
    drawn = [p for p in seen['paths'] if p['length'] > 0]
    assert len(drawn) == len(seen['paths']) == 8  # train and val of two runs in two charts
    for path in drawn[:4]:  # against iterations: every run's curve spans most of the axis (both start at 0)
        assert path['box'][2] > 0.5 * width, path
    assert len(seen['tables']) >= 6 and all(t['box'][3] > 0 and t['shown'] == t['cells'] for t in seen['tables'])
    # the screenshot: not blank, and each run's colour painted inside the charts
    from PIL import Image
    import numpy as np
    shot = runs['folder'] / 'report.png'
    chromium(runs['folder'], f'--screenshot={shot}', page.as_uri())
    pixels = np.asarray(Image.open(shot).convert('RGB')).astype(int)
    assert pixels.shape == (WINDOW[1], WINDOW[0], 3)
    assert pixels.std() > 20 and (pixels.sum(axis=2) < 600).mean() > 0.02  # ink on the page, not one colour
    for color in COLORS[:2]:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        inside = sum(int((np.abs(pixels[int(y):int(y + h), int(x):int(x + w)] - rgb).sum(axis=2) < 30).sum())
                     for x, y, w, h in seen['charts'])
        assert inside > 200, (color, inside)  # lines and dots of that run, in both charts


def test_a_run_recorded_before_the_report_existed(runs, tmp_path):
    """Only step and eval records and a checkpoint (what earlier versions left): the page draws the curves and shows
    the checkpoint's whole config, saying so, and its data."""
    from report import write_report
    old = tmp_path / 'old'
    old.mkdir()
    shutil.copy(runs['a'] / 'checkpoint.json', old)
    records = read_metrics(runs['a'])  # step and eval
    (old / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
    assert write_report([old], str(old / REPORT_NAME)) == 1
    page = Page((old / REPORT_NAME).read_text(encoding='utf-8'))
    assert len(points(page.find('path', **{'class': 'val'})[0])) == len([r for r in records if r['kind'] == 'eval'])
    config = json.loads((old / 'checkpoint.json').read_text())['config']
    settings = {row[0]: row[1:] for row in page.rows('settings')[1:]}
    assert set(settings) == set(config) and settings['seed'] == [repr(config['seed'])]
    assert 'whole config' in page.find('p', **{'class': 'note'})[0][2]
    facts = {row[0]: row[1:] for row in page.rows('facts')}
    assert facts['tokenizer'] == ['a char tokenizer'] and facts['dataset'] == [config['dataset']]
    summary = {row[0]: row[1:] for row in page.rows('figures')}
    assert summary['iterations'] == ['12 of 12'] and summary['status'][0].startswith('running, or stopped')
