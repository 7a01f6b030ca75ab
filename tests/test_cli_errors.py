"""Specification of the exit statuses every command keeps for a user's mistake: status 2, one
line `error: ...` on stderr, no traceback, and nothing written or changed. One row per mistake;
each runs in-process (`main(argv)`) from a folder holding a PyTorch checkpoint, a weights file
and a user's own files."""
from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import effnetv2_jax
from convert import torch_reference
from convert.__main__ import main as convert_main
from effnetv2_jax.export import main as export_main
from effnetv2_jax.predict import main as predict_main
from helpers import SMALL_METADATA, assert_one_line_error, snapshot, write_unchecked_weights
from train.__main__ import main as train_main
from train.pack import main as pack_main




@pytest.fixture(scope='module')
def state_dict():
    return torch_reference.create('b0', num_classes=3).state_dict()


@pytest.fixture
def folder(tmp_path, monkeypatch, small_variables, state_dict) -> Path:
    """The working directory: ckpt.pth, w.msgpack, mine.txt, photos/cat/0.png (also a class
    folder tree), and weights files whose variables or metadata are wrong (broken.orbax: an
    Orbax folder whose metadata.json is cut short)."""
    monkeypatch.chdir(tmp_path)
    torch.save(state_dict, tmp_path / 'ckpt.pth')
    effnetv2_jax.save(tmp_path / 'w.msgpack', small_variables, SMALL_METADATA)
    (tmp_path / 'mine.txt').write_text('my notes')
    (tmp_path / 'broken.orbax' / 'variables').mkdir(parents=True)
    (tmp_path / 'broken.orbax' / 'metadata.json').write_text('{"format_version": 1,')
    (tmp_path / 'photos' / 'cat').mkdir(parents=True)
    from PIL import Image
    Image.new('RGB', (40, 30), (200, 100, 50)).save(tmp_path / 'photos' / 'cat' / '0.png')
    write_unchecked_weights(tmp_path / 'head.msgpack', small_variables,
                            {**SMALL_METADATA, 'num_classes': 1000})
    write_unchecked_weights(tmp_path / 'padding.msgpack', small_variables,
                            {**SMALL_METADATA, 'padding': 'reflect'})
    stem = jax.tree.map(np.asarray, small_variables)
    stem['params']['stem']['conv']['kernel'] = np.zeros((3, 3, 3, 8), np.float32)
    write_unchecked_weights(tmp_path / 'shape.msgpack', stem, SMALL_METADATA)
    return tmp_path


def run(capsys, main, argv) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    captured = capsys.readouterr()
    return status, captured.err


def to_torch(weights: str) -> list[str]:
    return ['--to-torch', weights, '--layout', 'timm', '-o', 'out.pth']


MISTAKES = {  # id: (command, argv, what the error line says)
    'convert-output-is-a-folder': (
        convert_main, ['ckpt.pth', '-o', 'photos'], 'photos exists and is not'),
    'convert-output-is-a-users-file': (
        convert_main, ['ckpt.pth', '-o', 'mine.txt'], 'mine.txt exists and is not'),
    'convert-output-is-the-working-directory': (
        convert_main, ['ckpt.pth', '--format', 'orbax', '-o', '.'], 'contains the input'),
    'convert-output-contains-the-input': (
        convert_main, ['photos/../ckpt.pth', '--format', 'orbax', '-o', 'photos/..'],
        'contains the input'),
    'convert-output-is-the-input': (
        convert_main, ['ckpt.pth', '-o', 'ckpt.pth'], 'is the input'),
    'convert-output-folder-missing': (
        convert_main, ['ckpt.pth', '-o', 'new/out.msgpack'], 'new does not exist'),
    'convert-verify-size-0': (
        convert_main, ['ckpt.pth', '--verify', '--verify-size', '0'],
        'expected an image size from 1 to 4096'),
    'convert-verify-size-60000': (
        convert_main, ['ckpt.pth', '--verify', '--verify-size', '60000'],
        'expected an image size from 1 to 4096'),
    'convert-orbax-folder-with-broken-metadata': (
        convert_main, ['broken.orbax', '-o', 'o.msgpack'],
        'broken.orbax is not a valid effnetv2-jax weights file: metadata.json is not valid JSON'),
    'convert-tolerance-negative': (
        convert_main, ['ckpt.pth', '--verify', '--tolerance', '-1'], 'positive number'),
    'convert-unknown-flag': (convert_main, ['ckpt.pth', '--fast'], 'unrecognized arguments'),
    'to-torch-head-not-metadata': (
        convert_main, to_torch('head.msgpack'),
        'params/classifier/bias is float32[3], expected float32[1000]'),
    'to-torch-leaf-shape': (
        convert_main, to_torch('shape.msgpack'), 'params/stem/conv/kernel is float32[3, 3, 3, 8]'),
    'to-torch-unknown-padding': (convert_main, to_torch('padding.msgpack'), "padding 'reflect'"),
    'to-torch-variant-the-layout-lacks': (
        convert_main, ['--to-torch', 'w.msgpack', '--layout', 'torchvision', '-o', 'out.pth'],
        'has no EfficientNetV2-B0'),
    'to-torch-over-the-original-checkpoint': (
        convert_main, ['--to-torch', 'w.msgpack', '--layout', 'wzmiaomiao', '-o', 'ckpt.pth'],
        'ckpt.pth exists and is not a PyTorch file written by python -m convert'),
    'export-over-a-users-file': (
        export_main, ['w.msgpack', '-o', 'mine.txt'], 'mine.txt exists and is not'),
    'export-into-its-local-dir-input': (
        export_main, ['local-dir:photos', '-o', 'photos/m.jaxexport'],
        'output photos/m.jaxexport is inside the input local-dir:photos'),
    'export-weights-not-metadata': (
        export_main, ['head.msgpack', '-o', 'out.jaxexport'], 'expected float32[1000]'),
    'predict-weights-not-metadata': (
        predict_main, ['photos/cat/0.png', '--weights', 'head.msgpack'],
        'expected float32[1000]'),
    'train-init-weights-not-metadata': (
        train_main, ['--init', 'head.msgpack', '--data-dir', 'photos', '--workdir', 'run'],
        'expected float32[1000]'),
    'train-eval-only-weights-not-metadata': (
        train_main, ['--eval-only', '--init', 'head.msgpack', '--data-dir', 'photos',
                     '--workdir', 'run'], 'expected float32[1000]'),
    'predict-top-k-0': (
        predict_main, ['photos/cat/0.png', '--weights', 'w.msgpack', '--top-k', '0'], '--top-k'),
    'convert-save-pretrained-over-a-users-folder': (
        convert_main, ['w.msgpack', '--save-pretrained', 'photos'], 'photos exists and is not'),
    'convert-push-without-save-pretrained': (
        convert_main, ['w.msgpack', '--push-to-hub', 'me/b0'], '--push-to-hub needs'),
    'convert-variant-for-a-weights-file': (
        convert_main, ['w.msgpack', '--variant', 's', '-o', 'out.msgpack'],
        '--variant read PyTorch checkpoints'),
    'export-onnx-over-a-users-file': (
        export_main, ['w.msgpack', '--format', 'onnx', '-o', 'mine.txt'],
        'mine.txt exists and is not'),
    'train-save-pretrained-over-a-users-folder': (
        train_main, ['--data-dir', 'photos', '--workdir', 'run', '--save-pretrained', 'photos'],
        'photos'),
    'train-finetune-without-init': (
        train_main, ['--preset', 'finetune', '--data-dir', 'photos', '--workdir', 'run'],
        '--init hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k'),
    'train-finetune-b0-without-init': (
        train_main, ['--preset', 'finetune', '--variant', 'b0', '--data-dir', 'photos'],
        '--init hf-hub:timm/tf_efficientnetv2_b0.in1k'),
    'predict-timm-name-without-hf-hub': (
        predict_main, ['photos/cat/0.png', '--weights', 'tf_efficientnetv2_b0.in1k'],
        'tf_efficientnetv2_b0.in1k: no such file; for the pretrained weights, write '
        'hf-hub:timm/tf_efficientnetv2_b0.in1k'),
    'convert-timm-repository-without-hf-hub': (
        convert_main, ['timm/efficientnetv2_rw_s.ra2_in1k'],
        'write hf-hub:timm/efficientnetv2_rw_s.ra2_in1k'),
    'export-torchvision-name-without-scheme': (
        export_main, ['efficientnet_v2_m'], 'write torchvision:efficientnet_v2_m'),
    'train-init-torchvision-name-without-scheme': (
        train_main, ['--init', 'efficientnet_v2_s', '--data-dir', 'photos'],
        'efficientnet_v2_s: no such file; for the pretrained weights, write '
        'torchvision:efficientnet_v2_s'),
    'pack-output-over-a-users-file': (pack_main, ['photos', 'mine.txt'], 'mine.txt'),
    'pack-output-inside-the-input': (pack_main, ['photos', 'photos/packed'], 'photos'),
    'pack-missing-folder': (pack_main, ['nowhere', 'packed'], 'nowhere'),
}


@pytest.mark.parametrize('mistake', MISTAKES)
def test_a_user_mistake_is_exit_2_one_line_and_nothing_written(capsys, folder, mistake):
    main, argv, message = MISTAKES[mistake]
    before = snapshot(folder)
    status, err = run(capsys, main, argv)
    assert status == 2, err
    assert message in assert_one_line_error(err)
    assert snapshot(folder) == before


@pytest.mark.parametrize('argv', [
    ['ckpt.pth', '-o', 'out.msgpack'],
    ['--to-torch', 'w.msgpack', '--layout', 'timm', '-o', 'out.safetensors']],
    ids=['convert', 'to-torch'])
def test_an_unwritable_output_folder_is_exit_2_one_line_and_nothing_written(
        capsys, folder, monkeypatch, argv):
    def refuse(*args, **kwargs):  # what a read-only folder does (root may write anyway)
        raise PermissionError(13, 'Permission denied', kwargs.get('dir'))
    monkeypatch.setattr(tempfile, 'mkstemp', refuse)
    before = snapshot(folder)
    status, err = run(capsys, convert_main, argv)
    assert status == 2, err
    assert 'Permission denied' in assert_one_line_error(err)
    assert snapshot(folder) == before


@pytest.mark.parametrize('text', ['efficientnet_v2_s', 'efficientnetv2_s.pth'])
def test_an_existing_file_or_a_weights_file_name_stays_a_path(folder, text):
    from effnetv2_jax.cli import weights_source
    (folder / 'efficientnet_v2_s').write_bytes(b'')  # exists: the user's file, not the name
    assert weights_source(text) == Path(text)
