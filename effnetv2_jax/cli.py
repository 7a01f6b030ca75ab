"""What every command-line tool of this project shares: its argparse set-up, one-line errors and
exit statuses (0 done; 1 `--verify` found the outputs apart; 2 bad input or unusable output)."""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2


def parser(prog: str, description: str, examples: str = '') -> argparse.ArgumentParser:
    """An ArgumentParser for `python -m <prog>` with `examples` shown verbatim after the flags."""
    return argparse.ArgumentParser(
        prog=f'python -m {prog}', description=description,
        epilog=f'examples:\n{examples}' if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
    """Prints `error: <message>` as one line on stderr and returns `status` for `sys.exit`."""
    print(f'error: {message}', file=sys.stderr)
    return status
