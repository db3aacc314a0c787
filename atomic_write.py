"""
Writing files so that a crash, a kill or a full disk never leaves half of one under its real name: the data goes
to a temporary file beside it, is flushed to disk, and is renamed over the real name in one step. Datasets and
checkpoints both write this way.
"""
import json
import os


def fsync_dir(folder):
    """Make the renames in folder durable (a power cut after them cannot bring the old names back). POSIX only:
    Windows has no directory handles to flush."""
    if os.name != 'nt':
        fd = os.open(folder or '.', os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, write):
    """Call write(file) on a temporary file beside path, then rename it over path: a crash mid-write
    never leaves a truncated file under the real name. A failed write (a full disk) removes the temporary
    file, even when closing it fails too."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode('utf-8')))
