"""The workdir of a training run: apart from the run's inputs, and used by one run at a time.

A run claims its workdir before it writes anything into it: the folder is created, every file the
run will write there is checked to be absent or its own (files.check_output), and process 0 takes
an exclusive lock on `LOCK_FILE` (fcntl.flock, with its pid inside for the message a second run
gets), which the kernel releases when the run ends, however it ends. The lock file is the one
thing a run refused after that (resuming with other flags, say) leaves changed: the pid in it.
"""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

import jax

from effnetv2_jax.files import OutputError, OutputKind, check_output
from effnetv2_jax.messages import first_line, write_failure
from train.config import ConfigError

LOCK_FILE = '.lock'


def _is_lock_file(path: Path) -> bool:
    try:
        return path.is_file() and re.fullmatch(r'\d*\n?', path.read_text()) is not None
    except (OSError, ValueError):
        return False


LOCK_KIND = OutputKind('the lock file of python -m train', _is_lock_file)


def make(workdir: str | os.PathLike) -> Path:
    """`workdir`, created if missing; `ConfigError` when it cannot be a writable folder."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f'--workdir {workdir} is a file, not a folder') from None
    except OSError as e:
        raise ConfigError(f'--workdir {workdir}: {first_line(e)}') from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(f'--workdir {workdir} is not writable')
    return workdir


def _lock(workdir: Path) -> int:
    """The descriptor of `workdir`'s lock file, locked; `ConfigError` if another run holds it."""
    path = workdir / LOCK_FILE
    check_output(path, LOCK_KIND)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(f'cannot write {path}: {write_failure(e)}') from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 20).decode(errors='replace').strip() or 'unknown'
        os.close(fd)
        raise ConfigError(f'another python -m train (pid {holder}) is using workdir {workdir}; '
                          'wait for it to end or choose another --workdir') from None
    try:  # only for the message above; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
    except OSError:
        pass
    return fd


class Workdir:
    """The run's workdir, claimed once (`claim`) as late as the run can, and released on exit;
    `outputs` are the files the run writes there, by name, with their kinds."""

    def __init__(self, path: str, outputs: dict[str, OutputKind]):
        self.path = Path(path)
        self.outputs = outputs
        self.claimed = False
        self._lock_fd = None

    def claim(self) -> Path:
        """Creates the workdir, checks that no file of someone else's is where the run writes,
        and locks it against a second run (process 0); `ConfigError` or `OutputError` (one
        line) before anything else is written. Idempotent."""
        if not self.claimed:
            make(self.path)
            for name, kind in self.outputs.items():
                check_output(self.path / name, kind)
            if jax.process_index() == 0:
                self._lock_fd = _lock(self.path)
            self.claimed = True
        return self.path

    def release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = None

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc_info):
        self.release()
