"""Specification of a full disk for the writers of weights and packs: `python -m convert` (Flax
msgpack, Orbax, `--to-torch` in both formats, `--save-pretrained`) and `python -m train.pack`
exit with status 2 and one line saying so, and leave the disk as it was: no partial output, no
temporary. The disk is a real one that fills up (a small tmpfs); export's and training's full
disks are specified beside the rest of their behaviour (test_input_limits, test_train_trust).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

import effnetv2_jax
from convert import torch_reference
from convert.__main__ import main as convert_main
from effnetv2_jax.export import main as export_main
from effnetv2_jax.predict import main as predict_main
from helpers import SMALL_METADATA, assert_one_line_error
from train.__main__ import main as train_main
from train.pack import main as pack_main

DISK_BYTES = 256 * 1024  # B0's weights take 24 MB: every output overflows it part-way


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, small_variables):
    """ckpt.pth (WZMIAOMIAO B0, 3 classes), w.msgpack and an image folder of noise."""
    folder = tmp_path_factory.mktemp('inputs')
    torch.save(torch_reference.create('b0', num_classes=3).state_dict(), folder / 'ckpt.pth')
    effnetv2_jax.save(folder / 'w.msgpack', small_variables, SMALL_METADATA)
    rng = np.random.default_rng(0)
    for cls in ('a', 'b'):
        (folder / 'images' / cls).mkdir(parents=True)
        for i in range(8):  # ~50 KB of PNG noise each: the pack overflows the disk
            noise = rng.integers(0, 256, (128, 128, 3), np.uint8)
            Image.fromarray(noise).save(folder / 'images' / cls / f'{i}.png')
    return folder


COMMANDS = {
    'msgpack': lambda i, out: convert_main([str(i / 'ckpt.pth'), '-o', str(out / 'w.msgpack')]),
    'orbax': lambda i, out: convert_main([str(i / 'ckpt.pth'), '--format', 'orbax',
                                          '-o', str(out / 'w.orbax')]),
    'to-torch-pth': lambda i, out: convert_main([str(i / 'w.msgpack'), '--to-torch', '--layout',
                                                 'wzmiaomiao', '-o', str(out / 'w.pth')]),
    'to-torch-safetensors': lambda i, out: convert_main(
        [str(i / 'w.msgpack'), '--to-torch', '--layout', 'timm', '-o',
         str(out / 'w.safetensors')]),
    'save-pretrained': lambda i, out: convert_main([str(i / 'w.msgpack'), '--save-pretrained',
                                                    str(out / 'hub')]),
    'pack': lambda i, out: pack_main([str(i / 'images'), str(out / 'packed'), '--shards', '1']),
}


@pytest.mark.parametrize('command', COMMANDS)
def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, monkeypatch, inputs, full_disk,
                                                    command):
    monkeypatch.setattr('train.pack.tqdm', functools.partial(tqdm, disable=True))  # its bar
    disk = full_disk(DISK_BYTES)
    status = COMMANDS[command](inputs, disk)
    err = capsys.readouterr().err
    assert status == 2, err
    assert assert_one_line_error(err).endswith('no space left on device')
    assert list(disk.iterdir()) == []


@pytest.mark.parametrize('main', [convert_main, export_main, predict_main, train_main, pack_main],
                         ids=['convert', 'export', 'predict', 'train', 'pack'])
def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, main):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr('argparse.ArgumentParser.parse_args', interrupted)
    assert main(['anything']) == 130
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert err.strip().splitlines() == ['interrupted; nothing half-written is left']
