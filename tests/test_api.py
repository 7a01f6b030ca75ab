"""The public API's shared pieces: `checkpoint.model_metadata`, the inverse of `build_model`."""
from __future__ import annotations

from effnetv2_jax import checkpoint, create_model
from helpers import SMALL_METADATA


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
