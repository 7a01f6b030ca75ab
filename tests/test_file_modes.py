"""Specification of output permissions: every output follows the umask as any file the user
writes, 0644 under umask 022 and 0600 under 077 (folders 0755 and 0700), whether it is new or
replaces an earlier one of any mode.

One test per writer: `effnetv2_jax.save` (msgpack), `python -m effnetv2_jax.export` (artifact and
sidecar), `python -m convert` (-o x.msgpack; --to-torch; --save-pretrained, a folder whose files
count). Each writes under 022, replaces under 077, then replaces under 022 again.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import effnetv2_jax
from convert import torch_reference
from convert.__main__ import main as convert_main
from effnetv2_jax.export import main as export_main
from helpers import SMALL_METADATA

UMASKS = (0o022, 0o077, 0o022)  # created, replaced by a stricter mode, replaced by a looser one


@pytest.fixture
def folder(tmp_path, monkeypatch, small_variables) -> Path:
    """The working directory, with ckpt.pth (B0, 3 classes) and w.msgpack; the umask restored
    after the test."""
    monkeypatch.chdir(tmp_path)
    torch.save(torch_reference.create('b0', num_classes=3).state_dict(), tmp_path / 'ckpt.pth')
    effnetv2_jax.save(tmp_path / 'w.msgpack', small_variables, SMALL_METADATA)
    umask = os.umask(0o022)
    yield tmp_path
    os.umask(umask)


def save_msgpack(small_variables) -> list[str]:
    effnetv2_jax.save('out.msgpack', small_variables, SMALL_METADATA)
    return ['out.msgpack']


def export(_) -> list[str]:
    assert export_main(['w.msgpack', '-o', 'out.jaxexport']) == 0
    return ['out.jaxexport', 'out.jaxexport.json']


def convert_to_msgpack(_) -> list[str]:
    assert convert_main(['ckpt.pth', '-o', 'out.msgpack']) == 0
    return ['out.msgpack']


def convert_to_torch(_) -> list[str]:
    assert convert_main(['--to-torch', 'w.msgpack', '--layout', 'timm', '-o', 'out.pth']) == 0
    return ['out.pth']


def convert_to_safetensors(_) -> list[str]:
    assert convert_main(['--to-torch', 'w.msgpack', '--layout', 'timm',
                         '-o', 'out.safetensors']) == 0
    return ['out.safetensors']


def save_pretrained(_) -> list[str]:
    assert convert_main(['w.msgpack', '--save-pretrained', 'hub']) == 0
    return ['hub', *(str(p) for p in Path('hub').rglob('*'))]


WRITERS = {'save-msgpack': save_msgpack, 'export': export, 'convert': convert_to_msgpack,
           'convert-to-torch': convert_to_torch, 'convert-to-safetensors': convert_to_safetensors,
           'convert-save-pretrained': save_pretrained}
@pytest.mark.parametrize('writer', list(WRITERS))
def test_outputs_follow_the_umask_when_created_and_when_replaced(folder, small_variables, writer):
    for umask in UMASKS:
        os.umask(umask)
        written = WRITERS[writer](small_variables)
        modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in written}
        expected = {path: (0o777 if os.path.isdir(path) else 0o666) & ~umask for path in written}
        assert modes == expected, f'umask {umask:03o}'
