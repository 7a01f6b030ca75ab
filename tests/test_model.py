"""Specification of the whole model: eval and train modes, RNG streams, features_only,
num_classes=0, bfloat16, remat, and `create_model`'s overrides. B0 at 32 px, batch 2.

Numerical agreement with PyTorch is test_equivalence.py's; tolerances come from test_kernels.py.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effnetv2_jax
from effnetv2_jax.model import abstract_variables
from helpers import assert_close, assert_close_per_tensor, random_variables

IMAGE_SHAPE = (2, 32, 32, 3)
NUM_CLASSES = 10


@pytest.fixture(scope='module')
def images():
    return jnp.asarray(np.random.default_rng(0).normal(size=IMAGE_SHAPE), jnp.float32)


@pytest.fixture(scope='module')
def b0():
    return effnetv2_jax.create_model('b0', num_classes=NUM_CLASSES)


@pytest.fixture(scope='module')
def b0_variables(b0, images):
    return random_variables(b0, images)


def _rngs(dropout=1, drop_path=2):
    return {'dropout': jax.random.key(dropout), 'drop_path': jax.random.key(drop_path)}


def test_model_eval_needs_no_rng_and_is_deterministic(b0, b0_variables, images):
    first = b0.apply(b0_variables, images, train=False)
    second = b0.apply(b0_variables, images, train=False)
    assert first.shape == (IMAGE_SHAPE[0], NUM_CLASSES) and first.dtype == jnp.float32
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize('missing', ['dropout', 'drop_path'])
def test_model_train_with_nonzero_rates_raises_without_each_rng(b0, b0_variables, images,
                                                                 missing):
    assert b0.dropout_rate > 0 and b0.drop_path_rate > 0
    rngs = {name: key for name, key in _rngs().items() if name != missing}
    with pytest.raises(flax.errors.InvalidRngError, match=missing):
        b0.apply(b0_variables, images, train=True, mutable=['batch_stats'], rngs=rngs)


def test_model_train_is_reproducible_with_the_same_rngs(b0, b0_variables, images):
    run = lambda rngs: b0.apply(b0_variables, images, train=True, mutable=['batch_stats'],
                                rngs=rngs)
    (logits, stats), (again, stats_again) = run(_rngs()), run(_rngs())
    np.testing.assert_array_equal(logits, again)
    jax.tree.map(np.testing.assert_array_equal, stats, stats_again)
    other_drop_path, _ = run(_rngs(drop_path=3))
    other_dropout, _ = run(_rngs(dropout=3))
    assert not np.array_equal(logits, other_drop_path)
    assert not np.array_equal(logits, other_dropout)


def test_model_features_only_returns_one_map_per_stage_with_config_channels_and_strides(
        b0, images):
    model = b0.clone(features_only=True)
    variables = random_variables(model, images)
    features = model.apply(variables, images, train=False)
    variant = effnetv2_jax.get_variant('b0')
    assert len(features) == len(variant.stages)
    reduction = 2  # the stem
    for feature, stage in zip(features, variant.stages):
        reduction *= stage.stride
        size = IMAGE_SHAPE[1] // reduction
        assert feature.shape == (IMAGE_SHAPE[0], size, size, stage.out_channels)
    assert 'head_conv' not in variables['params'] and 'classifier' not in variables['params']


def test_model_without_classes_returns_the_pooled_features_the_classifier_sees(
        b0, b0_variables, images):
    model = effnetv2_jax.create_model('b0', num_classes=0)
    params = dict(b0_variables['params'])
    classifier = params.pop('classifier')
    pooled = model.apply({**b0_variables, 'params': params}, images, train=False)
    head = effnetv2_jax.get_variant('b0').head_channels
    assert pooled.shape == (IMAGE_SHAPE[0], head) and pooled.dtype == jnp.float32
    assert 'classifier' not in abstract_variables(model)['params']
    logits = b0.apply(b0_variables, images, train=False)
    assert_close(pooled @ classifier['kernel'] + classifier['bias'], logits)


def test_model_bfloat16_returns_float32_logits_and_float32_batch_stats(b0, b0_variables,
                                                                       images):
    model = b0.clone(dtype=jnp.bfloat16)
    train_step = jax.jit(lambda variables, x, rngs: model.apply(
        variables, x, train=True, mutable=['batch_stats'], rngs=rngs))  # faster than eager here
    logits, updated = train_step(b0_variables, images, _rngs())
    assert logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(updated)} == {jnp.dtype(jnp.float32)}
    assert np.all(np.isfinite(logits))
    params = abstract_variables(model)['params']
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_model_clone_with_zero_drop_path_rate_needs_no_drop_path_rng(b0, b0_variables,
                                                                     images):
    model = b0.clone(drop_path_rate=0.0)
    assert model.drop_path_rate == 0.0 and b0.drop_path_rate > 0  # the original is untouched
    logits, _ = model.apply(b0_variables, images, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(0)})
    assert logits.shape == (IMAGE_SHAPE[0], NUM_CLASSES)
    no_rates = b0.clone(drop_path_rate=0.0, dropout_rate=0.0)
    logits, _ = no_rates.apply(b0_variables, images, train=True, mutable=['batch_stats'])
    assert np.all(np.isfinite(logits))


# remat changes only what is stored for the backward pass, not the arithmetic: measured bitwise
# equal logits, batch statistics and gradients here (jit, CPU), so a bound of 1e-5 of each
# tensor's own largest value leaves room for a fusion that rounds differently. Exact gradients of
# 0 need an absolute bound: the BN biases of the projections of blocks 4-20 feed only 1x1 convs
# into train-mode BN, which cancels a per-channel shift, and there any other summation order
# gives noise (measured with the batch reversed: at most 5e-6, against 0.18 for the smallest
# other gradient tensor), hence 1e-4. A batch of 8: with 2, BN over 2 values at 1x1 pushes
# gradients to 1e9 and that noise to 15, past genuine gradients of 0.14. Zeroing one tensor,
# e.g. the gradient of blocks_20's expand BN bias (largest value 0.18), fails by 1800x.
REMAT_RTOL, REMAT_ATOL = 1e-5, 1e-4


def test_model_remat_gives_the_same_logits_batch_stats_and_gradients(b0, b0_variables):
    images = jnp.asarray(np.random.default_rng(0).normal(size=(8, *IMAGE_SHAPE[1:])), jnp.float32)

    def grads_and_outputs(model):
        def loss(params):
            logits, updated = model.apply({**b0_variables, 'params': params}, images, train=True,
                                          mutable=['batch_stats'])
            return jnp.sum(logits ** 2), (logits, updated)
        return jax.jit(jax.grad(loss, has_aux=True))(b0_variables['params'])

    base = b0.clone(dropout_rate=0.0, drop_path_rate=0.0)
    grads, outputs = grads_and_outputs(base)
    remat_grads, remat_outputs = grads_and_outputs(base.clone(remat=True))
    assert_close_per_tensor(remat_outputs, outputs, REMAT_RTOL, REMAT_ATOL)
    assert_close_per_tensor(remat_grads, grads, REMAT_RTOL, REMAT_ATOL)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads['classifier']))


def test_create_model_takes_the_variant_rates_unless_overridden():
    variant = effnetv2_jax.get_variant('b0')
    model = effnetv2_jax.create_model('b0', num_classes=NUM_CLASSES, drop_path_rate=0.1,
                                      padding='same', remat=True)
    assert (model.variant, model.num_classes) == (variant, NUM_CLASSES)
    assert (model.dropout_rate, model.drop_path_rate) == (variant.dropout_rate, 0.1)
    assert (model.padding, model.remat) == ('same', True)


@pytest.mark.parametrize('override', ['depthwise_implementation', 'variant', 'dropout'])
def test_create_model_rejects_what_is_not_an_override(override):
    with pytest.raises(TypeError, match=rf"unknown override\(s\) \['{override}'\]; valid: "):
        effnetv2_jax.create_model('b0', **{override: 'xla'})


@pytest.mark.parametrize('name, variant', [
    ('s', 's'), ('EfficientNetV2-S', 's'), ('efficientnet_v2_m', 'm'),
    ('tf_efficientnetv2_b0', 'b0'), ('efficientnetv2_rw_t', 'rw_t'),
    ('efficientnetv2_rw_m', 'rw_m')])
def test_get_variant_takes_the_libraries_model_names(name, variant):
    assert effnetv2_jax.get_variant(name).name == variant


def test_get_variant_refuses_timms_global_context_variant():
    with pytest.raises(ValueError, match="unknown variant 'gc_efficientnetv2_rw_t'; known: s, "):
        effnetv2_jax.get_variant('gc_efficientnetv2_rw_t')
