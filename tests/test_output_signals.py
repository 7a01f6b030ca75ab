"""Specification of interrupted writes: SIGTERM or Ctrl-C at any moment of `files.atomic_write`
leaves the old output or the new one in place, complete, never neither, and no temporary behind.

A child process replaces one output over and over (a file, or a folder of two files that always
hold the same generation number) and is signalled at a random moment; the parent then checks
what is left. Folders are checked twice: with Linux's one-step exchange (renameat2) and with the
two renames used where it is missing, whose window a signal must not split.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import effnetv2_jax

PACKAGE = str(Path(effnetv2_jax.__file__).parent)

ROUNDS = 8  # signals per case; each lands at a random moment of a write

# The package's __init__ imports JAX (seconds); files.py needs only the standard library, so the
# child makes a bare package to import it from.
CHILD = textwrap.dedent('''
    import itertools, sys, types
    from pathlib import Path
    package = types.ModuleType('effnetv2_jax')
    package.__path__ = [sys.argv[4]]
    sys.modules['effnetv2_jax'] = package
    from effnetv2_jax import files

    out, kind_name, exchange = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == 'exchange'
    if not exchange:
        files._renameat2 = None
    kind = files.OutputKind('a test output', lambda p: True, directory=kind_name == 'folder')

    def write(generation):
        def to(tmp):
            data = str(generation).encode() * 50_000  # long enough to be caught mid-write
            if kind.directory:
                (tmp / 'a').write_bytes(data)
                (tmp / 'b').write_bytes(data)
            else:
                tmp.write_bytes(data)
        return to

    files.atomic_write(out, write(0), kind)
    print('ready', flush=True)
    for generation in itertools.count(1):
        files.atomic_write(out, write(generation % 10), kind)
''')


def generation_of(out: Path, folder: bool) -> str:
    """The one generation digit the output holds; fails if it is absent or mixed."""
    parts = [out / 'a', out / 'b'] if folder else [out]
    contents = {p.read_bytes() for p in parts}
    assert len(contents) == 1, 'the folder mixes two writes'
    content = contents.pop()
    assert len(content) == 50_000 and len(set(content)) == 1, 'a partial write'
    return content[:1].decode()


@pytest.mark.parametrize('kind, exchange', [('file', 'exchange'), ('folder', 'exchange'),
                                            ('folder', 'two-renames')])
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['sigterm', 'ctrl-c'])
def test_a_signal_at_any_moment_leaves_one_whole_output_and_no_temporary(
        tmp_path, kind, exchange, signum):
    rng = random.Random(f'{kind}{exchange}{signum}')
    for round_ in range(ROUNDS):
        folder = tmp_path / str(round_)
        folder.mkdir()
        out = folder / 'out'
        child = subprocess.Popen([sys.executable, '-c', CHILD, str(out), kind, exchange, PACKAGE],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline() == 'ready\n', child.stderr.read()
        time.sleep(rng.uniform(0, 0.05))
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
        assert child.returncode == -signum, err  # ended by the signal, after cleaning up
        assert os.listdir(folder) == ['out'], f'left behind: {os.listdir(folder)}'
        generation_of(out, kind == 'folder')
