"""Specification of the converter command line, `python -m convert`.

Contract: exit 0 when done; 1 when --verify finds the PyTorch and Flax outputs apart (nothing
written); 2 on bad input, with exactly one line `error: ...` on stderr, no traceback and no
output file (neither the default one beside the input, nor -o, nor a leftover temporary file).

The CLI runs in-process through `convert.__main__.main(argv)` (a subprocess costs ~3 s); only the
tests under "the real command" start `python -m convert`. Models are the smallest ones (B0; S
for torchvision, which has nothing smaller) with randomised BatchNorm statistics and affine
parameters whose logits depend on the input, so that a wrong mapping cannot pass by accident.
Each test saves its own input files under its tmp_path, so "nothing written" is checked by
listing that folder before and after.
"""
from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file

import effnetv2_jax
from convert.torch_reference import randomize_
from convert import torch_reference
from effnetv2_jax import layouts
from convert.__main__ import main
from effnetv2_jax import checkpoint
from helpers import SMALL_METADATA, assert_one_line_error, snapshot

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
TV_NUM_CLASSES = 5  # torchvision S gets its own class count, so detection cannot pass by luck
VERIFY_ARGS = ('--verify', '--verify-size', '64')  # small images: XLA's CPU depthwise conv is slow
IMAGENET_MEAN = [0.485, 0.456, 0.406]


# --------------------------------------------------------------------------------------------
# helpers


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`randomize_`, plus a nonzero batch count, and a check that the logits depend on the input
    (otherwise a wrong kernel layout would go unnoticed)."""
    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.num_batches_tracked.fill_(7)
        logits = model(torch.randn(2, 3, 64, 64, generator=gen))
    spread = (logits[0] - logits[1]).abs().max() / logits.abs().max()
    assert spread > 0.05, 'the logits should depend on the input'
    return model


def clone(state_dict: dict) -> dict:
    return {k: v.clone() for k, v in state_dict.items()}


def cli(capsys, *args) -> tuple[int, str, str]:
    """Runs the CLI in-process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob('*')}


def assert_rejected(capsys, path: Path, *args, mentions: tuple[str, ...] = ()) -> str:
    """Exit 2, one `error:` line naming `mentions`, and nothing written beside `path`, both with
    the default output path and with -o. Returns the error line."""
    folder = path.parent
    before = files_under(folder)
    line = ''
    for output_args in ((), ('-o', folder / 'converted.msgpack')):
        rc, out, err = cli(capsys, path, *args, *output_args)
        assert 'Traceback' not in out
        line = assert_one_line_error(err)
        assert rc == 2
        for text in mentions:
            assert text in line
    assert files_under(folder) == before, 'a rejected input must leave no file behind'
    return line


def flax_stem_kernel(path: Path) -> np.ndarray:
    variables, _ = checkpoint.read(path)
    return variables['params']['stem']['conv']['kernel']


def as_flax_kernel(weight: torch.Tensor) -> np.ndarray:
    """OIHW torch conv weight -> HWIO Flax kernel."""
    return weight.numpy().transpose(2, 3, 1, 0)


def assert_same_state_dict(got: dict, expected: dict):
    """Same keys; every float tensor bit-identical; num_batches_tracked equal or 0."""
    assert set(got) == set(expected)
    for key, want in expected.items():
        have = got[key]
        assert have.dtype == want.dtype, key
        if key.endswith('num_batches_tracked'):  # shape: see test_exported_batch_counts_are_...
            assert int(have) in (0, int(want)), key
        else:
            assert have.shape == want.shape, key
            assert np.array_equal(have.numpy(), want.numpy()), key


# --------------------------------------------------------------------------------------------
# source models (built once; tests save their own copies under tmp_path)


@pytest.fixture(scope='module')
def wzmiaomiao_b0():
    return randomize(torch_reference.create('b0', num_classes=NUM_CLASSES), seed=0)


@pytest.fixture(scope='module')
def timm_b0():
    model = timm.create_model('tf_efficientnetv2_b0', pretrained=False, num_classes=NUM_CLASSES)
    return randomize(model, seed=1)


@pytest.fixture(scope='module')
def torchvision_s():
    return randomize(torchvision.models.efficientnet_v2_s(num_classes=TV_NUM_CLASSES), seed=2)


@pytest.fixture
def wzmiaomiao_pth(tmp_path, wzmiaomiao_b0) -> Path:
    path = tmp_path / 'wzmiaomiao_b0.pth'
    torch.save(wzmiaomiao_b0.state_dict(), path)
    return path


class RunsCode:
    """Unpickling this runs a shell command that creates `marker` (if the loader allows it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(str(self.marker))}',)


# --------------------------------------------------------------------------------------------
# bad input: exit 2, one `error:` line, nothing written


@pytest.mark.parametrize('content', [
    pytest.param(np.random.default_rng(0).bytes(4096), id='random-bytes'),
    pytest.param(b'this is not a checkpoint\n' * 40, id='text'),
])
def test_garbage_bytes_are_rejected(capsys, tmp_path, content):
    path = tmp_path / 'garbage.pth'
    path.write_bytes(content)
    assert_rejected(capsys, path, mentions=(str(path),))


def test_garbage_bytes_are_reported_as_unreadable_not_as_a_refused_pickle(capsys, tmp_path):
    path = tmp_path / 'garbage.pth'
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    line = assert_rejected(capsys, path)
    assert 'refused' not in line and 'run code' not in line


def test_truncated_checkpoint_is_rejected(capsys, tmp_path, wzmiaomiao_b0):
    whole = tmp_path / 'whole.pth'
    torch.save(wzmiaomiao_b0.state_dict(), whole)
    data = whole.read_bytes()
    whole.unlink()
    path = tmp_path / 'truncated.pth'
    path.write_bytes(data[:len(data) // 2])
    assert_rejected(capsys, path, mentions=(str(path),))


def test_non_efficientnet_state_dict_is_rejected(capsys, tmp_path):
    path = tmp_path / 'resnet18.pth'
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert_rejected(capsys, path, mentions=('EfficientNetV2',))


def wrong_shape(state_dict, key):
    state_dict[key] = torch.zeros(state_dict[key].shape[0], 7, 1, 1)


def missing(state_dict, key):
    del state_dict[key]


def unexpected(state_dict, key):
    state_dict[key] = torch.zeros(3)


@pytest.mark.parametrize('corrupt, key', [
    (wrong_shape, 'blocks.3.expand_conv.conv.weight'),
    (missing, 'blocks.5.se.conv_reduce.bias'),
    (unexpected, 'blocks.2.extra.weight'),
], ids=['shape-mismatch', 'missing-key', 'unexpected-key'])
def test_a_state_dict_that_does_not_fit_is_rejected_naming_the_key(capsys, tmp_path,
                                                                   wzmiaomiao_b0, corrupt, key):
    state_dict = clone(wzmiaomiao_b0.state_dict())
    corrupt(state_dict, key)
    path = tmp_path / f'{corrupt.__name__}.pth'
    torch.save(state_dict, path)
    assert_rejected(capsys, path, mentions=(key,))


@pytest.mark.parametrize('value', [float('nan'), float('inf')], ids=['nan', 'inf'])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(capsys, tmp_path,
                                                                  wzmiaomiao_b0, value):
    key = 'blocks.6.dwconv.bn.running_var'
    state_dict = clone(wzmiaomiao_b0.state_dict())
    state_dict[key][3] = value
    path = tmp_path / 'nonfinite.pth'
    torch.save(state_dict, path)
    assert 'allow-nonfinite' in assert_rejected(capsys, path, mentions=(key,))


def test_allow_nonfinite_converts_weights_holding_nan(capsys, tmp_path, wzmiaomiao_b0):
    key = 'blocks.6.dwconv.bn.running_var'
    state_dict = clone(wzmiaomiao_b0.state_dict())
    state_dict[key][3] = float('nan')
    path = tmp_path / 'nonfinite.pth'
    torch.save(state_dict, path)
    assert cli(capsys, path, '--allow-nonfinite')[0] == 0
    variables, _ = checkpoint.read(path.with_suffix('.msgpack'))
    assert np.isnan(variables['batch_stats']['blocks_6']['dwconv']['bn']['var'][3])


def test_to_torch_refuses_flax_weights_holding_inf(capsys, tmp_path, wzmiaomiao_pth):
    assert cli(capsys, wzmiaomiao_pth, '-o', tmp_path / 'flax.msgpack')[0] == 0
    variables, metadata = checkpoint.read(tmp_path / 'flax.msgpack')
    kernel = variables['params']['stem']['conv']['kernel'].copy()
    kernel[0, 0, 0, 0] = np.inf
    variables['params']['stem']['conv']['kernel'] = kernel
    effnetv2_jax.save(tmp_path / 'inf.msgpack', variables, metadata)
    rc, _, err = cli(capsys, '--to-torch', tmp_path / 'inf.msgpack', '--layout', 'wzmiaomiao',
                     '-o', tmp_path / 'back.pth')
    assert rc == 2
    assert 'stem.conv.weight' in assert_one_line_error(err)
    assert not (tmp_path / 'back.pth').exists()


def test_pickle_that_would_run_code_is_refused_without_running_it(capsys, tmp_path):
    marker = tmp_path / 'MARKER_code_ran'
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:  # a plain pickle file (torch's legacy, non-zip format)
        pickle.dump({'state_dict': RunsCode(marker)}, f)
    with warnings.catch_warnings():  # torch's protocol warning on stderr: see the command test
        warnings.filterwarnings('ignore', message='Detected pickle protocol')
        line = assert_rejected(capsys, path)
    assert not marker.exists(), 'loading the checkpoint ran code'
    assert 'refused' in line


def test_nonexistent_input_is_rejected(capsys, tmp_path):
    assert_rejected(capsys, tmp_path / 'missing.pth', mentions=('missing.pth',))


@pytest.mark.parametrize('corruption', ['garbage-header', 'truncated'])
def test_corrupt_safetensors_is_rejected(capsys, tmp_path, wzmiaomiao_b0, corruption):
    path = tmp_path / 'corrupt.safetensors'
    if corruption == 'garbage-header':
        path.write_bytes(b'\x20\x00\x00\x00\x00\x00\x00\x00{"stem.conv.weight": nonsense}  ')
    else:
        save_file(wzmiaomiao_b0.state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    assert_rejected(capsys, path, mentions=(str(path),))


@pytest.mark.parametrize('wrapped', [False, True], ids=['bare-state-dict', 'state_dict-entry'])
def test_ema_flag_on_checkpoint_without_ema_weights_is_rejected(capsys, tmp_path, wzmiaomiao_b0,
                                                                 wrapped):
    path = tmp_path / 'no_ema.pth'
    state_dict = wzmiaomiao_b0.state_dict()
    torch.save({'state_dict': state_dict, 'epoch': 3} if wrapped else state_dict, path)
    line = assert_rejected(capsys, path, '--ema')
    assert 'EMA' in line or '--ema' in line


def test_unknown_variant_is_rejected(capsys, wzmiaomiao_pth):
    assert_rejected(capsys, wzmiaomiao_pth, '--variant', 'b9', mentions=('b9',))


def test_to_torch_rejects_a_file_the_converter_did_not_write(capsys, wzmiaomiao_pth):
    before = files_under(wzmiaomiao_pth.parent)
    rc, _, err = cli(capsys, '--to-torch', wzmiaomiao_pth, '--layout', 'wzmiaomiao',
                     '-o', wzmiaomiao_pth.parent / 'back.pth')
    assert_one_line_error(err)
    assert rc == 2
    assert files_under(wzmiaomiao_pth.parent) == before


# --------------------------------------------------------------------------------------------
# unwrapping: which tensors of the checkpoint become the Flax weights


@pytest.mark.parametrize('entry', ['model', 'state_dict'])
def test_state_dict_inside_a_training_checkpoint_is_unwrapped(capsys, tmp_path, wzmiaomiao_b0, entry):
    path = tmp_path / 'train.pth'
    state_dict = wzmiaomiao_b0.state_dict()
    torch.save({entry: state_dict, 'epoch': 3, 'optimizer': {'lr': 0.1}}, path)
    rc, _, _ = cli(capsys, path)
    assert rc == 0
    np.testing.assert_array_equal(flax_stem_kernel(path.with_suffix('.msgpack')),
                                  as_flax_kernel(state_dict['stem.conv.weight']))


@pytest.fixture
def checkpoint_with_ema(tmp_path, wzmiaomiao_b0):
    """{'state_dict': sd, 'state_dict_ema': ema} where every EMA tensor differs from sd's."""
    state_dict = wzmiaomiao_b0.state_dict()
    ema = {k: v + 0.25 if v.is_floating_point() else v for k, v in state_dict.items()}
    path = tmp_path / 'with_ema.pth'
    torch.save({'state_dict': state_dict, 'state_dict_ema': ema, 'epoch': 3}, path)
    return path, state_dict, ema


@pytest.mark.parametrize('flags, taken', [((), 'model'), (('--ema',), 'ema')],
                         ids=['without-ema-flag-model-weights', 'with-ema-flag-ema-weights'])
def test_ema_flag_picks_which_weights_are_taken(capsys, checkpoint_with_ema, flags, taken):
    path, state_dict, ema = checkpoint_with_ema
    expected = {'model': state_dict, 'ema': ema}[taken]
    rc, _, _ = cli(capsys, path, *flags)
    assert rc == 0
    variables, _ = checkpoint.read(path.with_suffix('.msgpack'))
    np.testing.assert_array_equal(variables['params']['stem']['conv']['kernel'],
                                  as_flax_kernel(expected['stem.conv.weight']))
    np.testing.assert_array_equal(variables['batch_stats']['stem']['bn']['mean'],
                                  expected['stem.bn.running_mean'].numpy())


def test_summary_mentions_unused_ema_weights(capsys, checkpoint_with_ema):
    path, _, _ = checkpoint_with_ema
    rc, out, _ = cli(capsys, path)
    assert rc == 0
    assert 'EMA' in out and '--ema' in out


def test_data_parallel_module_prefix_is_stripped(capsys, tmp_path, wzmiaomiao_b0):
    state_dict = wzmiaomiao_b0.state_dict()
    path = tmp_path / 'ddp.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, path)
    rc, _, _ = cli(capsys, path)
    assert rc == 0
    np.testing.assert_array_equal(flax_stem_kernel(path.with_suffix('.msgpack')),
                                  as_flax_kernel(state_dict['stem.conv.weight']))


def test_safetensors_input_is_converted(capsys, tmp_path, timm_b0):
    state_dict = timm_b0.state_dict()
    path = tmp_path / 'tf_efficientnetv2_b0.safetensors'
    save_file(state_dict, path)
    rc, _, _ = cli(capsys, path)
    assert rc == 0
    np.testing.assert_array_equal(flax_stem_kernel(path.with_suffix('.msgpack')),
                                  as_flax_kernel(state_dict['conv_stem.weight']))


# --------------------------------------------------------------------------------------------
# detection and metadata


@pytest.mark.parametrize('layout', ['wzmiaomiao', 'timm', 'torchvision'])
def test_layout_variant_classes_and_preprocessing_are_detected(capsys, tmp_path, request, layout):
    model, variant, num_classes, padding, preprocessing = {
        'wzmiaomiao': ('wzmiaomiao_b0', 'b0', NUM_CLASSES, 'symmetric', {'size': 224}),
        'timm': ('timm_b0', 'b0', NUM_CLASSES, 'same', {
            'size': 224, 'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_MEAN}),
        'torchvision': ('torchvision_s', 's', TV_NUM_CLASSES, 'symmetric', {
            'size': 384, 'interpolation': 'bilinear', 'mean': IMAGENET_MEAN}),
    }[layout]
    path = tmp_path / f'{layout}.pth'
    torch.save(request.getfixturevalue(model).state_dict(), path)
    rc, _, _ = cli(capsys, path)
    assert rc == 0
    _, metadata = checkpoint.read(path.with_suffix('.msgpack'))
    assert metadata['source_layout'] == layout
    assert metadata['variant'] == variant
    assert metadata['num_classes'] == num_classes
    assert metadata['padding'] == padding
    assert metadata['bn_eps'] == pytest.approx(1e-3)
    for key, value in preprocessing.items():
        assert metadata['preprocessing'][key] == pytest.approx(value), key


def test_padding_and_bn_eps_flags_override_the_defaults(capsys, tmp_path, timm_b0):
    path = tmp_path / 'timm.pth'
    torch.save(timm_b0.state_dict(), path)
    rc, _, _ = cli(capsys, path, '--padding', 'symmetric', '--bn-eps', '1e-5')
    assert rc == 0
    _, metadata = checkpoint.read(path.with_suffix('.msgpack'))
    assert metadata['padding'] == 'symmetric'
    assert metadata['bn_eps'] == pytest.approx(1e-5)
    model, _ = effnetv2_jax.load(path.with_suffix('.msgpack'))
    assert (model.padding, model.bn_eps) == ('symmetric', pytest.approx(1e-5))


def test_summary_names_layout_variant_classes_and_parameter_count(capsys, tmp_path, timm_b0):
    path = tmp_path / 'timm.pth'
    torch.save(timm_b0.state_dict(), path)
    rc, out, _ = cli(capsys, path)
    assert rc == 0
    num_params = sum(p.numel() for p in timm_b0.parameters())
    for text in ('timm layout', 'EfficientNetV2-B0', f'{NUM_CLASSES} classes',
                 f'{num_params:,} parameters'):
        assert text in out


# --------------------------------------------------------------------------------------------
# round trips and cross-layout export


def to_flax_and_back(capsys, tmp_path, state_dict, layout: str) -> dict:
    """`state_dict` converted to Flax, then exported in `layout`; the state_dict read back."""
    path = tmp_path / 'source.pth'
    torch.save(state_dict, path)
    assert cli(capsys, path, '-o', tmp_path / 'flax.msgpack')[0] == 0
    rc, _, _ = cli(capsys, '--to-torch', tmp_path / 'flax.msgpack', '--layout', layout,
                   '-o', tmp_path / 'back.pth')
    assert rc == 0
    return torch.load(tmp_path / 'back.pth', weights_only=True)


@pytest.mark.parametrize('layout, fixture', [
    ('wzmiaomiao', 'wzmiaomiao_b0'), ('seed', 'wzmiaomiao_b0'), ('timm', 'timm_b0'),
    ('torchvision', 'torchvision_s')])
def test_torch_to_flax_to_torch_is_bit_exact(capsys, tmp_path, request, layout, fixture):
    state_dict = request.getfixturevalue(fixture).state_dict()
    assert_same_state_dict(to_flax_and_back(capsys, tmp_path, state_dict, layout), state_dict)


def test_exported_batch_counts_are_scalars_like_torchs(capsys, tmp_path, wzmiaomiao_b0):
    back = to_flax_and_back(capsys, tmp_path, wzmiaomiao_b0.state_dict(), 'wzmiaomiao')
    assert back['stem.bn.num_batches_tracked'].shape == torch.Size([])


def test_timm_weights_exported_in_wzmiaomiao_layout_give_the_timm_logits(capsys, tmp_path,
                                                                         timm_b0):
    reference = torch_reference.create('b0', NUM_CLASSES, padding='same')
    reference.load_state_dict(
        to_flax_and_back(capsys, tmp_path, timm_b0.state_dict(), 'wzmiaomiao'), strict=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = timm_b0.eval()(images).numpy()
        got = reference.eval()(images).numpy()
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------------
# output formats


def test_orbax_output_loads_the_same_variables_as_msgpack(capsys, wzmiaomiao_pth):
    assert cli(capsys, wzmiaomiao_pth, '--format', 'orbax')[0] == 0
    assert cli(capsys, wzmiaomiao_pth, '--format', 'msgpack')[0] == 0
    orbax_dir, msgpack_file = wzmiaomiao_pth.with_suffix('.orbax'), wzmiaomiao_pth.with_suffix('.msgpack')
    assert orbax_dir.is_dir()
    model_o, variables_o = effnetv2_jax.load(orbax_dir)
    model_m, variables_m = effnetv2_jax.load(msgpack_file)
    assert jax.tree.structure(variables_o) == jax.tree.structure(variables_m)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables_o, variables_m)))
    assert checkpoint.read(orbax_dir)[1] == checkpoint.read(msgpack_file)[1]
    assert (model_o.variant, model_o.num_classes) == (model_m.variant, model_m.num_classes)


# --------------------------------------------------------------------------------------------
# --verify


def test_verify_passes_on_a_correct_conversion(capsys, wzmiaomiao_pth):
    rc, out, _ = cli(capsys, wzmiaomiao_pth, *VERIFY_ARGS)
    assert rc == 0
    assert 'OK' in out
    assert wzmiaomiao_pth.with_suffix('.msgpack').is_file()


def test_verify_fails_with_exit_1_and_writes_nothing_when_the_mapping_is_wrong(
        capsys, monkeypatch, wzmiaomiao_pth):
    correct = layouts.torch_to_flax_array

    def kernel_with_height_and_width_swapped(array, axes):  # a plausible porting bug
        if axes == layouts.CONV_AXES:
            return np.ascontiguousarray(array.transpose(3, 2, 1, 0))
        return correct(array, axes)
    monkeypatch.setattr(layouts, 'torch_to_flax_array', kernel_with_height_and_width_swapped)
    before = files_under(wzmiaomiao_pth.parent)
    rc, out, err = cli(capsys, wzmiaomiao_pth, *VERIFY_ARGS)
    assert rc == 1
    assert 'FAILED' in out
    assert_one_line_error(err)
    assert files_under(wzmiaomiao_pth.parent) == before


def test_verify_fails_on_a_wzmiaomiao_checkpoint_converted_with_the_wrong_padding(capsys, wzmiaomiao_pth):
    before = files_under(wzmiaomiao_pth.parent)
    rc, _, _ = cli(capsys, wzmiaomiao_pth, '--padding', 'same', *VERIFY_ARGS)
    assert rc == 1
    assert files_under(wzmiaomiao_pth.parent) == before


# --------------------------------------------------------------------------------------------
# --to-torch: what its file says, and what it may replace


@pytest.fixture
def small_weights(tmp_path, small_variables) -> Path:
    """Flax weights of B0 (3 classes) that came from the wzmiaomiao layout."""
    path = tmp_path / 'small.msgpack'
    effnetv2_jax.save(path, small_variables, {**SMALL_METADATA, 'source_layout': 'wzmiaomiao'})
    return path


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_to_torch_output_says_what_it_holds(capsys, tmp_path, small_weights, suffix):
    output = tmp_path / f'back{suffix}'
    assert cli(capsys, '--to-torch', small_weights, '--layout', 'timm', '-o', output)[0] == 0
    if suffix == '.safetensors':
        with safe_open(str(output), 'np') as f:
            marks = f.metadata()
    else:
        marks = torch.load(output, weights_only=True)._metadata['']
    assert marks == {'producer': 'effnetv2-jax', 'written_by': 'convert --to-torch',
                     'layout': 'timm', 'variant': 'b0', 'padding': 'symmetric', 'bn_eps': '0.001'}


def test_to_torch_writes_the_layout_the_weights_came_from_without_layout(capsys, tmp_path,
                                                                        small_weights):
    assert cli(capsys, '--to-torch', small_weights, '-o', tmp_path / 'back.pth')[0] == 0
    assert 'stem.conv.weight' in torch.load(tmp_path / 'back.pth', weights_only=True)


def test_to_torch_without_layout_is_refused_for_weights_that_do_not_say_theirs(
        capsys, tmp_path, small_variables):
    weights = tmp_path / 'trained.msgpack'
    effnetv2_jax.save(weights, small_variables, SMALL_METADATA)
    before = files_under(tmp_path)
    rc, _, err = cli(capsys, '--to-torch', weights, '-o', tmp_path / 'back.pth')
    assert rc == 2
    assert '--layout wzmiaomiao|torchvision|timm' in assert_one_line_error(err)
    assert files_under(tmp_path) == before


def test_to_torch_refuses_the_weights_of_a_save_pretrained_folder(capsys, tmp_path, small_weights,
                                                                  small_variables):
    folder = tmp_path / 'hub'
    effnetv2_jax.save_pretrained(folder, small_variables, SMALL_METADATA)
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, '--to-torch', small_weights, '--layout', 'wzmiaomiao',
                     '-o', folder / 'model.safetensors')
    assert rc == 2
    assert 'not a PyTorch file written by python -m convert --to-torch' in (
        assert_one_line_error(err))
    assert snapshot(tmp_path) == before
    checkpoint.read(f'local-dir:{folder}')  # still loads


def test_to_torch_does_not_replace_a_file_of_an_earlier_release(capsys, tmp_path, small_weights,
                                                                wzmiaomiao_b0):
    # Before writers were told apart, --to-torch and save_pretrained marked their files alike:
    # such a file may be a save_pretrained folder's weights.
    output = tmp_path / 'model.safetensors'
    save_file(wzmiaomiao_b0.state_dict(), output, metadata={'producer': 'effnetv2-jax'})
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, '--to-torch', small_weights, '--layout', 'wzmiaomiao', '-o', output)
    assert rc == 2
    assert_one_line_error(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('output', [('--save-pretrained', 'hub'), ('-o', 'hub/model.msgpack')],
                         ids=['save-pretrained-the-folder', 'output-inside-the-folder'])
def test_a_local_dir_input_is_no_output(capsys, tmp_path, small_variables, output):
    folder = tmp_path / 'hub'
    effnetv2_jax.save_pretrained(folder, small_variables, SMALL_METADATA)
    before = snapshot(tmp_path)
    flag, path = output
    rc, _, err = cli(capsys, f'local-dir:{folder}', flag, tmp_path / path)
    assert rc == 2
    assert 'the input local-dir:' in assert_one_line_error(err)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# the real command


def run_command(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'convert', *map(str, args)], cwd=cwd,
                          env={**os.environ, 'PYTHONPATH': str(REPO)}, capture_output=True,
                          text=True, timeout=300)


def test_command_converts_a_checkpoint_end_to_end(wzmiaomiao_pth):
    result = run_command(wzmiaomiao_pth.name, cwd=wzmiaomiao_pth.parent)
    assert result.returncode == 0, result.stderr
    assert 'EfficientNetV2-B0, wzmiaomiao layout' in result.stdout
    model, variables = effnetv2_jax.load(wzmiaomiao_pth.with_suffix('.msgpack'))
    assert model.num_classes == NUM_CLASSES
    np.testing.assert_array_equal(
        variables['params']['classifier']['bias'],
        torch.load(wzmiaomiao_pth, weights_only=True)['head.classifier.bias'].numpy())


def test_command_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / 'MARKER_code_ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': RunsCode(marker)}, path)  # torch's zip format
    before = files_under(tmp_path)
    result = run_command(path, '-o', tmp_path / 'out.msgpack', cwd=tmp_path)
    assert not marker.exists(), 'loading the checkpoint ran code'
    assert result.returncode == 2
    assert 'refused' in assert_one_line_error(result.stderr)
    assert files_under(tmp_path) == before


def test_command_prints_one_line_for_a_refused_plain_pickle(tmp_path):
    marker = tmp_path / 'MARKER_code_ran'
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': RunsCode(marker)}, f)
    result = run_command(path, cwd=tmp_path)
    assert not marker.exists(), 'loading the checkpoint ran code'
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
