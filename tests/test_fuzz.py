"""Fuzzing `python -m convert` in both directions (hypothesis, derandomised so that CI is
reproducible): a small PyTorch checkpoint and a small weights file are mutated -- truncated,
bytes flipped, keys renamed, dropped or added, shapes and dtypes changed, dicts wrapped and
prefixed, metadata changed -- and every run must end in one of two ways:

- exit 0 and a correct output: it holds exactly the input's tensors, as an independent load of
  the (mutated) input and a conversion back in the other direction show; or
- exit 2, one line `error: ...` on stderr, and nothing written.

Where a mutation's outcome is known (a renamed key can never convert; a DataParallel prefix
always does), the test also asserts which of the two it is.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import serialization, traverse_util
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import effnetv2_jax
from convert import torch_io, torch_reference
from effnetv2_jax import converter
from convert.__main__ import main as convert_main
from helpers import assert_one_line_error

EXAMPLES = 200  # per direction; measured 0.5 s (checkpoints), 0.3 s (weights) each, 2 cores
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
OK, BAD = 0, 2


@pytest.fixture(scope='module')
def state_dict() -> dict[str, torch.Tensor]:
    model = torch_reference.create('b0', num_classes=3)
    torch_reference.randomize_(model, 0)
    return model.state_dict()


@pytest.fixture(scope='module')
def weights(state_dict) -> dict:
    """The msgpack content `{'variables', 'metadata'}` of state_dict's conversion."""
    numpy_sd = {k: v.numpy() for k, v in state_dict.items() if 'num_batches' not in k}
    variables, metadata = converter.torch_to_flax(numpy_sd)
    return {'variables': variables, 'metadata': {'format_version': 1, **metadata}}


@pytest.fixture(scope='module')
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('fuzz')


def fresh_folder(scratch: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=scratch))


def run_convert(capsys, *argv) -> tuple[int, str]:
    status = convert_main([str(a) for a in argv])
    return status, capsys.readouterr().err


def assert_refused_cleanly(status: int, err: str, folder: Path, inputs: set[str]):
    assert status == BAD, err
    assert_one_line_error(err)
    assert {p.name for p in folder.iterdir()} == inputs, 'a refused run must write nothing'


# --------------------------------------------------------------------------------------------
# mutations


def byte_mutation(draw, data: bytes) -> bytes:
    """Truncation or a few flipped bytes, biased to the ends of the file, where the headers of
    zip archives, safetensors and msgpack maps lie."""
    size = len(data)
    position = st.one_of(st.integers(0, min(size, 4096) - 1),
                         st.integers(max(0, size - 4096), size - 1), st.integers(0, size - 1))
    if draw(st.booleans()):
        event('bytes: truncated')
        return data[:draw(position)]
    event('bytes: flipped')
    data = bytearray(data)
    for at, xor in draw(st.lists(st.tuples(position, st.integers(1, 255)), min_size=1,
                                 max_size=4)):
        data[at] ^= xor
    return bytes(data)


def tensor_mutation(draw, tensors: dict, *, casts: bool) -> tuple[dict, int | None]:
    """(mutated copy of `tensors`, the exit status it must give): a key renamed, dropped or
    added, a shape or dtype changed, a NaN planted, or nothing. `casts`: whether the reader
    accepts other dtypes (PyTorch checkpoints: cast to float32) or not (weights files)."""
    tensors = dict(tensors)
    keys = sorted(k for k in tensors if 'num_batches_tracked' not in k)  # dropped anyway
    key = keys[draw(st.integers(0, len(keys) - 1))]
    value = tensors[key]
    value = value.numpy().copy() if isinstance(value, torch.Tensor) else value.copy()
    kind = draw(st.sampled_from(['none', 'rename', 'drop', 'add', 'shape', 'dtype', 'nan']))
    event(f'tensors: {kind}')
    if kind == 'rename':
        tensors[key.replace('.', '_', 1).replace('/', '_', 1)] = tensors.pop(key)
    elif kind == 'drop':
        del tensors[key]
    elif kind == 'add':
        tensors[f'{key}_extra'] = np.zeros(3, np.float32)
    elif kind == 'shape':
        tensors[key] = value.reshape(-1)[:-1] if value.ndim == 1 else value.reshape(-1)
    elif kind == 'dtype':
        tensors[key] = value.astype(draw(st.sampled_from(['float16', 'float64', 'int32'])))
        return tensors, OK if casts else BAD
    elif kind == 'nan':
        value.reshape(-1)[draw(st.integers(0, value.size - 1))] = np.nan
        tensors[key] = value
    return tensors, OK if kind == 'none' else BAD


# --------------------------------------------------------------------------------------------
# PyTorch checkpoint -> weights file


def independent_load(path: Path, wrapper: str | None, prefix: str) -> dict[str, np.ndarray]:
    """The mutated checkpoint's tensors as float32, read without the converter's code."""
    if path.suffix == '.safetensors':
        obj = load_file(str(path))
    else:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    if wrapper is not None:
        obj = obj[wrapper]
    return {k[len(prefix):]: v.float().numpy() for k, v in obj.items()
            if 'num_batches_tracked' not in k}


@SETTINGS
@given(data=st.data())
def test_fuzzed_checkpoints_convert_exactly_or_fail_cleanly(capsys, scratch, state_dict, data):
    draw = data.draw
    tensors, expected = tensor_mutation(draw, state_dict, casts=True)
    suffix = draw(st.sampled_from(['.pth', '.safetensors']))
    wrapper, prefix = None, ''
    if suffix == '.pth':
        wrapper = draw(st.sampled_from([None, 'state_dict', 'model', 'model_state_dict']))
        prefix = draw(st.sampled_from(['', 'module.', '_orig_mod.']))
    folder = fresh_folder(scratch)
    source = folder / f'ckpt{suffix}'
    tensors = {prefix + k: torch.as_tensor(v) for k, v in tensors.items()}
    if suffix == '.safetensors':
        save_file({k: v.contiguous() for k, v in tensors.items()}, source)
    else:
        torch.save(tensors if wrapper is None else {wrapper: tensors, 'epoch': 3}, source)
    if draw(st.booleans()):
        source.write_bytes(byte_mutation(draw, source.read_bytes()))
        expected = None
    output = folder / 'out.msgpack'

    status, err = run_convert(capsys, source, '-o', output)
    event(f'exit {status}')
    if status == OK:
        assert expected in (None, OK), 'this mutation must be refused'
        variables, metadata = effnetv2_jax.checkpoint.read(output)
        back = converter.flax_to_torch(variables, metadata, metadata['source_layout'])
        loaded = independent_load(source, wrapper, prefix)
        assert set(back) - {k for k in back if 'num_batches' in k} == set(loaded)
        for key, value in loaded.items():
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    else:
        assert expected in (None, BAD), err
        assert_refused_cleanly(status, err, folder, {source.name})
    shutil.rmtree(folder)


# --------------------------------------------------------------------------------------------
# weights file -> PyTorch


def metadata_mutation(draw, metadata: dict) -> tuple[dict, int | None]:
    kind = draw(st.sampled_from(['none', 'variant', 'classes', 'padding', 'same-padding',
                                 'drop-key', 'eps']))
    event(f'metadata: {kind}')
    metadata = dict(metadata)
    if kind == 'variant':
        metadata['variant'] = draw(st.sampled_from(['b1', 's', 'xl', 'b9', '', 3]))
    elif kind == 'classes':
        metadata['num_classes'] = draw(st.sampled_from([0, 1000, -3, 3.0, '3']))
    elif kind == 'padding':
        metadata['padding'] = draw(st.sampled_from(['reflect', None, 1]))
    elif kind == 'same-padding':
        metadata['padding'] = 'same'  # valid: the export warns that the outputs will differ
        return metadata, OK
    elif kind == 'drop-key':
        del metadata[draw(st.sampled_from(['variant', 'num_classes', 'padding', 'bn_eps']))]
    elif kind == 'eps':
        metadata['bn_eps'] = draw(st.sampled_from([0.0, -1e-3, float('nan'), 'x']))
    return metadata, OK if kind == 'none' else BAD


@SETTINGS
@given(data=st.data())
def test_fuzzed_weights_files_export_exactly_or_fail_cleanly(capsys, scratch, weights, data):
    draw = data.draw
    flat = traverse_util.flatten_dict(weights['variables'], sep='/')
    flat, expected = tensor_mutation(draw, flat, casts=False)
    metadata, metadata_expected = metadata_mutation(draw, weights['metadata'])
    expected = None if None in (expected, metadata_expected) else max(expected, metadata_expected)
    content = {'variables': traverse_util.unflatten_dict(flat, sep='/'), 'metadata': metadata}
    if draw(st.booleans()):  # wrapped one level deeper
        content = {'variables': {'model': content['variables']}, 'metadata': metadata}
        expected = BAD
    folder = fresh_folder(scratch)
    source = folder / 'w.msgpack'
    data_bytes = serialization.msgpack_serialize(content)
    if draw(st.booleans()):
        data_bytes = byte_mutation(draw, data_bytes)
        expected = None
    source.write_bytes(data_bytes)
    layout = draw(st.sampled_from(['wzmiaomiao', 'torchvision', 'timm']))
    if layout == 'torchvision' and expected == OK:
        expected = None  # torchvision has no B0: refused unless the mutation made it S
    output = folder / draw(st.sampled_from(['out.pth', 'out.safetensors']))

    status, err = run_convert(capsys, '--to-torch', source, '--layout', layout, '-o', output)
    event(f'exit {status}')
    if status == OK:
        assert expected in (None, OK), 'this mutation must be refused'
        restored = serialization.msgpack_restore(source.read_bytes())
        state_dict = torch_io.read_state_dict(output).state_dict
        variables, _ = converter.torch_to_flax(state_dict, layout, restored['metadata']['variant'],
                                               restored['metadata']['padding'],
                                               restored['metadata']['bn_eps'])
        jax.tree.map(np.testing.assert_array_equal, variables, restored['variables'])
    else:
        assert expected in (None, BAD), err
        assert_refused_cleanly(status, err, folder, {source.name})
    shutil.rmtree(folder)
