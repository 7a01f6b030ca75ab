"""One-line messages for errors a user can cause: the helpers every module shares."""
from __future__ import annotations

import contextlib
import errno
import logging
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


def _drop_closed_loops(hook):
    def filtered(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == 'Event loop is closed'):
            hook(unraisable)
    return filtered


@contextlib.contextmanager
def orbax_failures_quiet():
    """Keeps a failed Orbax write to the one line its caller reports. Orbax logs the failure
    with tracebacks (absl's logger), and the event loops of its writer threads report 'Event
    loop is closed' as unraisable exceptions, during the write and after it as they are
    collected. Within the block both are dropped (only those: every other report goes on), and
    after a failure the unraisable ones stay dropped for the rest of the process."""
    absl_logger = logging.getLogger('absl')
    level, hook = absl_logger.level, sys.unraisablehook
    absl_logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = _drop_closed_loops(hook)
    try:
        yield
    except BaseException:
        absl_logger.setLevel(level)
        raise
    absl_logger.setLevel(level)
    sys.unraisablehook = hook
