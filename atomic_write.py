"""
Writing files so that a crash, a kill or a full disk never leaves half of one under its real name: the data goes
to a temporary file beside it, is flushed to disk, and is renamed over the real name in one step. Datasets and
checkpoints both write this way.
"""
import json
import os
import re
import shutil

TEMPORARY = re.compile(r'^(.+)\.tmp(\d+)$')  # NAME.tmp<pid>: what atomic_write_bytes and DatasetWriter write first


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


def atomic_write_folder(path, write):
    """Call write(folder) on a temporary folder beside path, then rename it to path (absent, or an empty folder);
    returns what write returned. A failed write (a full disk) removes the temporary folder: nothing partial is left
    to block the next try."""
    tmp = f'{os.path.normpath(path)}.tmp{os.getpid()}'
    try:
        os.makedirs(tmp)
        result = write(tmp)
        fsync_dir(tmp)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.normpath(path)))
        return result
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode('utf-8')))


def process_alive(pid):
    if os.name == 'nt':
        return True  # Windows refuses to delete a file another process has open: removal fails harmlessly
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(folder, ours):
    """Remove the temporaries NAME.tmp<pid> (files, or atomic_write_folder's folders) in folder that a killed process
    left, for the names ours(NAME) accepts; those of a live process (this one included) are its own."""
    for name in os.listdir(folder):
        temporary = TEMPORARY.match(name)
        if temporary and ours(temporary.group(1)) and int(temporary.group(2)) != os.getpid() \
                and not process_alive(int(temporary.group(2))):
            path = os.path.join(folder, name)
            try:
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            except OSError:
                pass  # a reader has it open (Windows), or it is already gone: the next save tries again
