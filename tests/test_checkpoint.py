"""Specification of the weights file's strictness (effnetv2_jax/checkpoint.py): `read` and `save`
accept exactly the variables of the model the metadata describes (every leaf, shape and dtype)
and valid metadata, else one ValueError line naming the first mismatches."""
from __future__ import annotations

import copy

import jax
import numpy as np
import pytest

import effnetv2_jax
from effnetv2_jax import checkpoint
from helpers import SMALL_METADATA, write_unchecked_weights




def changed(small_variables, change):
    tree = copy.deepcopy(jax.tree.map(np.asarray, small_variables))
    change(tree)
    return tree


def drop_stem_bias(v):
    del v['params']['stem']['bn']['bias']


def add_extra_leaf(v):
    v['params']['stem']['extra'] = np.zeros(3, np.float32)


def reshape_head(v):
    v['params']['classifier']['kernel'] = np.zeros((1280, 10), np.float32)


def float64_mean(v):
    stats = v['batch_stats']['stem']['bn']
    stats['mean'] = stats['mean'].astype(np.float64)


@pytest.mark.parametrize('change, message', [
    (drop_stem_bias, 'missing params/stem/bn/bias'),
    (add_extra_leaf, 'unexpected params/stem/extra'),
    (reshape_head, 'params/classifier/kernel is float32[1280, 10], expected float32[1280, 3]'),
    (float64_mean, 'batch_stats/stem/bn/mean is float64[32], expected float32[32]'),
], ids=['missing', 'unexpected', 'shape', 'dtype'])
def test_read_names_the_leaf_that_does_not_fit_the_model(tmp_path, small_variables, change,
                                                         message):
    path = tmp_path / 'w.msgpack'
    write_unchecked_weights(path, changed(small_variables, change), SMALL_METADATA)
    with pytest.raises(ValueError, match='not a valid effnetv2-jax weights file') as error:
        checkpoint.read(path)
    assert message in str(error.value)
    assert 'EfficientNetV2-B0 (3 classes)' in str(error.value)
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('change, message', [
    ({'variant': 'b9'}, 'b9'),
    ({'variant': 7}, 'not a name'),
    ({'num_classes': -1}, 'num_classes -1'),
    ({'num_classes': True}, 'num_classes True'),
    ({'padding': 'reflect'}, "padding 'reflect'"),
    ({'bn_eps': 0}, 'bn_eps 0'),
    ({'bn_eps': 'small'}, "bn_eps 'small'"),
    ({'preprocessing': [224]}, 'preprocessing is a list'),
    ({'preprocessing': {'size': 'big', 'resize': 'shorter', 'crop_pct': 1.0,
                        'interpolation': 'bicubic', 'mean': [0, 0, 0], 'std': [1, 1, 1]}},
     "size must be an integer from 1 to 4096 (pixels), got 'big'"),
    ({'preprocessing': {'size': 10**9}}, 'size must be an integer from 1 to 4096'),
    ({'preprocessing': {'std': [0.5, 0.5, 0]}}, 'std must be 3 finite numbers > 0'),
    ({'class_names': ['a', 'b']}, 'class_names is not a list of 3 names'),
], ids=['unknown-variant', 'variant-number', 'negative-classes', 'bool-classes', 'padding',
        'eps-0', 'eps-text', 'preprocessing-list', 'preprocessing-size',
        'partial-preprocessing-size', 'partial-preprocessing-std', 'class-names'])
def test_read_refuses_invalid_metadata(tmp_path, small_variables, change, message):
    path = tmp_path / 'w.msgpack'
    write_unchecked_weights(path, small_variables, {**SMALL_METADATA, **change})
    with pytest.raises(ValueError, match='not a valid effnetv2-jax weights file') as error:
        checkpoint.read(path)
    assert message in str(error.value)


def test_read_refuses_metadata_of_another_class_count_than_the_head(tmp_path, small_variables):
    path = tmp_path / 'w.msgpack'
    write_unchecked_weights(path, small_variables, {**SMALL_METADATA, 'num_classes': 1000})
    with pytest.raises(ValueError, match=r'params/classifier/kernel is float32\[1280, 3\], '
                                         r'expected float32\[1280, 1000\]'):
        checkpoint.read(path)


def test_save_refuses_variables_that_do_not_fit_the_metadata(tmp_path, small_variables):
    with pytest.raises(ValueError, match='missing params/stem/bn/bias'):
        effnetv2_jax.save(tmp_path / 'w.msgpack', changed(small_variables, drop_stem_bias),
                          SMALL_METADATA)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such file'):
        checkpoint.read(tmp_path / 'absent.msgpack')


def test_an_orbax_folder_without_metadata_is_not_valid(tmp_path, small_variables):
    effnetv2_jax.save(tmp_path / 'w.orbax', small_variables, SMALL_METADATA, fmt='orbax')
    (tmp_path / 'w.orbax' / 'metadata.json').unlink()
    with pytest.raises(ValueError, match='not a valid effnetv2-jax weights file: it has no '
                                         'metadata.json'):
        checkpoint.read(tmp_path / 'w.orbax')
