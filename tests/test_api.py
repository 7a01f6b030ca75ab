"""The public API's shared pieces: `checkpoint.model_metadata`, the inverse of `build_model`;
`checkpoint.fit_classifier`, the fresh head that `load` and `nnx.load` give another
`num_classes`; `save_pretrained` taking its arguments in `save`'s order (path first), the former
order deprecated."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import safetensors.numpy

import effnetv2_jax
from effnetv2_jax import checkpoint, create_model
from helpers import SMALL_METADATA, snapshot


def test_model_metadata_is_what_build_model_turns_back_into_the_model():
    model = create_model('b0', num_classes=3, padding='same', bn_eps=1e-5)
    metadata = checkpoint.model_metadata(model)
    assert metadata == {'variant': 'b0', 'num_classes': 3, 'padding': 'same', 'bn_eps': 1e-5}
    assert checkpoint.build_model(metadata) == model


def test_model_metadata_adds_extras_after_the_model_keys():
    model = checkpoint.build_model(SMALL_METADATA)
    metadata = checkpoint.model_metadata(model, class_names=['a', 'b', 'c'])
    assert list(metadata) == [*checkpoint.MODEL_KEYS, 'class_names']


def test_model_metadata_keeps_the_models_keys_over_extras():
    model = checkpoint.build_model(SMALL_METADATA)
    stale = {**SMALL_METADATA, 'num_classes': 1000, 'variant': 's'}
    assert checkpoint.model_metadata(model, **stale) == SMALL_METADATA


def test_load_with_other_num_classes_gives_a_model_that_applies(tmp_path, small_variables):
    effnetv2_jax.save(tmp_path / 'w.msgpack', small_variables, SMALL_METADATA)
    model, variables = effnetv2_jax.load(tmp_path / 'w.msgpack', num_classes=5)
    logits = model.apply(variables, np.zeros((1, 32, 32, 3), np.float32), train=False)
    assert logits.shape == (1, 5)
    saved = {k: v for k, v in small_variables['params'].items() if k != 'classifier'}
    kept = {k: v for k, v in variables['params'].items() if k != 'classifier'}
    jax.tree.map(np.testing.assert_array_equal, kept, saved)
    jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'],
                 small_variables['batch_stats'])


def test_fit_classifier_makes_the_head_that_init_makes(small_variables):
    model = checkpoint.build_model({**SMALL_METADATA, 'num_classes': 5})
    fitted = checkpoint.fit_classifier(model, small_variables, jax.random.key(7))
    fresh = model.init(jax.random.key(7), np.zeros((1, 32, 32, 3), np.float32), train=False)
    # Equal to the last bit but for XLA's rounding: jitted or not, the normal draw differs by 1 ulp.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                 fitted['params']['classifier'], fresh['params']['classifier'])


def test_fit_classifier_drops_the_head_for_no_classes(small_variables):
    model = checkpoint.build_model({**SMALL_METADATA, 'num_classes': 0})
    assert 'classifier' not in checkpoint.fit_classifier(model, small_variables, None)['params']
    assert 'classifier' in small_variables['params']  # the input is not changed


def test_fit_classifier_keeps_a_head_that_fits(small_variables):
    model = checkpoint.build_model(SMALL_METADATA)
    assert checkpoint.fit_classifier(model, small_variables, None) is small_variables


def test_nnx_load_with_other_num_classes_keeps_the_backbone_and_drops_the_class_names(
        tmp_path, small_variables):
    from effnetv2_jax import nnx as effnet_nnx
    metadata = {**SMALL_METADATA, 'class_names': ['a', 'b', 'c']}
    effnetv2_jax.save(tmp_path / 'w.msgpack', small_variables, metadata)
    model = effnet_nnx.load(tmp_path / 'w.msgpack', num_classes=5)
    variables = effnet_nnx.to_linen(model)[1]
    assert variables['params']['classifier']['kernel'].shape == (1280, 5)
    jax.tree.map(np.testing.assert_array_equal, variables['params']['stem'],
                 small_variables['params']['stem'])
    assert 'class_names' not in model.metadata


def test_save_pretrained_in_the_former_argument_order_warns_and_writes_the_same_folder(
        tmp_path, small_variables):
    effnetv2_jax.save_pretrained(tmp_path / 'new', small_variables, SMALL_METADATA)
    with pytest.warns(DeprecationWarning, match=r'save_pretrained\(directory, variables, metadata'):
        folder = effnetv2_jax.save_pretrained(small_variables, SMALL_METADATA, tmp_path / 'old')
    assert folder == tmp_path / 'old'
    old, new = snapshot(tmp_path / 'old'), snapshot(tmp_path / 'new')
    # safetensors writes its header's metadata in no fixed order: the tensors are compared.
    jax.tree.map(np.testing.assert_array_equal,
                 safetensors.numpy.load(old.pop('model.safetensors')),
                 safetensors.numpy.load(new.pop('model.safetensors')))
    assert old == new
