"""Specification of what `python -m effnetv2_jax.predict` and `python -m effnetv2_jax.export`
refuse before they run out of memory or compute NaN, and how they end when they cannot finish.

- Image sizes (a spec's `size`, `predict --size`, `export --image-size`) are integers, not bools,
  from 1 to `transforms.MAX_IMAGE_SIZE` pixels.
- The normalisation is finite (`std` > 0), and so are the weights: a setting or a file that could
  only give NaN is exit 2 with one line naming it, and `--json` never prints a bare NaN.
- An Orbax weights folder whose metadata.json is broken is reported as that.
- Ctrl-C is exit 130 with one line, nothing written.
- An export's artifact and its sidecar are written both or neither: a full disk (a real one, a
  small tmpfs) leaves no new file and the old pair as it was.

Every command runs in-process (`main(argv)`) on B0 with 3 classes at 32 px.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import effnetv2_jax
from effnetv2_jax import predictor as predictor_module
from effnetv2_jax import export as export_module
from effnetv2_jax.export import main as export_main
from effnetv2_jax.predict import main as predict_main
from effnetv2_jax.transforms import MAX_IMAGE_SIZE, check_spec, image_size
from helpers import SMALL_METADATA, assert_one_line_error, snapshot, write_unchecked_weights

SPEC = {'size': 32, 'resize': 'shorter', 'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': [0.5] * 3, 'std': [0.5] * 3}
METADATA = {**SMALL_METADATA, 'preprocessing': SPEC}


def with_nan(variables):
    variables = copy.deepcopy(jax.tree.map(np.asarray, variables))
    variables['params']['stem']['conv']['kernel'][0, 0, 0, 0] = np.nan
    return variables


@pytest.fixture
def folder(tmp_path, monkeypatch, small_variables) -> Path:
    """The working directory: 0.png, w.msgpack (B0, 3 classes, a 32 px spec), w.orbax, and
    weights files whose metadata or variables could only fail: big, bool-size, std-0, nan,
    broken.orbax (metadata.json not JSON)."""
    monkeypatch.chdir(tmp_path)
    Image.new('RGB', (40, 30), (200, 100, 50)).save(tmp_path / '0.png')
    effnetv2_jax.save(tmp_path / 'w.msgpack', small_variables, METADATA)
    effnetv2_jax.save(tmp_path / 'broken.orbax', small_variables, METADATA, fmt='orbax')
    (tmp_path / 'broken.orbax' / 'metadata.json').write_text('{"variant": "b0",')
    for name, change in (('big', {'size': 10**9}), ('bool-size', {'size': True}),
                         ('std-0', {'std': [0, 0, 0]})):
        write_unchecked_weights(tmp_path / f'{name}.msgpack', small_variables,
                                {**METADATA, 'preprocessing': {**SPEC, **change}})
    write_unchecked_weights(tmp_path / 'nan.msgpack', with_nan(small_variables), METADATA)
    return tmp_path


def run(capsys, main, argv) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def predict(weights: str, *flags: str) -> tuple:
    """A row's command and argv: predict 0.png with `weights` and `flags`."""
    return predict_main, ['0.png', '--weights', weights, *flags]


REFUSED = {  # id: (command, argv, what the error line says)
    'predict-size-over-the-limit': (
        *predict('w.msgpack', '--size', '100000'),
        f"argument --size: expected an image size from 1 to {MAX_IMAGE_SIZE} pixels, got "
        "'100000'"),
    'export-image-size-over-the-limit': (
        export_main, ['w.msgpack', '--image-size', '60000'],
        f"argument --image-size: expected an image size from 1 to {MAX_IMAGE_SIZE} pixels"),
    'predict-metadata-size-over-the-limit': (
        *predict('big.msgpack'),
        'big.msgpack is not a valid effnetv2-jax weights file: metadata preprocessing: size must '
        f'be an integer from 1 to {MAX_IMAGE_SIZE} (pixels), got 1000000000'),
    'export-metadata-size-over-the-limit': (
        export_main, ['big.msgpack'], 'size must be an integer from 1 to'),
    'predict-metadata-size-a-bool': (
        *predict('bool-size.msgpack'),
        f'size must be an integer from 1 to {MAX_IMAGE_SIZE} (pixels), got True'),
    'predict-std-0': (
        *predict('w.msgpack', '--std', '0', '0', '0', '--json'),
        'std must be 3 finite numbers > 0 (R, G, B), got [0.0, 0.0, 0.0]'),
    'predict-mean-nan': (
        *predict('w.msgpack', '--mean', 'nan', '0', '0', '--json'),
        'mean must be 3 finite numbers (R, G, B), got [nan, 0.0, 0.0]'),
    'predict-metadata-std-0': (
        *predict('std-0.msgpack', '--json'),
        'metadata preprocessing: std must be 3 finite numbers > 0 (R, G, B), got [0, 0, 0]'),
    'predict-crop-pct-overflows': (
        *predict('w.msgpack', '--crop-pct', '1e-320'),
        'crop_pct 1e-320 is too small: size / crop_pct overflows'),
    'predict-nan-weights': (
        *predict('nan.msgpack', '--json'),
        'NaN or Inf in params/stem/conv/kernel of nan.msgpack: the model would output NaN'),
    'export-nan-weights': (
        export_main, ['nan.msgpack'],
        'NaN or Inf in params/stem/conv/kernel of the weights: the model would output NaN'),
    'predict-orbax-metadata-not-json': (
        *predict('broken.orbax'),
        'broken.orbax is not a valid effnetv2-jax weights file: metadata.json is not valid JSON '
        '(Expecting property name enclosed in double quotes: line 1 column 18 (char 17))'),
    'export-orbax-metadata-not-json': (
        export_main, ['broken.orbax'], 'metadata.json is not valid JSON (Expecting'),
}


@pytest.mark.parametrize('case', REFUSED)
def test_what_could_only_fail_or_give_nan_is_exit_2_one_line_and_nothing_written(
        capsys, folder, case):
    main, argv, message = REFUSED[case]
    before = snapshot(folder)
    status, out, err = run(capsys, main, argv)
    assert status == 2, err
    assert message in assert_one_line_error(err)
    assert out == ''  # no table, no JSON with NaN in it
    assert snapshot(folder) == before


def test_the_size_limit_is_inclusive():
    assert image_size(str(MAX_IMAGE_SIZE)) == MAX_IMAGE_SIZE
    check_spec({**SPEC, 'size': MAX_IMAGE_SIZE})
    with pytest.raises(argparse.ArgumentTypeError):
        image_size(str(MAX_IMAGE_SIZE + 1))
    with pytest.raises(ValueError, match='size must be an integer'):
        check_spec({**SPEC, 'size': MAX_IMAGE_SIZE + 1})


@pytest.mark.parametrize('change', [{'size': True}, {'size': 32.0}, {'std': [0.5, 0.5, -0.5]},
                                    {'std': [0.5, 0.5, math.inf]}, {'mean': [0, 0, math.nan]},
                                    {'mean': [0, 0, True]}, {'crop_pct': '1'}],
                         ids=['bool-size', 'float-size', 'negative-std', 'inf-std', 'nan-mean',
                              'bool-mean', 'text-crop-pct'])
def test_a_spec_that_is_not_numbers_in_range_is_a_value_error(change):
    with pytest.raises(ValueError):
        check_spec({**SPEC, **change})
    with pytest.raises(ValueError):
        check_spec(change, complete=False)  # as metadata, where keys may be missing


def test_logits_that_overflow_are_refused_not_printed_as_nan(capsys, folder, small_variables):
    variables = jax.tree.map(np.array, small_variables)
    classifier = variables['params']['classifier']  # finite, but its sums exceed float32
    classifier['kernel'][:] = 3e38
    classifier['bias'][:] = 3e38
    effnetv2_jax.save(folder / 'huge.msgpack', variables, METADATA)
    status, out, err = run(capsys, *predict('huge.msgpack', '--json'))
    assert status == 2 and out == ''
    assert ('the logits of 0.png overflow to Inf or NaN: the weights are too large for float32'
            in assert_one_line_error(err))


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def assert_interrupted(status: int, err: str):
    assert status == 130
    assert 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1 and 'interrupted' in err


def test_ctrl_c_during_predict_is_exit_130_and_one_line(capsys, folder, monkeypatch):
    monkeypatch.setattr(predictor_module, 'eval_crops', interrupt)
    status, _, err = run(capsys, *predict('w.msgpack'))
    assert_interrupted(status, err)


def test_ctrl_c_between_artifact_and_sidecar_is_exit_130_and_writes_neither(
        capsys, folder, monkeypatch):
    write_bytes = export_module.atomic_write_bytes

    def interrupt_the_sidecar(path, *args, **kwargs):
        if Path(path).suffix == '.json':
            raise KeyboardInterrupt
        write_bytes(path, *args, **kwargs)
    monkeypatch.setattr(export_module, 'atomic_write_bytes', interrupt_the_sidecar)
    before = snapshot(folder)
    status, _, err = run(capsys, export_main, ['w.msgpack'])
    assert_interrupted(status, err)
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------------
# a full disk


PAGE = 4096  # tmpfs counts whole pages


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE) * PAGE


@pytest.fixture(scope='module')
def artifact_bytes(tmp_path_factory, small_variables) -> int:
    """The size of w.msgpack's artifact, as the command writes it."""
    folder = tmp_path_factory.mktemp('measure')
    effnetv2_jax.save(folder / 'w.msgpack', small_variables, METADATA)
    assert export_main([str(folder / 'w.msgpack')]) == 0
    return (folder / 'w.jaxexport').stat().st_size


def old_pair() -> dict[str, bytes]:
    """A small earlier export (x + 1) and its sidecar, by name."""
    exported = jax.export.export(jax.jit(lambda x: x + 1))(
        jax.ShapeDtypeStruct((1,), jnp.float32))
    sidecar = {'input_shape': [1], 'input_dtype': 'float32', 'output': 'logits',
               'platforms': ['cpu']}
    return {'w.jaxexport': bytes(exported.serialize()),
            'w.jaxexport.json': json.dumps(sidecar).encode()}


@pytest.mark.parametrize('replacing', [False, True], ids=['new', 'replacing'])
@pytest.mark.parametrize('room', ['for-the-artifact-not-the-sidecar', 'not-for-the-artifact'])
def test_a_full_disk_leaves_neither_new_file_and_the_old_pair_whole(
        capsys, folder, full_disk, artifact_bytes, replacing, room):
    old = old_pair() if replacing else {}
    disk = full_disk(sum(pages(len(content)) for content in old.values())
                      + pages(artifact_bytes) - (PAGE if room == 'not-for-the-artifact' else 0))
    for name, content in old.items():
        (disk / name).write_bytes(content)
    before = snapshot(disk)
    status, out, err = run(capsys, export_main, ['w.msgpack', '-o', str(disk / 'w.jaxexport')])
    assert status == 2
    assert 'no space left on device' in assert_one_line_error(err)
    assert snapshot(disk) == before
