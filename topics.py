"""
Topics of a corpus's documents, shared by synthesize.py (which writes documents per topic), classify_topics.py
(which labels existing documents with a topic) and prepare.py (which caps each topic's documents).

A topics file is plain text, one topic a line. Labels are JSON lines, one per document: {"file": ..., "topic": ...}
with the file's path relative to the labels file's folder; classify_topics.py's labels and synthesize.py's
manifest are both such files. Both are appended one record at a time and flushed to disk, so that a run killed at
any moment can resume from them: the most a kill leaves is a last line cut short, which reading drops.
"""
import hashlib
import json
import os


class TopicsError(Exception):
    """A topics or labels file that is missing or malformed; the message says how to fix it."""


def read_topics(path):
    """The topics of a topics file, in order, each once."""
    if not os.path.isfile(path):
        raise TopicsError(f'topics file {path} not found: give a text file with one topic a line')
    with open(path, encoding='utf-8') as f:
        topics = [line.strip() for line in f]
    topics = list(dict.fromkeys(t for t in topics if t))
    if not topics:
        raise TopicsError(f'topics file {path} is empty: write one topic a line')
    return topics


def read_records(path):
    """The JSON records of a JSON-lines file ([] if there is none). A last line cut short by a kill mid-write is
    removed from the file, so that the next record appended starts on a line of its own."""
    if not os.path.exists(path):
        return []
    with open(path, 'rb') as f:
        data = f.read()
    complete = data[:data.rfind(b'\n') + 1]
    records = []
    for number, line in enumerate(complete.decode('utf-8', errors='replace').splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise TopicsError(f'{path} line {number} is not JSON: repair or delete the file') from None
    if len(complete) < len(data):
        with open(path, 'r+b') as f:
            f.truncate(len(complete))
    return records


def append_record(f, record):
    """Add one record to a JSON-lines file open for appending, durably: it survives a kill or a power cut."""
    f.write(json.dumps(record, ensure_ascii=False) + '\n')
    f.flush()
    os.fsync(f.fileno())


def settings_of(records, path, settings):
    """Check that a resumed file was written with these settings (its first record holds them); returns the
    records that follow. A new file gets them as its first record (the caller writes it)."""
    if not records:
        return []
    saved = records[0].get('settings')
    if saved is None:
        raise TopicsError(f'{path} does not start with the settings it was written with: move it away to start afresh')
    changed = [f'{key}={saved.get(key)!r}' for key in settings if saved.get(key) != settings[key]]
    if changed:
        raise TopicsError(f"{path} was written with {', '.join(changed)}: resume with the same settings, or write "
                          f"to another file or folder")
    return records[1:]


def read_labels(path):
    """{absolute path of a document: its topic} from a labels file (a manifest's dropped documents have none)."""
    if not os.path.isfile(path):
        raise TopicsError(f'labels file {path} not found: make one with classify_topics.py (or use the manifest.jsonl '
                          f'that synthesize.py writes)')
    folder = os.path.dirname(os.path.abspath(path))
    return {os.path.normpath(os.path.join(folder, r['file'])): r['topic'] for r in read_records(path)
            if r.get('file') and r.get('topic') is not None and not r.get('dropped')}


def cap_per_topic(files, labels, max_per_topic, seed, root):
    """The files to keep, in their order: at most max_per_topic of each topic, picked by a seeded hash of each
    file's path under root (the same pick on every run, wherever the folder is moved, and a file added later
    displaces another only if it ranks above it), and every file that has no label. Also returns
    {topic: (documents, kept)}, and the number of unlabelled files."""
    by_topic = {}
    unlabelled = 0
    for path in files:
        topic = labels.get(os.path.abspath(path))
        if topic is None:
            unlabelled += 1
        else:
            by_topic.setdefault(topic, []).append(path)

    def rank(path):
        name = os.path.relpath(path, root).replace(os.sep, '/')
        return hashlib.blake2b(f'{seed}/{name}'.encode('utf-8'), digest_size=8).digest()

    kept = set()
    for paths in by_topic.values():
        kept.update(sorted(paths, key=rank)[:max_per_topic])
    counts = {topic: (len(paths), sum(p in kept for p in paths)) for topic, paths in sorted(by_topic.items())}
    return [p for p in files if p in kept or labels.get(os.path.abspath(p)) is None], counts, unlabelled
