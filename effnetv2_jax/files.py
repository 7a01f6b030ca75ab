"""Writing output files safely: atomically, durably, and never over anything that is not ours.

The rule, for every file or folder this project writes: nothing but the output path itself is
created, replaced or removed. An output never is, contains or lies inside an input of the same
command, nor the working directory. An existing output is replaced only when it holds nothing but
what this project wrote there (an `OutputKind` says how to recognise that). The new content is
written to a temporary sibling, flushed to disk and renamed onto the path, so readers see the old
content or the new, never a part, never neither: Ctrl-C or SIGTERM at any moment, or a full disk,
leave the old output and no temporary behind. Outputs follow the umask like any file the user
writes.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from effnetv2_jax.messages import write_failure

# Weights sources that are names rather than paths: remote ones read nothing the user has here;
# 'local-dir:FOLDER' reads FOLDER.
REMOTE_SCHEMES = ('hf-hub:', 'torchvision:')
LOCAL_DIR_SCHEME = 'local-dir:'


class OutputError(OSError):
    """An output path that may not be written, or whose write failed; the message is one line."""


class OutputKind(NamedTuple):
    """What a writer produces: `description` for messages ('an effnetv2-jax weights file'),
    `recognise(path)` whether an existing path holds nothing but such an output (then it may be
    replaced), and whether it is a folder."""
    description: str
    recognise: Callable[[Path], bool]
    directory: bool = False


def local_path(source: str | os.PathLike) -> Path | None:
    """The file or folder on this machine that a weights source reads: a path as it is,
    'local-dir:FOLDER' as FOLDER, None for a remote name ('hf-hub:...', 'torchvision:...')."""
    text = os.fspath(source)
    if text.startswith(REMOTE_SCHEMES):
        return None
    return Path(text.removeprefix(LOCAL_DIR_SCHEME))


def check_apart(output: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                what: str = 'output'):
    """Raises `OutputError` if `output` is, contains or lies inside one of `inputs` (paths or
    weights sources, see `local_path`). Touches nothing."""
    resolved = Path(output).resolve()
    for source in inputs:
        source_path = local_path(source)
        if source_path is None:
            continue
        source_path = source_path.resolve()
        for relation, holds in (('is', resolved == source_path),
                                ('contains', resolved in source_path.parents),
                                ('is inside', source_path in resolved.parents)):
            if holds:
                raise OutputError(f'{what} {output} {relation} the input {source}; '
                                  f'choose another {what}')


def check_output(path: str | os.PathLike, kind: OutputKind,
                 inputs: Iterable[str | os.PathLike] = ()):
    """Raises `OutputError` unless `path` may be written as `kind`: its folder exists, it is
    apart from `inputs` (`check_apart`), it is not the working directory or above it, and it is
    either absent or holds nothing but a `kind`. Touches nothing."""
    path = Path(path)
    check_apart(path, inputs)
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f'output {path} is (or contains) the working directory; '
                          'choose another output')
    if not path.parent.is_dir():
        raise OutputError(f'output folder {path.parent} does not exist')
    if path.is_symlink() or (path.exists() and not kind.recognise(path)):
        raise OutputError(f'{path} exists and is not {kind.description}; not replacing it '
                          '(move it away or choose another output)')


def _umask() -> int:
    try:  # Linux >= 4.7 shows it without the set-and-restore race of os.umask
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(folder: Path) -> bool:
    """Whether the file system of `folder` has no block left for an unprivileged write."""
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


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


def _remove_failed(tmp: Path, quiet_seconds: float = 0.5, give_up_seconds: float = 10.0):
    """Removes the temporary folder of a failed write. A library's writer threads (Orbax's
    TensorStore) can go on creating files in it for a moment after the failure reached us
    (seen: 5 to 200 ms), so remove it until it has stayed gone for `quiet_seconds`."""
    deadline = time.monotonic() + give_up_seconds
    gone_since = None
    while time.monotonic() < deadline:
        if tmp.exists():
            _remove(tmp)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= quiet_seconds:
            return
        time.sleep(0.01)


_RENAME_EXCHANGE = 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not glibc >= 2.28 (macOS, musl)
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step (Linux renameat2); False where that is not
    available (then the caller renames twice, with signals deferred)."""
    if _renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD
    return _renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


class _Terminated(BaseException):
    """SIGTERM arrived during a write: raised to remove the temporary, then delivered again."""


@contextlib.contextmanager
def _sigterm_cleans_up():
    """While a write runs, SIGTERM (where nobody else handles it) first removes the temporary:
    it raises `_Terminated` into the write, and once the cleanup is done the process ends by
    SIGTERM as it would have."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def on_sigterm(*_):
        raise _Terminated()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done (in the main thread, where Python runs
    signal handlers: between any two bytecodes, so an OS-level mask would not do), then take
    their course."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {signum: signal.signal(signum, lambda signum, _: caught.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught:
            signal.raise_signal(signum)


def _put_in_place(tmp: Path, path: Path, directory: bool):
    """Renames `tmp` onto `path`; a folder `path` is swapped out and removed after. At any
    moment `path` holds the old content or the new one."""
    with _signals_deferred():
        if directory and path.is_dir():  # a folder cannot be renamed onto a full one
            if _exchange(tmp, path):
                _fsync(path.parent)
                _remove(tmp)  # now the old folder
                return
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.',
                                        suffix='.old'))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            _fsync(path.parent)
            _remove(old)
            return
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself


def _make_temporary(path: Path, directory: bool) -> Path:
    """An empty sibling of `path` (`.NAME.*.tmp`), a file or a folder."""
    prefix, suffix = f'.{path.name}.', '.tmp'
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    return tmp


def _settle(tmp: Path):
    """Flushes a written temporary to disk, with the modes the umask gives: some writers
    (safetensors) create their files 0600 whatever the umask."""
    umask = _umask()
    for path in (*sorted(tmp.rglob('*')), tmp):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        _fsync(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], kind: OutputKind,
                 inputs: Iterable[str | os.PathLike] = ()):
    """Calls `write(tmp)` on a temporary sibling of `path` (a file, or a folder for a folder
    kind), flushes it to disk and puts it in place of `path`, after `check_output(path, kind,
    inputs)`. The temporary is removed if anything fails or interrupts; a failed write (a full
    disk, say) is an `OutputError` with one line."""
    path = Path(path)
    check_output(path, kind, inputs)
    with _sigterm_cleans_up():
        tmp = None
        try:
            with _signals_deferred():  # a temporary that exists is one the cleanup knows of
                tmp = _make_temporary(path, kind.directory)
            write(tmp)
            _settle(tmp)
            _put_in_place(tmp, path, kind.directory)
        except BaseException as e:
            # Before the temporary goes: some writers (torch.save) report a full disk only as
            # a position mismatch, so the disk's own free space says it.
            reason = 'no space left on device' if _disk_full(path.parent) else write_failure(e)
            if tmp is not None and kind.directory:
                _remove_failed(tmp)
            elif tmp is not None:
                _remove(tmp)
            if isinstance(e, Exception) and not isinstance(e, OutputError):
                raise OutputError(f'cannot write {path}: {reason}') from e
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray, kind: OutputKind,
                       inputs: Iterable[str | os.PathLike] = ()):
    """`atomic_write` of one file with `data`."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), kind, inputs)

