"""Specification of what the converter does when the tensors alone cannot say how to read them.

timm's `tf_efficientnetv2_s` (TensorFlow's 'same' padding, BN eps 1e-3) and `efficientnetv2_s`
(symmetric padding, eps 1e-5) have the same keys and shapes, as do its M, L and XL: converted
with the wrong family the weights give other logits, and `--verify`, running the model it
assumed, would agree with itself. So the family comes from what the file says (a timm training
checkpoint's `arch` and `args`, a --to-torch file's metadata) or from `--padding`; where nothing
says, the conversion is refused: exit 2, one line naming both models and the flag, nothing
written. A file that says something its tensors contradict is refused the same way. Variants
that timm has in one family only (B0-B3: tf_; rw_t, rw_s, rw_m: its own) need no flag.

Models are timm's with 3 classes and random weights; logits are compared at 64 px, to
`helpers.LOGIT_RTOL` (1e-5 of max |logit|, same top-1): float32 sums in another order differ by
~1e-6, the other family's padding or eps by 1e-2 or more.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import effnetv2_jax
from convert import torch_io
from effnetv2_jax import converter
from convert.__main__ import main
from convert.torch_io import CheckpointError
from convert.torch_reference import randomize_
from effnetv2_jax import checkpoint
from helpers import assert_logits_close, assert_one_line_error, jitted_apply, noise, torch_logits

AMBIGUOUS_S = ("timm's tf_efficientnetv2_s ('same' padding, BN eps 1e-3) and efficientnetv2_s "
               '(symmetric padding, BN eps 1e-5) have the same tensors; say which with '
               '--padding same or --padding symmetric')


@pytest.fixture(scope='module')
def timm_s() -> torch.nn.Module:
    """timm's efficientnetv2_s (symmetric, eps 1e-5), 3 classes, random weights and BN stats."""
    return randomize_(timm.create_model('efficientnetv2_s', num_classes=3), seed=0,
                      calibration_size=64).eval()


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def convert(capsys, path, *flags) -> dict:
    """The metadata of `path` converted with `flags` (which must succeed)."""
    output = path.with_name(f'{path.stem}-converted.msgpack')
    rc, _, err = cli(capsys, path, '-o', output, *flags)
    assert rc == 0, err
    return checkpoint.read(output)[1]


def assert_refused(capsys, path, *flags) -> str:
    """Exit 2, one `error:` line (returned), nothing written."""
    before = sorted(path.parent.iterdir())
    rc, _, err = cli(capsys, path, '-o', path.with_suffix('.msgpack'), *flags)
    line = assert_one_line_error(err)
    assert rc == 2
    assert sorted(path.parent.iterdir()) == before
    return line


def training_checkpoint(path, state_dict, **entries):
    torch.save({'epoch': 3, 'state_dict': state_dict, **entries}, path)
    return path


# --- nothing says which: refused --------------------------------------------------------------

def test_a_bare_timm_s_state_dict_is_refused_naming_both_models_and_the_flag(capsys, tmp_path,
                                                                             timm_s):
    path = tmp_path / 'ckpt.pth'
    torch.save(timm_s.state_dict(), path)
    assert assert_refused(capsys, path) == f'error: {path}: {AMBIGUOUS_S}'


def test_the_library_refuses_it_too(timm_s):
    state_dict = torch_io.to_numpy(timm_s.state_dict())
    with pytest.raises(CheckpointError, match='have the same tensors'):
        converter.torch_to_flax(state_dict)


def test_timms_class_name_as_arch_says_nothing(capsys, tmp_path, timm_s):
    # timm's train.py saves type(model).__name__.lower() as `arch` when it has no args
    path = training_checkpoint(tmp_path / 'ckpt.pth', timm_s.state_dict(), arch='efficientnet')
    assert AMBIGUOUS_S in assert_refused(capsys, path)


# --- a flag says which -------------------------------------------------------------------------

@pytest.mark.parametrize('padding, bn_eps', [('symmetric', 1e-5), ('same', 1e-3)])
def test_the_padding_flag_picks_the_family_and_its_eps(capsys, tmp_path, timm_s, padding, bn_eps):
    path = tmp_path / 'ckpt.pth'
    torch.save(timm_s.state_dict(), path)
    metadata = convert(capsys, path, '--padding', padding)
    assert (metadata['padding'], metadata['bn_eps']) == (padding, bn_eps)


@pytest.mark.parametrize('name, padding, bn_eps', [('efficientnetv2_s', 'symmetric', 1e-5),
                                                   ('tf_efficientnetv2_s', 'same', 1e-3)])
def test_a_model_name_as_variant_picks_the_family(capsys, tmp_path, timm_s, name, padding,
                                                  bn_eps):
    path = tmp_path / 'ckpt.pth'
    torch.save(timm_s.state_dict(), path)
    metadata = convert(capsys, path, '--variant', name)
    assert (metadata['padding'], metadata['bn_eps']) == (padding, bn_eps)


def test_padding_symmetric_gives_timms_efficientnetv2_s_logits(capsys, tmp_path, timm_s):
    path = tmp_path / 'ckpt.pth'
    torch.save(timm_s.state_dict(), path)
    output = tmp_path / 'flax.msgpack'
    assert cli(capsys, path, '--padding', 'symmetric', '-o', output)[0] == 0
    model, variables = effnetv2_jax.load(output)
    images = noise(64)
    assert_logits_close(np.asarray(jitted_apply(model)(variables, images)),
                        torch_logits(timm_s, images))


# --- the file says which -----------------------------------------------------------------------

@pytest.mark.parametrize('arch, padding, bn_eps', [('efficientnetv2_s', 'symmetric', 1e-5),
                                                   ('tf_efficientnetv2_s', 'same', 1e-3)])
def test_a_timm_training_checkpoint_converts_as_its_arch_says(capsys, tmp_path, timm_s, arch,
                                                              padding, bn_eps):
    path = training_checkpoint(tmp_path / 'ckpt.pth', timm_s.state_dict(), arch=arch)
    metadata = convert(capsys, path)
    assert (metadata['padding'], metadata['bn_eps']) == (padding, bn_eps)


def test_timms_train_args_are_read_model_and_bn_eps(capsys, tmp_path, timm_s):
    # What timm's train.py saves: `arch` and its flags as an argparse.Namespace.
    args = argparse.Namespace(model='efficientnetv2_s', bn_eps=1e-4, gp=None, model_kwargs={},
                              lr=0.1, mean=None, device='cuda')
    path = training_checkpoint(tmp_path / 'ckpt.pth', timm_s.state_dict(),
                               arch='efficientnetv2_s', args=args)
    metadata = convert(capsys, path)
    assert (metadata['padding'], metadata['bn_eps']) == ('symmetric', 1e-4)


@pytest.mark.parametrize('arch', ['efficientnetv2_rw_s', 'efficientnetv2_m', 'resnet50',
                                  'efficientnet_v2_s'])
def test_an_arch_that_the_tensors_contradict_is_refused(capsys, tmp_path, timm_s, arch):
    path = training_checkpoint(tmp_path / 'ckpt.pth', timm_s.state_dict(), arch=arch)
    line = assert_refused(capsys, path)
    assert f"the checkpoint's arch is {arch!r}, but the tensors are timm's tf_efficientnetv2_s " \
           'or efficientnetv2_s' in line


def test_train_args_that_change_the_network_are_refused(capsys, tmp_path, timm_s):
    args = argparse.Namespace(model='efficientnetv2_s', bn_eps=None, gp='max', model_kwargs={})
    path = training_checkpoint(tmp_path / 'ckpt.pth', timm_s.state_dict(), args=args)
    assert "global_pool='max'" in assert_refused(capsys, path)


def test_a_timm_export_converts_back_without_flags(capsys, tmp_path, timm_s):
    path = tmp_path / 'ckpt.pth'
    torch.save(timm_s.state_dict(), path)
    assert cli(capsys, path, '--padding', 'symmetric', '-o', tmp_path / 's.msgpack')[0] == 0
    assert cli(capsys, '--to-torch', tmp_path / 's.msgpack', '-o', tmp_path / 's.pth')[0] == 0
    metadata = convert(capsys, tmp_path / 's.pth')
    assert (metadata['padding'], metadata['bn_eps']) == ('symmetric', 1e-5)


def test_an_export_whose_metadata_contradicts_its_tensors_is_refused(capsys, tmp_path, timm_s):
    path = tmp_path / 'ckpt.pth'
    torch.save(timm_s.state_dict(), path)
    assert cli(capsys, path, '--padding', 'same', '-o', tmp_path / 's.msgpack')[0] == 0
    export = tmp_path / 's.safetensors'
    assert cli(capsys, '--to-torch', tmp_path / 's.msgpack', '-o', export)[0] == 0
    with safe_open(str(export), 'pt') as f:
        marks = f.metadata()
    save_file(load_file(export), export, metadata={**marks, 'variant': 'm'})
    assert ('says EfficientNetV2-M, but the tensors are EfficientNetV2-S'
            in assert_refused(capsys, export))


# --- one family only: no flag needed -----------------------------------------------------------

@pytest.mark.parametrize('name, padding, bn_eps', [('efficientnetv2_rw_t', 'symmetric', 1e-5),
                                                   ('tf_efficientnetv2_b0', 'same', 1e-3)])
def test_a_variant_timm_has_in_one_family_converts_without_flags(capsys, tmp_path, name,
                                                                 padding, bn_eps):
    path = tmp_path / 'ckpt.pth'
    torch.save(timm.create_model(name, num_classes=3).state_dict(), path)
    metadata = convert(capsys, path)
    assert (metadata['padding'], metadata['bn_eps']) == (padding, bn_eps)


# --- --verify says what it assumed -------------------------------------------------------------

@pytest.mark.parametrize('entries, why', [
    ({}, 'the only timm model with these tensors'),
    ({'arch': 'tf_efficientnetv2_b0'}, "from the checkpoint's arch")])
def test_verify_prints_what_it_assumed_and_why(capsys, tmp_path, entries, why):
    model = randomize_(timm.create_model('tf_efficientnetv2_b0', num_classes=3), seed=1,
                       calibration_size=64)
    path = tmp_path / 'ckpt.pth'
    if entries:
        training_checkpoint(path, model.state_dict(), **entries)
    else:
        torch.save(model.state_dict(), path)
    rc, out, _ = cli(capsys, path, '--verify', '--verify-size', '64')
    assert rc == 0
    assert (f"verify: assumed timm tf_efficientnetv2_b0: 'same' padding, BN eps 1e-3 ({why})"
            in out.splitlines())
