"""Writing output files safely: atomically, durably, and never over anything that is not ours.

The rule, for every file or folder this project writes: nothing but the output path itself is
created, replaced or removed. An existing output is replaced only when it is recognisably of the
kind being written (an `OutputKind` says how to recognise one); the input itself, a folder that
contains an input or the working directory are refused. The new content is written to a
temporary sibling, flushed to disk and renamed onto the path, so readers see the old content or
the new, never a part.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple


class OutputError(OSError):
    """An output path that may not be written; the message is one line."""


class OutputKind(NamedTuple):
    """What a writer produces: `description` for messages ('an effnetv2-jax weights file'),
    `recognise(path)` whether an existing path is one of those (then it may be replaced), and
    whether it is a folder."""
    description: str
    recognise: Callable[[Path], bool]
    directory: bool = False


def check_output(path: str | os.PathLike, kind: OutputKind,
                 inputs: Iterable[str | os.PathLike] = ()):
    """Raises `OutputError` unless `path` may be written as `kind`: its folder exists, it is not
    one of `inputs`, nor inside or above one, nor the working directory or above it, and it is
    either absent or recognisably a `kind`. Touches nothing."""
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        for relation, holds in (('is', resolved == source_path),
                                ('contains', resolved in source_path.parents),
                                ('is inside', source_path in resolved.parents)):
            if holds:
                raise OutputError(f'output {path} {relation} the input {source}; '
                                  'choose another output')
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f'output {path} is (or contains) the working directory; '
                          'choose another output')
    if not path.parent.is_dir():
        raise OutputError(f'output folder {path.parent} does not exist')
    if path.is_symlink() or (path.exists() and not kind.recognise(path)):
        raise OutputError(f'{path} exists and is not {kind.description}; not replacing it '
                          '(move it away or choose another output)')


def _fsync(path: str | os.PathLike):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], kind: OutputKind):
    """Calls `write(tmp)` on a temporary sibling of `path` (a file, or a folder for a folder
    kind), flushes it to disk and renames it onto `path`, after `check_output(path, kind)`. The
    temporary is removed if anything fails; a replaced folder is removed after the rename."""
    path = Path(path)
    check_output(path, kind)
    prefix, suffix = f'.{path.name}.', '.tmp'
    if kind.directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    replaced = None
    try:
        write(tmp)
        for file in (tmp.rglob('*') if kind.directory else ()):
            if file.is_file():
                _fsync(file)
        _fsync(tmp)
        if kind.directory and path.is_dir():  # a folder cannot be renamed onto a full one
            replaced = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix='.old'))
            os.replace(path, replaced / path.name)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    except BaseException:
        _remove(tmp)
        if replaced is not None and not path.exists():  # put the old folder back
            os.replace(replaced / path.name, path)
        raise
    finally:
        if replaced is not None:
            _remove(replaced)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray, kind: OutputKind):
    """`atomic_write` of one file with `data`."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), kind)
