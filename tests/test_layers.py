"""Specification of the layers (BatchNorm, ConvBNAct, SqueezeExcite, DropPath), checked against real
PyTorch ops.

Layouts and the output tolerance `OUT_RTOL`/`OUT_ATOL`: see test_kernels.py. Running statistics
are compared with `STAT_RTOL`/`STAT_ATOL`; the reasons and the measured errors are next to the
constants. Images are tiny (at most 32 px, batch 2) because XLA's CPU depthwise convolution is
slow.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert import torch_reference
from effnetv2_jax import kernels
from effnetv2_jax.layers import BatchNorm, ConvBNAct, DropPath, SqueezeExcite
from helpers import (DEPTHWISE_CASES, OUT_ATOL, assert_close, f32, nchw, nhwc,
                     random_conv_weight, tf_same_pad, to_hwio)

# Running statistics are O(1) and one multiply-add away from a batch mean: measured max abs error
# 4.2e-7 (mean) and 2.4e-7 (var). The biased-vs-unbiased variance difference this must resolve
# is 0.1 * var / (count - 1) >= 2e-4 per channel for the batch used (count 120, var >= 0.25),
# at least 10x the tolerance; `test_batchnorm_biased_variance_update_would_fail_the_tolerance`
# checks that the tolerance is indeed tight enough to catch it.
STAT_RTOL, STAT_ATOL = 1e-5, 1e-6

BN_EPS = 1e-3  # EfficientNetV2's BatchNorm epsilon
TORCH_BN_MOMENTUM = 0.1  # == momentum 0.9 of `BatchNorm` (weight of the *old* statistics)


# --------------------------------------------------------------------------------------------
# helpers


def random_bn_stats(rng, channels):
    """(weight, bias, running_mean, running_var) as float32 numpy, var in [0.5, 2)."""
    return (f32(rng.uniform(0.5, 1.5, channels)), f32(rng.normal(size=channels)),
            f32(rng.normal(size=channels)), f32(rng.uniform(0.5, 2.0, channels)))


def offset_batch(rng, shape):
    """NHWC batch whose channels have means ~N(0, 3) and stds in [0.5, 3): BN has work to do."""
    channels = shape[-1]
    return f32(rng.normal(size=shape) * rng.uniform(0.5, 3.0, channels)
               + rng.normal(0.0, 3.0, channels))


def torch_bn(weight, bias, mean, var) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(len(weight), eps=BN_EPS, momentum=TORCH_BN_MOMENTUM)
    with torch.no_grad():
        for tensor, value in ((bn.weight, weight), (bn.bias, bias), (bn.running_mean, mean),
                              (bn.running_var, var)):
            tensor.copy_(torch.from_numpy(value))
    return bn


def bn_variables(weight, bias, mean, var):
    return {'params': {'scale': weight, 'bias': bias}, 'batch_stats': {'mean': mean, 'var': var}}


def conv_bn_variables(conv_weight, bn_stats):
    """Variables of a Flax `ConvBNAct` from a torch conv weight (OIHW) and BN stats."""
    weight, bias, mean, var = bn_stats
    return {'params': {'conv': {'kernel': to_hwio(conv_weight)},
                       'bn': {'scale': weight, 'bias': bias}},
            'batch_stats': {'bn': {'mean': mean, 'var': var}}}


def torch_conv_bn_act(x_nchw, conv_weight, bn_stats, stride, padding, groups=1, act=True):
    """Torch conv (no bias) -> eval-mode BatchNorm2d -> SiLU, from plain functional ops."""
    weight, bias, mean, var = (torch.from_numpy(a) for a in bn_stats)
    y = F.conv2d(x_nchw, torch.from_numpy(conv_weight), stride=stride, padding=padding,
                 groups=groups)
    y = F.batch_norm(y, mean, var, weight, bias, training=False, eps=BN_EPS)
    return F.silu(y) if act else y


# --------------------------------------------------------------------------------------------
# BatchNorm


def _batchnorm_train_step(seed):
    """One train-mode step of both BatchNorms on the same (4, 6, 5, 8) batch and statistics."""
    rng = np.random.default_rng(seed)
    x = offset_batch(rng, (4, 6, 5, 8))
    stats = random_bn_stats(rng, 8)
    bn = torch_bn(*stats).train()
    y_torch = nhwc(bn(nchw(x)))
    y, updated = BatchNorm().apply(bn_variables(*stats), x, train=True, mutable=['batch_stats'])
    return x, stats, bn, y_torch, y, updated['batch_stats']


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_batchnorm_train_output_matches_torch_batchnorm2d(seed):
    _, _, _, y_torch, y, _ = _batchnorm_train_step(seed)
    assert y.dtype == jnp.float32
    assert_close(y, y_torch)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_batchnorm_train_updates_running_mean_like_torch(seed):
    _, _, bn, _, _, stats = _batchnorm_train_step(seed)
    assert_close(stats['mean'], bn.running_mean.numpy(), STAT_RTOL, STAT_ATOL)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_batchnorm_train_updates_running_var_with_unbiased_variance_like_torch(seed):
    _, _, bn, _, _, stats = _batchnorm_train_step(seed)
    assert_close(stats['var'], bn.running_var.numpy(), STAT_RTOL, STAT_ATOL)


def test_batchnorm_biased_variance_update_would_fail_the_tolerance():
    """Guards the test above: an implementation updating with the biased variance must fail it."""
    x, (_, _, _, old_var), bn, _, _, _ = _batchnorm_train_step(0)
    momentum = 1 - TORCH_BN_MOMENTUM
    biased_update = momentum * old_var + (1 - momentum) * x.astype(np.float64).var(axis=(0, 1, 2))
    torch_var = bn.running_var.numpy().astype(np.float64)
    excess = np.abs(biased_update - torch_var) - (STAT_ATOL + STAT_RTOL * np.abs(torch_var))
    assert np.all(excess > 0), 'the running-var tolerance cannot tell biased from unbiased'


def test_batchnorm_train_normalises_with_biased_batch_variance():
    """The *output* uses the biased variance (as torch): zero mean, unit biased std per channel."""
    rng = np.random.default_rng(3)
    x = offset_batch(rng, (4, 6, 5, 8))
    variables = bn_variables(f32(np.ones(8)), f32(np.zeros(8)), *random_bn_stats(rng, 8)[2:])
    y, _ = BatchNorm(epsilon=0.0).apply(variables, x, train=True, mutable=['batch_stats'])
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=OUT_ATOL)  # measured 1.0e-6
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-5)  # unbiased: off by 8e-3


# Gradients are sums over the batch's 120 positions of products of O(1..10) values: measured max
# |jax - torch| / max |torch| 1.8e-6 over 5 seeds (dscale; dx 1.6e-7). Leaving out the batch
# statistics' share of dx (treating them as constants) is off by O(1) relative.
BN_GRAD_RTOL = 1e-5


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_batchnorm_train_gradients_match_torch_batchnorm2d(seed):
    """dx, dscale and dbias of <y, cotangent>, against autograd of torch's train-mode batch_norm."""
    rng = np.random.default_rng(seed)
    x = offset_batch(rng, (4, 6, 5, 8))
    weight, bias, mean, var = random_bn_stats(rng, 8)
    cotangent = f32(rng.normal(size=x.shape))
    x_t, w_t, b_t = (torch.tensor(a, requires_grad=True) for a in (nchw(x).numpy(), weight, bias))
    y_t = F.batch_norm(x_t, torch.from_numpy(mean), torch.from_numpy(var), w_t, b_t,
                       training=True, eps=BN_EPS)
    (y_t * nchw(cotangent)).sum().backward()

    def loss(x, params):
        y, _ = BatchNorm().apply({'params': params, 'batch_stats': {'mean': mean, 'var': var}},
                                 x, train=True, mutable=['batch_stats'])
        return jnp.sum(y * cotangent)

    dx, dparams = jax.grad(loss, argnums=(0, 1))(x, {'scale': weight, 'bias': bias})
    for got, expected in ((dx, nhwc(x_t.grad)), (dparams['scale'], w_t.grad.numpy()),
                          (dparams['bias'], b_t.grad.numpy())):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=BN_GRAD_RTOL,
                                   atol=BN_GRAD_RTOL * np.max(np.abs(expected)))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_batchnorm_eval_output_matches_torch_batchnorm2d(seed):
    rng = np.random.default_rng(seed)
    x = offset_batch(rng, (4, 6, 5, 8))
    stats = random_bn_stats(rng, 8)
    y_torch = nhwc(torch_bn(*stats).eval()(nchw(x)))
    y = BatchNorm().apply(bn_variables(*stats), x, train=False)
    assert_close(y, y_torch)


def test_batchnorm_eval_has_no_mutable_state():
    rng = np.random.default_rng(0)
    x = offset_batch(rng, (2, 3, 3, 4))
    variables = bn_variables(*random_bn_stats(rng, 4))
    _, updated = BatchNorm().apply(variables, x, train=False, mutable=['batch_stats'])
    np.testing.assert_array_equal(updated['batch_stats']['mean'], variables['batch_stats']['mean'])
    np.testing.assert_array_equal(updated['batch_stats']['var'], variables['batch_stats']['var'])


def test_batchnorm_init_leaves_running_stats_at_zero_mean_unit_var():
    x = offset_batch(np.random.default_rng(0), (2, 3, 3, 4))
    variables = BatchNorm().init(jax.random.key(0), x, train=True)
    np.testing.assert_array_equal(variables['batch_stats']['mean'], np.zeros(4))
    np.testing.assert_array_equal(variables['batch_stats']['var'], np.ones(4))


def test_batchnorm_keeps_statistics_float32_under_bfloat16_input():
    rng = np.random.default_rng(0)
    x = jnp.asarray(offset_batch(rng, (2, 3, 3, 4)), jnp.bfloat16)
    y, updated = BatchNorm().apply(bn_variables(*random_bn_stats(rng, 4)), x, train=True,
                                   mutable=['batch_stats'])
    assert y.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(updated)} == {jnp.dtype(jnp.float32)}


# --------------------------------------------------------------------------------------------
# ConvBNAct: weight layout and padding


def _conv_bn_case(seed, size, in_ch=6, out_ch=8, k=3, groups=1):
    rng = np.random.default_rng(seed)
    x = f32(rng.normal(size=(2, *size, in_ch)))
    weight = random_conv_weight(rng, out_ch, in_ch // groups, k)
    bn_stats = random_bn_stats(rng, out_ch)
    return x, weight, bn_stats


def _flax_conv_bn_act(x, weight, bn_stats, k, stride, padding, groups=1, activation=jax.nn.silu,
                      implementation='auto'):
    layer = ConvBNAct(features=weight.shape[0], kernel_size=k, stride=stride, groups=groups,
                      padding=padding, activation=activation)
    with kernels.use_implementation(implementation):
        return layer.apply(conv_bn_variables(weight, bn_stats), x, train=False)


@pytest.mark.parametrize('k,groups', [(1, 1), (3, 1), (3, 8), (5, 8)])
def test_convbnact_kernel_is_torch_weight_transposed_to_hwio(k, groups):
    in_ch = 8
    x = jnp.zeros((1, 8, 8, in_ch))
    layer = ConvBNAct(features=8, kernel_size=k, groups=groups)
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    torch_conv = torch.nn.Conv2d(in_ch, 8, k, groups=groups, bias=False)
    assert shapes['params']['conv']['kernel'].shape == to_hwio(torch_conv.weight).shape
    assert 'bias' not in shapes['params']['conv']


@pytest.mark.parametrize('k,stride,size', [
    (1, 1, (8, 7)), (3, 1, (9, 8)), (3, 2, (9, 9)), (3, 2, (10, 8)), (5, 2, (10, 11))])
def test_convbnact_symmetric_padding_equals_torch_conv_padding_half_kernel(k, stride, size):
    x, weight, bn_stats = _conv_bn_case(0, size, k=k)
    y_torch = nhwc(torch_conv_bn_act(nchw(x), weight, bn_stats, stride, (k - 1) // 2))
    y = _flax_conv_bn_act(x, weight, bn_stats, k, stride, 'symmetric')
    assert y.shape == y_torch.shape
    assert_close(y, y_torch)


def test_convbnact_without_activation_is_conv_then_batchnorm():
    x, weight, bn_stats = _conv_bn_case(1, (8, 8))
    y_torch = nhwc(torch_conv_bn_act(nchw(x), weight, bn_stats, 1, 1, act=False))
    y = _flax_conv_bn_act(x, weight, bn_stats, 3, 1, 'symmetric', activation=None)
    assert np.min(y) < -0.5  # no SiLU: negative values survive
    assert_close(y, y_torch)


@pytest.mark.parametrize('size', [(16, 16), (12, 8)])
def test_convbnact_same_padding_3x3_stride2_even_input_pads_only_bottom_right(size):
    x, weight, bn_stats = _conv_bn_case(2, size)
    padded = F.pad(nchw(x), (0, 1, 0, 1))  # (left, right, top, bottom) = TF SAME's (0, 1)
    y_torch = nhwc(torch_conv_bn_act(padded, weight, bn_stats, 2, 0))
    y = _flax_conv_bn_act(x, weight, bn_stats, 3, 2, 'same')
    assert y.shape == (2, size[0] // 2, size[1] // 2, 8)
    assert_close(y, y_torch)


@pytest.mark.parametrize('k,stride,size', [(3, 2, (15, 13)), (5, 2, (9, 11)), (3, 1, (16, 15)),
                                           (5, 1, (8, 9))])
def test_convbnact_same_and_symmetric_are_identical_on_odd_input_or_stride1(k, stride, size):
    x, weight, bn_stats = _conv_bn_case(3, size, k=k)
    same = _flax_conv_bn_act(x, weight, bn_stats, k, stride, 'same')
    symmetric = _flax_conv_bn_act(x, weight, bn_stats, k, stride, 'symmetric')
    np.testing.assert_array_equal(same, symmetric)


@pytest.mark.parametrize('k,size', [(3, (16, 16)), (3, (8, 12)), (5, (16, 16))])
def test_convbnact_same_and_symmetric_differ_on_even_input_stride2(k, size):
    x, weight, bn_stats = _conv_bn_case(4, size, k=k)
    same = _flax_conv_bn_act(x, weight, bn_stats, k, 2, 'same')
    symmetric = _flax_conv_bn_act(x, weight, bn_stats, k, 2, 'symmetric')
    assert same.shape == symmetric.shape
    assert np.max(np.abs(np.asarray(same) - np.asarray(symmetric))) > 100 * OUT_ATOL


@pytest.mark.parametrize('padding', ['symmetric', 'same'])
@pytest.mark.parametrize('k,stride,size', [(3, 2, (16, 16)), (3, 2, (15, 15)), (5, 2, (16, 14)),
                                           (5, 2, (13, 15)), (3, 1, (10, 9))])
def test_convbnact_matches_torch_reference_convbnact(padding, k, stride, size):
    x, weight, bn_stats = _conv_bn_case(5, size, k=k)
    ref = torch_reference.ConvBNAct(6, 8, k, stride, bn_eps=BN_EPS, padding=padding).eval()
    with torch.no_grad():
        ref.conv.weight.copy_(torch.from_numpy(weight))
        for tensor, value in zip((ref.bn.weight, ref.bn.bias, ref.bn.running_mean,
                                  ref.bn.running_var), bn_stats):
            tensor.copy_(torch.from_numpy(value))
        y_torch = nhwc(ref(nchw(x)))
    y = _flax_conv_bn_act(x, weight, bn_stats, k, stride, padding)
    assert y.shape == y_torch.shape
    assert_close(y, y_torch)


def test_convbnact_rejects_unknown_padding():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match='padding'):
        jax.eval_shape(ConvBNAct(features=2, kernel_size=3, padding='valid').init,
                       jax.random.key(0), x)


def test_convbnact_rejects_groups_other_than_one_or_depthwise():
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match='groups must be 1'):
        jax.eval_shape(ConvBNAct(features=8, kernel_size=3, groups=2).init, jax.random.key(0), x)


@pytest.mark.parametrize('implementation', ['xla', 'cpu', 'auto'])
@pytest.mark.parametrize('padding', ['symmetric', 'same'])
@pytest.mark.parametrize('k,stride,size', DEPTHWISE_CASES)
def test_convbnact_depthwise_equals_torch_grouped_conv(implementation, padding, k, stride, size):
    channels = 8
    x, weight, bn_stats = _conv_bn_case(6, size, in_ch=channels, out_ch=channels, k=k,
                                        groups=channels)
    assert weight.shape == (channels, 1, k, k) and to_hwio(weight).shape == (k, k, 1, channels)
    if padding == 'same':
        y_torch = torch_conv_bn_act(tf_same_pad(nchw(x), k, stride), weight, bn_stats, stride, 0,
                                    groups=channels)
    else:
        y_torch = torch_conv_bn_act(nchw(x), weight, bn_stats, stride, (k - 1) // 2,
                                    groups=channels)
    y = _flax_conv_bn_act(x, weight, bn_stats, k, stride, padding, groups=channels,
                          implementation=implementation)
    assert y.shape == nhwc(y_torch).shape
    assert_close(y, nhwc(y_torch))


def test_convbnact_train_step_matches_torch_conv_and_batchnorm2d():
    x, weight, bn_stats = _conv_bn_case(7, (10, 10))
    bn = torch_bn(*bn_stats).train()
    y_torch = nhwc(F.silu(bn(F.conv2d(nchw(x), torch.from_numpy(weight), stride=2, padding=1))))
    y, updated = ConvBNAct(features=8, kernel_size=3, stride=2).apply(
        conv_bn_variables(weight, bn_stats), x, train=True, mutable=['batch_stats'])
    assert_close(y, y_torch)
    assert_close(updated['batch_stats']['bn']['mean'], bn.running_mean.numpy(), STAT_RTOL,
                 STAT_ATOL)
    assert_close(updated['batch_stats']['bn']['var'], bn.running_var.numpy(), STAT_RTOL,
                 STAT_ATOL)


# --------------------------------------------------------------------------------------------
# SqueezeExcite


def _se_pair(seed, block_in=8, expanded=32, se_ratio=0.25):
    rng = np.random.default_rng(seed)
    ref = torch_reference.SqueezeExcite(block_in, expanded, se_ratio)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.from_numpy(f32(rng.normal(size=p.shape) * 0.5)))
    variables = {'params': {
        name: {'kernel': to_hwio(conv.weight), 'bias': conv.bias.detach().numpy()}
        for name, conv in (('conv_reduce', ref.conv_reduce), ('conv_expand', ref.conv_expand))}}
    x = f32(rng.normal(size=(2, 5, 5, expanded)))
    return ref, variables, x


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_squeeze_excite_matches_torch_reference(seed):
    ref, variables, x = _se_pair(seed)
    with torch.no_grad():
        y_torch = nhwc(ref(nchw(x)))
    y = SqueezeExcite(squeeze_channels=ref.conv_reduce.out_channels).apply(variables, x)
    assert y.shape == x.shape
    assert_close(y, y_torch)


def test_squeeze_excite_parameters_are_1x1_convs_with_bias_shaped_like_torch():
    ref, variables, x = _se_pair(0)
    shapes = jax.eval_shape(SqueezeExcite(squeeze_channels=2).init, jax.random.key(0), x)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)
    assert shapes['params']['conv_reduce']['kernel'].shape == (1, 1, 32, 2)


def test_squeeze_excite_gates_each_channel_of_each_sample_by_a_factor_in_0_1():
    _, variables, x = _se_pair(1)
    y = np.asarray(SqueezeExcite(squeeze_channels=2).apply(variables, x))
    gate = y / x  # one gate per (sample, channel), constant over H and W
    np.testing.assert_allclose(gate, np.broadcast_to(gate[:, :1, :1], gate.shape), rtol=1e-5)
    assert np.all((gate > 0) & (gate < 1))


# --------------------------------------------------------------------------------------------
# DropPath


def _drop_path(rate, x, key=None, deterministic=False):
    rngs = {} if key is None else {'drop_path': key}
    return DropPath(rate=rate).apply({}, x, deterministic=deterministic, rngs=rngs)


@pytest.mark.parametrize('rate,deterministic', [(0.5, True), (0.0, False)],
                         ids=['deterministic', 'rate-zero'])
def test_drop_path_is_identity_and_needs_no_rng_when_deterministic_or_at_rate_zero(
        rate, deterministic):
    x = f32(np.random.default_rng(0).normal(size=(8, 3, 3, 4)))
    np.testing.assert_array_equal(_drop_path(rate, x, deterministic=deterministic), x)


def test_drop_path_raises_without_drop_path_rng_when_active():
    x = jnp.ones((4, 2, 2, 3))
    with pytest.raises(flax.errors.InvalidRngError, match='drop_path'):
        _drop_path(0.3, x)


def test_drop_path_same_key_gives_same_output():
    x = f32(np.random.default_rng(0).normal(size=(64, 2, 2, 3)))
    np.testing.assert_array_equal(_drop_path(0.5, x, jax.random.key(7)),
                                  _drop_path(0.5, x, jax.random.key(7)))


def test_drop_path_different_keys_give_different_masks():
    x = jnp.ones((64, 2, 2, 3))
    kept_a = np.asarray(_drop_path(0.5, x, jax.random.key(1)))[:, 0, 0, 0] != 0
    kept_b = np.asarray(_drop_path(0.5, x, jax.random.key(2)))[:, 0, 0, 0] != 0
    assert np.any(kept_a != kept_b)  # equal by chance with probability 2**-64


@pytest.mark.parametrize('rate', [0.3, 0.5])
def test_drop_path_zeroes_whole_samples_and_scales_the_others_by_one_over_keep_prob(rate):
    x = f32(np.random.default_rng(0).normal(size=(256, 3, 4, 5)))
    y = np.asarray(_drop_path(rate, x, jax.random.key(0)))
    dropped = np.all(y == 0, axis=(1, 2, 3))
    kept = ~dropped
    assert dropped.any() and kept.any()
    # x / keep_prob in float32, the very same division the layer does: bit-exact.
    np.testing.assert_array_equal(y[kept], x[kept] / np.float32(1.0 - rate))


N_SAMPLES = 20_000
RATE = 0.3


def test_drop_path_keeps_samples_with_probability_one_minus_rate():
    y = np.asarray(_drop_path(RATE, jnp.ones((N_SAMPLES, 1, 1, 2)), jax.random.key(3)))
    kept_fraction = np.mean(y[:, 0, 0, 0] != 0)
    keep = 1 - RATE
    sigma = np.sqrt(keep * RATE / N_SAMPLES)  # binomial standard error, 0.0032
    assert abs(kept_fraction - keep) < 5 * sigma, kept_fraction


def test_drop_path_output_mean_equals_input_mean():
    """Unbiased: E[y] = x. With x = 1, mean(y) = kept/N / keep, s.e. sqrt(rate / (keep N))."""
    y = np.asarray(_drop_path(RATE, jnp.ones((N_SAMPLES, 1, 1, 2)), jax.random.key(4)))
    sigma = np.sqrt(RATE / ((1 - RATE) * N_SAMPLES))  # 0.0046
    assert abs(y.mean() - 1.0) < 5 * sigma, y.mean()
