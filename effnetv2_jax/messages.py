"""One-line messages for errors a user can cause: the helpers every module shares."""
from __future__ import annotations

import errno


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
