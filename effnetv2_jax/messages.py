"""One-line messages for errors a user can cause: the helpers every module shares."""
from __future__ import annotations

import errno
import logging
import os
import sys


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def first_few(items, limit: int) -> str:
    """'a, b, c (+N more)': the first `limit` of `items`, comma-separated, for one-line errors."""
    items = [str(i) for i in items]
    more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


# What the OS says when a write fails for want of space, and how libraries wrap it in their own
# exception types (torch: RuntimeError '... file write failed'; safetensors: 'StorageFull').
_WRITE_FAILURES = (
    ((errno.ENOSPC,), ('No space left on device', 'StorageFull', 'file write failed'),
     'no space left on device'),
    ((errno.EDQUOT,), ('Disk quota exceeded', 'QuotaExceeded'), 'disk quota exceeded'),
    ((errno.EFBIG,), ('File too large', 'FileTooLarge'), 'file too large (a file size limit)'),
)


def write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: a full disk, a quota or a size limit where `e` or an
    exception it was raised from says so, else the first line of `e`."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for errnos, words, reason in _WRITE_FAILURES:
        if any((isinstance(x, OSError) and x.errno in errnos) or any(w in str(x) for w in words)
               for x in chain):
            return reason
    return first_line(chain[0])


def _not_orbax(record: logging.LogRecord) -> bool:
    """False for a log record of Orbax's own, or of asyncio's about a task of Orbax's."""
    where = f'{os.sep}orbax{os.sep}'
    return not (where in record.pathname
                or (record.name == 'asyncio' and where in record.getMessage()))


def _unraisable_unless_closed_loop(previous):
    """A `sys.unraisablehook` that drops what a failed Orbax save leaves behind: Orbax closes
    the event loop of the save while TensorStore still completes its other writes, whose
    callbacks then find the loop closed (the save's failure itself is reported once)."""
    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
            previous(unraisable)
    hook.quiet_closed_loops = True
    return hook


def silence_orbax():
    """Keeps Orbax's own reports of a failure off stderr: it logs each failure (and each slow
    save) at length, with tracebacks, through absl's and asyncio's loggers, and leaves 'Event
    loop is closed' reports behind. Every failure also reaches the caller as an exception, which
    the commands report in one line. The one process-wide change this package makes on its own,
    made by the writers of Orbax checkpoints (weights folders, run checkpoints); it drops only
    those records. Idempotent."""
    from absl import logging as absl_logging
    for logger in (absl_logging.get_absl_logger(), logging.getLogger('asyncio')):
        logger.addFilter(_not_orbax)  # once: a filter already there is not added again
    if not getattr(sys.unraisablehook, 'quiet_closed_loops', False):
        sys.unraisablehook = _unraisable_unless_closed_loop(sys.unraisablehook)
