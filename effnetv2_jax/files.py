"""Writing files so that a failure never leaves a partial one."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync(path: str | os.PathLike):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *,
                 directory: bool = False, replace_directory: bool = False):
    """Calls `write(tmp)` on a temporary sibling of `path` (a file, or with `directory` a folder),
    flushes it to disk and renames it onto `path`: readers see the old content or the new, never
    a part. The temporary is removed if anything fails. An existing folder at `path` is removed
    just before the rename with `replace_directory`, else the rename fails (OSError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f'.{path.name}.', '.tmp'
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        for file in (tmp.rglob('*') if directory else ()):
            if file.is_file():
                _fsync(file)
        _fsync(tmp)
        if directory and replace_directory and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray):
    """`atomic_write` of one file with `data`."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))

