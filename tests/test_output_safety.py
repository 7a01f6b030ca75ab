"""Specification, over every writer, of the rule that nothing a user had is lost: an output
never is, contains or lies inside an input of the same command; an existing output is replaced
only when it holds nothing but what the same writer wrote there; a refused command changes
nothing; a command that succeeds creates or replaces its output and nothing else.

Hypothesis draws each writer's output among its own inputs, their parents and children, a
user's files and folders, earlier outputs of every writer, and fresh paths (derandomised, so that
CI sees the same draws each run). The world it writes into holds one of everything.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import effnetv2_jax
from convert import torch_reference
from convert.__main__ import main as convert_main
from effnetv2_jax.export import main as export_main
from helpers import SMALL_METADATA
from train.__main__ import main as train_main
from train.pack import main as pack_main

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

# Paths of the world, relative to its root (the working directory of every command).
INPUTS = ('ckpt.pth', 'w.msgpack', 'hub', 'data')
INSIDE_INPUTS = ('hub/model.safetensors', 'hub/new', 'data/cat', 'data/cat/0.png', 'data/new')
USERS = ('mine.txt', 'notes', 'notes/n.txt', 'notes/new', 'fresh', 'fresh.pth')
EARLIER_OUTPUTS = ('own.msgpack', 'own.pth', 'own_hub', 'own.jaxexport', 'own_packed')
CANDIDATES = ('.', *INPUTS, *INSIDE_INPUTS, *USERS, *EARLIER_OUTPUTS)


class Writer:
    """A command: `run(output) -> exit status`, the inputs it reads, and the paths it may
    replace (earlier outputs of the same kind, which are not among its inputs)."""

    def __init__(self, run, inputs, replaceable, extra_outputs=lambda output: ()):
        self.run, self.inputs, self.replaceable = run, inputs, replaceable
        self.extra_outputs = extra_outputs  # paths written beside the output (a sidecar)


def save_pretrained(output) -> int:
    variables, metadata = effnetv2_jax.checkpoint.read('w.msgpack')
    try:
        effnetv2_jax.save_pretrained(output, variables, metadata)
    except OSError:
        return 2
    return 0


WRITERS = {
    'convert': Writer(lambda out: convert_main(['ckpt.pth', '-o', out]), ('ckpt.pth',),
                      ('own.msgpack', 'w.msgpack')),
    'convert --to-torch': Writer(
        lambda out: convert_main(['w.msgpack', '--to-torch', '--layout', 'wzmiaomiao', '-o', out]),
        ('w.msgpack',), ('own.pth',)),
    'convert local-dir:': Writer(lambda out: convert_main(['local-dir:hub', '-o', out]),
                                 ('hub',), ('own.msgpack', 'w.msgpack')),
    'convert --save-pretrained': Writer(
        lambda out: convert_main(['local-dir:hub', '--save-pretrained', out]), ('hub',),
        ('own_hub',)),
    'save_pretrained': Writer(save_pretrained, ('w.msgpack',), ('own_hub', 'hub')),
    'export': Writer(lambda out: export_main(['w.msgpack', '-o', out, '--image-size', '32']),
                     ('w.msgpack',), ('own.jaxexport',),
                     extra_outputs=lambda out: (f'{out}.json',)),
    'export local-dir:': Writer(
        lambda out: export_main(['local-dir:hub', '-o', out, '--image-size', '32']), ('hub',),
        ('own.jaxexport',), extra_outputs=lambda out: (f'{out}.json',)),
    'train.pack': Writer(lambda out: pack_main(['data', out, '--shards', '1']), ('data',),
                         ('own_packed',)),
}


def build_world(root: Path, variables):
    """One of everything: PyTorch and Flax weights, a save_pretrained folder, an image folder,
    a user's files, and an earlier output of every writer."""
    torch.save(torch_reference.create('b0', num_classes=3).state_dict(), root / 'ckpt.pth')
    effnetv2_jax.save(root / 'w.msgpack', variables, SMALL_METADATA)
    effnetv2_jax.save_pretrained(root / 'hub', variables, SMALL_METADATA)
    for cls in ('cat', 'dog'):
        (root / 'data' / cls).mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (8, 8), (40 * i, 90, 200)).save(root / 'data' / cls / f'{i}.png')
    (root / 'mine.txt').write_text('my notes')
    (root / 'notes').mkdir()
    (root / 'notes' / 'n.txt').write_text('more notes')
    with working_directory(root):
        assert convert_main(['ckpt.pth', '-o', 'own.msgpack']) == 0
        assert convert_main(['w.msgpack', '--to-torch', '--layout', 'wzmiaomiao',
                             '-o', 'own.pth']) == 0
        assert convert_main(['w.msgpack', '--save-pretrained', 'own_hub']) == 0
        assert export_main(['w.msgpack', '-o', 'own.jaxexport', '--image-size', '32']) == 0
        assert pack_main(['data', 'own_packed', '--shards', '1']) == 0


@contextlib.contextmanager
def working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under `root` with a digest of its content (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob('*'))}


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip('/') + '/')


@pytest.fixture(scope='module')
def world(tmp_path_factory, small_variables) -> Path:
    root = tmp_path_factory.mktemp('world')
    build_world(root, small_variables)
    return root


@contextlib.contextmanager
def copy_of(world: Path):
    """A fresh copy of the world (hard links: every writer replaces files, never edits them,
    and the snapshots would show it if one did)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'world'
        shutil.copytree(world, root, copy_function=os.link)
        yield root


def check_writer(world: Path, writer: Writer, output: str):
    with copy_of(world) as root:
        before = snapshot(root)
        with working_directory(root):
            status = writer.run(output)
        after = snapshot(root)
        existed = output in before
        if status != 0:
            assert after == before, f'refused (status {status}) but changed the world'
            return
        outputs = (output, *writer.extra_outputs(output))
        assert not (existed and output not in writer.replaceable), (
            f'replaced {output}, which it did not write')
        assert not any(under(output, source) or under(source, output)
                       for source in writer.inputs), f'wrote {output} over its input'
        for path in set(before) | set(after):
            if not any(under(path, top) for top in outputs):
                assert before.get(path, 'absent') == after.get(path, 'absent'), (
                    f'{path} changed, outside the output {output}')


@pytest.mark.parametrize('name', sorted(WRITERS))
def test_a_writer_loses_nothing_wherever_its_output_is_put(world, name):
    @SETTINGS
    @given(output=st.sampled_from(CANDIDATES))
    def check(output):
        check_writer(world, WRITERS[name], output)
    check()


# Training writes into its workdir (created if absent) rather than replacing it: these are the
# workdirs it must refuse, among its inputs (--data-dir data, --init w.msgpack), the folders
# above and below them, and files.
REFUSED_WORKDIRS = ('.', 'data', 'data/cat', 'data/cat/0.png', 'data/new', 'w.msgpack',
                    'ckpt.pth', 'hub/model.safetensors', 'mine.txt', 'notes/n.txt')


@SETTINGS
@given(workdir=st.sampled_from(REFUSED_WORKDIRS))
def test_training_refuses_a_workdir_among_its_inputs_or_a_users_file(world, workdir):
    """Any of these drawn workdirs is refused before training; the world is unchanged."""
    with copy_of(world) as root:
        before = snapshot(root)
        with working_directory(root):
            status = train_main(['--data-dir', 'data', '--init', 'w.msgpack',
                                 '--workdir', workdir, '--epochs', '1'])
        assert status == 2
        assert snapshot(root) == before
