"""Specification of the output rule (effnetv2_jax/files.py), which every writer follows:

nothing but the output path itself is ever created, replaced or removed. An existing output is
replaced only when it is recognisably of the kind being written; the input, a folder containing
it, the working directory, a symlink, or anything else is refused (`OutputError`, an OSError with
a one-line message) with nothing touched. Writes go through a temporary sibling that is renamed
into place, so a failed write leaves the old output and no temporary behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import effnetv2_jax
from convert import torch_io
from effnetv2_jax import checkpoint
from effnetv2_jax.files import OutputError, OutputKind, atomic_write, check_output
from helpers import SMALL_METADATA, assert_one_line_error, snapshot

ANY_FILE = OutputKind('a test file', lambda path: path.is_file())
ANY_FOLDER = OutputKind('a test folder', lambda path: path.is_dir(), directory=True)



def leaves_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.parametrize('fmt', ['msgpack', 'orbax'])
def test_saving_again_replaces_a_weights_file_of_the_same_format(tmp_path, small_variables, fmt):
    path = tmp_path / 'w'
    effnetv2_jax.save(path, small_variables, SMALL_METADATA, fmt=fmt)
    changed = jax.tree.map(lambda x: x + 1, small_variables)
    effnetv2_jax.save(path, changed, SMALL_METADATA, fmt=fmt)
    assert leaves_equal(checkpoint.read(path)[0], changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['w']  # no temporary, no old copy


@pytest.mark.parametrize('fmt, other', [('msgpack', 'orbax'), ('orbax', 'msgpack')])
def test_a_weights_file_of_the_other_format_is_not_replaced(tmp_path, small_variables, fmt, other):
    path = tmp_path / 'w'
    effnetv2_jax.save(path, small_variables, SMALL_METADATA, fmt=other)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match='exists and is not an effnetv2-jax'):
        effnetv2_jax.save(path, small_variables, SMALL_METADATA, fmt=fmt)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('fmt', ['msgpack', 'orbax'])
def test_a_users_file_or_folder_is_never_replaced(tmp_path, small_variables, fmt):
    (tmp_path / 'notes.txt').write_text('my notes')
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'cat.jpg').write_bytes(b'\xff\xd8 a cat')
    before = snapshot(tmp_path)
    for taken in ('notes.txt', 'photos'):
        with pytest.raises(OutputError, match=f'{taken} exists and is not'):
            effnetv2_jax.save(tmp_path / taken, small_variables, SMALL_METADATA, fmt=fmt)
    assert snapshot(tmp_path) == before


def test_an_orbax_folder_holding_another_file_is_not_replaced(tmp_path, small_variables):
    path = tmp_path / 'w.orbax'
    effnetv2_jax.save(path, small_variables, SMALL_METADATA, fmt='orbax')
    (path / 'README').write_text('my description of these weights')
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match='not an effnetv2-jax Orbax weights folder'):
        effnetv2_jax.save(path, small_variables, SMALL_METADATA, fmt='orbax')
    assert snapshot(tmp_path) == before


def test_an_empty_folder_may_become_an_orbax_output(tmp_path, small_variables):
    (tmp_path / 'w.orbax').mkdir()
    effnetv2_jax.save(tmp_path / 'w.orbax', small_variables, SMALL_METADATA, fmt='orbax')
    assert leaves_equal(checkpoint.read(tmp_path / 'w.orbax')[0], small_variables)


def test_the_input_a_folder_containing_it_and_a_path_inside_it_are_refused(tmp_path):
    source = tmp_path / 'models' / 'w.orbax'
    source.mkdir(parents=True)
    for output, relation in ((source, 'is'), (source.parent, 'contains'),
                             (tmp_path, 'contains'), (source / 'out.pth', 'is inside')):
        with pytest.raises(OutputError, match=f'{relation} the input'):
            check_output(output, ANY_FOLDER, inputs=[source])


@pytest.mark.parametrize('output', ['.', '..'])
def test_the_working_directory_and_its_parents_are_refused(tmp_path, monkeypatch, output):
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match='working directory'):
        check_output(output, ANY_FOLDER)


def test_a_missing_output_folder_is_refused_not_created(tmp_path):
    with pytest.raises(OutputError, match='does not exist'):
        atomic_write(tmp_path / 'new' / 'out.bin', lambda tmp: tmp.write_bytes(b'x'), ANY_FILE)
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_is_never_replaced(tmp_path):
    (tmp_path / 'target.bin').write_bytes(b'target')
    (tmp_path / 'link.bin').symlink_to(tmp_path / 'target.bin')
    with pytest.raises(OutputError, match='link.bin exists and is not'):
        atomic_write(tmp_path / 'link.bin', lambda tmp: tmp.write_bytes(b'new'), ANY_FILE)
    assert (tmp_path / 'link.bin').is_symlink()
    assert (tmp_path / 'target.bin').read_bytes() == b'target'


@pytest.mark.parametrize('kind', [ANY_FILE, ANY_FOLDER], ids=['file', 'folder'])
def test_a_failed_write_keeps_the_old_output_and_leaves_no_temporary(tmp_path, kind):
    path = tmp_path / 'out'

    def write(content):
        def to(tmp: Path):
            (tmp / 'data' if kind.directory else tmp).write_bytes(content)
        return to

    def fail(tmp: Path):
        write(b'half')(tmp)
        raise OSError(28, 'No space left on device')
    atomic_write(path, write(b'old'), kind)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match='cannot write .*: no space left on device'):
        atomic_write(path, fail, kind)
    assert snapshot(tmp_path) == before


def test_a_replaced_folder_is_gone_after_the_rename(tmp_path):
    path = tmp_path / 'out'
    atomic_write(path, lambda tmp: (tmp / 'a').write_bytes(b'old'), ANY_FOLDER)
    atomic_write(path, lambda tmp: (tmp / 'b').write_bytes(b'new'), ANY_FOLDER)
    assert snapshot(tmp_path) == {'out': None, 'out/b': b'new'}


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_a_torch_export_replaces_its_own_file_and_no_other(tmp_path, suffix):
    path = tmp_path / f'model{suffix}'
    torch_io.write_state_dict(path, {'w': np.zeros(3, np.float32)})
    torch_io.write_state_dict(path, {'w': np.ones(3, np.float32)})
    assert torch_io.read_state_dict(path)[0]['w'].tolist() == [1, 1, 1]
    users = tmp_path / f'original{suffix}'
    if suffix == '.pth':
        torch.save({'w': torch.zeros(3)}, users)
    else:
        from safetensors.torch import save_file
        save_file({'w': torch.zeros(3)}, users)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match='not a PyTorch file written by python -m convert'):
        torch_io.write_state_dict(users, {'w': np.ones(3, np.float32)})
    assert snapshot(tmp_path) == before


def test_a_torch_export_loads_into_a_module_despite_its_producer_mark(tmp_path):
    path = tmp_path / 'linear.pth'
    torch_io.write_state_dict(path, {'weight': np.ones((2, 3), np.float32),
                                     'bias': np.zeros(2, np.float32)})
    linear = torch.nn.Linear(3, 2)
    linear.load_state_dict(torch.load(path, weights_only=True))
    assert linear.weight.sum().item() == 6


def test_training_refuses_a_workdir_whose_model_msgpack_is_not_ours(tmp_path, capsys):
    from train.__main__ import main
    (tmp_path / 'model.msgpack').write_text('my own file')
    rc = main(['--workdir', str(tmp_path), '--epochs', '1'])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = assert_one_line_error(err)
    assert 'model.msgpack exists and is not an effnetv2-jax weights file' in line
    assert (tmp_path / 'model.msgpack').read_text() == 'my own file'
    assert os.listdir(tmp_path) == ['model.msgpack']
