"""Specification of the convolution kernels, every implementation checked against PyTorch's conv2d.

Layouts: PyTorch activations are NCHW and conv weights OIHW; Flax activations are NHWC and conv
kernels HWIO, so a torch weight becomes a Flax kernel by `transpose(2, 3, 1, 0)` (a depthwise
(C, 1, k, k) weight becomes (k, k, 1, C) with `groups=C`). The layout helpers and the output
tolerance are in helpers.py, shared with test_layers.py and test_model.py.

Tolerances (float32 on CPU): outputs `OUT_RTOL`/`OUT_ATOL` (helpers.py), gradients
`CONV_GRAD_RTOL`; the reasons and the measured errors are next to the constants. Images are tiny (at most 16 px).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effnetv2_jax import kernels
from effnetv2_jax.kernels import (IM2COL_MAX_INPUT_FEATURES, IM2COL_MIN_FEATURES, conv_forward,
                                  conv_kernel_gradient, dense_conv, depthwise_conv)
from effnetv2_jax.layers import ConvBNAct, explicit_padding
from helpers import (DEPTHWISE_CASES, assert_close, nchw, nhwc, random_conv_weight, tf_same_pad,
                     to_hwio)

# Gradients of a sum of ~1e3 products: float32 rounding in a different order, ~1e-6 relative.
CONV_GRAD_RTOL = 1e-5


def torch_conv_gradients(rng, batch, size, in_ch, out_ch, k, stride, padding, groups=1):
    """(x NHWC, torch weight, output cotangent NHWC, torch's y, dx NHWC and dweight HWIO) of a
    conv with `padding` 'symmetric' or TensorFlow's 'same'."""
    x = rng.standard_normal((batch, *size, in_ch)).astype(np.float32)
    weight = random_conv_weight(rng, out_ch, in_ch // groups, k)
    x_torch = nchw(x).clone().requires_grad_(True)
    w_torch = torch.tensor(weight, requires_grad=True)
    padded = tf_same_pad(x_torch, k, stride) if padding == 'same' else x_torch
    y_torch = F.conv2d(padded, w_torch, stride=stride, groups=groups,
                       padding=0 if padding == 'same' else (k - 1) // 2)
    cotangent = rng.standard_normal(y_torch.shape).astype(np.float32)
    y_torch.backward(torch.from_numpy(cotangent))
    return (x, weight, cotangent.transpose(0, 2, 3, 1), nhwc(y_torch),
            nhwc(x_torch.grad), to_hwio(w_torch.grad.numpy()))


def assert_gradient_close(got, expected):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=CONV_GRAD_RTOL,
                               atol=CONV_GRAD_RTOL * np.max(np.abs(expected)))


def assert_conv_and_gradients_equal(conv, torch_case):
    """`conv(x NHWC, kernel HWIO)` gives torch's output, input gradient and weight gradient."""
    x, weight, cotangent, y_torch, dx_torch, dw_torch = torch_case
    y, vjp = jax.vjp(conv, jnp.asarray(x), jnp.asarray(to_hwio(weight)))
    dx, dw = vjp(jnp.asarray(cotangent))
    assert_close(y, y_torch)
    assert_gradient_close(dx, dx_torch)
    assert_gradient_close(dw, dw_torch)


# --------------------------------------------------------------------------------------------
# Depthwise: XLA's grouped convolution and the CPU's shifted multiply-adds



@pytest.mark.parametrize('implementation', ['xla', 'cpu'])
@pytest.mark.parametrize('padding', ['symmetric', 'same'])
@pytest.mark.parametrize('batch', [3, 16])  # the CPU kernel gradient sums groups of <= 8 images
@pytest.mark.parametrize('k,stride,size', DEPTHWISE_CASES)
def test_depthwise_conv_gradients_equal_torch(implementation, padding, batch, k, stride, size):
    rng = np.random.default_rng(k * 100 + stride * 10 + batch)
    channels = 5
    case = torch_conv_gradients(rng, batch, size, channels, channels, k, stride, padding,
                                groups=channels)
    pads = explicit_padding(padding, k, stride, size)
    assert_conv_and_gradients_equal(
        lambda x, w: depthwise_conv(x, w, stride, pads, implementation), case)


# --------------------------------------------------------------------------------------------
# Dense: XLA's convolution and the CPU's im2col matrix products

DENSE_CASES = [(3, 1, (9, 8)), (3, 2, (10, 10)), (3, 2, (9, 11)), (1, 2, (8, 9))]


def each_dense_case(test):
    """Parametrizes `test(implementation, padding, k, stride, size)` over XLA's and the CPU's
    implementation, both paddings and every DENSE_CASES entry."""
    for mark in (pytest.mark.parametrize('k,stride,size', DENSE_CASES),
                 pytest.mark.parametrize('padding', ['symmetric', 'same']),
                 pytest.mark.parametrize('implementation', ['xla', 'cpu'])):
        test = mark(test)
    return test


def dense_case_rng(k, stride, size):
    return np.random.default_rng(k * 100 + stride * 10 + size[1])


@each_dense_case
def test_conv_kernel_gradient_equals_torch(implementation, padding, k, stride, size):
    x, _, cotangent, _, _, dw_torch = torch_conv_gradients(
        dense_case_rng(k, stride, size), 3, size, 6, 8, k, stride, padding)
    dw = conv_kernel_gradient(jnp.asarray(x), jnp.asarray(cotangent), k, stride,
                              explicit_padding(padding, k, stride, size), implementation)
    assert dw.dtype == jnp.float32
    assert_gradient_close(dw, dw_torch)


@each_dense_case
def test_conv_forward_equals_torch(implementation, padding, k, stride, size):
    x, weight, _, y_torch, _, _ = torch_conv_gradients(
        dense_case_rng(k, stride, size), 3, size, 3, 8, k, stride, padding)
    assert_close(conv_forward(jnp.asarray(x), jnp.asarray(to_hwio(weight)), stride,
                              explicit_padding(padding, k, stride, size), implementation),
                 y_torch)


# 'auto' is im2col on CPU from IM2COL_MIN_FEATURES outputs on for the kernel gradient, and up to
# IM2COL_MAX_INPUT_FEATURES inputs for the forward, XLA's otherwise: every branch, through the
# custom_vjp.
@pytest.mark.parametrize('in_ch', [IM2COL_MAX_INPUT_FEATURES, 6])
@pytest.mark.parametrize('out_ch', [8, IM2COL_MIN_FEATURES])
@pytest.mark.parametrize('padding', ['symmetric', 'same'])
@pytest.mark.parametrize('k,stride,size', DENSE_CASES)
def test_dense_conv_output_and_gradients_equal_torch(in_ch, out_ch, padding, k, stride, size):
    rng = np.random.default_rng(in_ch + out_ch + k * 100 + stride * 10 + size[1])
    case = torch_conv_gradients(rng, 3, size, in_ch, out_ch, k, stride, padding)
    pads = explicit_padding(padding, k, stride, size)
    assert_conv_and_gradients_equal(lambda x, w: dense_conv(x, w, stride, pads), case)


# --------------------------------------------------------------------------------------------
# Choosing the implementation

PADS = ((1, 1), (1, 1))
UNKNOWN_IMPLEMENTATION = r"implementation must be one of \('auto', 'xla', 'cpu'\), got"


@pytest.mark.parametrize('conv', [
    lambda: depthwise_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2)), 1, PADS, 'cudnn'),
    lambda: conv_kernel_gradient(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 3)), 3, 1, PADS,
                                 'winograd'),
], ids=['depthwise', 'conv-kernel-gradient'])
def test_unknown_implementation_is_refused(conv):
    with pytest.raises(ValueError, match=UNKNOWN_IMPLEMENTATION):
        conv()


def test_use_implementation_refuses_an_unknown_name_on_entry():
    with pytest.raises(ValueError, match=UNKNOWN_IMPLEMENTATION):
        with kernels.use_implementation('shifted'):
            pass


@pytest.mark.parametrize('conv,shapes', [
    (lambda x, w: depthwise_conv(x, w, 2, ((0, 1), (0, 1))), ((2, 8, 8, 4), (3, 3, 1, 4))),
    (jax.grad(lambda x, w: dense_conv(x, w, 2, ((0, 1), (0, 1))).sum(), argnums=1),
     ((2, 8, 8, 4), (3, 3, 4, IM2COL_MIN_FEATURES))),
], ids=['depthwise', 'dense-kernel-gradient'])
def test_auto_lowers_for_every_platform_without_their_devices(conv, shapes):
    exported = jax.export.export(jax.jit(conv), platforms=('cpu', 'cuda', 'tpu'))(
        *(jnp.zeros(shape) for shape in shapes))
    assert exported.platforms == ('cpu', 'cuda', 'tpu')
    assert 'convolution' in exported.mlir_module()  # XLA's, for cuda and tpu


def traced_convbnact(in_ch, **layer):
    """The jaxpr, as text, of a ConvBNAct (8 outputs) applied to a (1, 8, 8, in_ch) input."""
    layer = ConvBNAct(features=8, **layer)
    x = jnp.zeros((1, 8, 8, in_ch))
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    return str(jax.make_jaxpr(lambda v, x: layer.apply(v, x))(variables, x))


@pytest.mark.parametrize('implementation', ['xla', 'cpu'])
@pytest.mark.parametrize('in_ch,groups', [(8, 8), (3, 1)], ids=['depthwise', 'dense'])
def test_use_implementation_decides_the_convolutions_traced_inside_it(implementation, in_ch,
                                                                      groups):
    with kernels.use_implementation(implementation):
        jaxpr = traced_convbnact(in_ch, kernel_size=3, groups=groups)
    assert 'platform_index' not in jaxpr  # no per-platform choice left to the compiler
    if implementation == 'xla':
        assert 'conv_general_dilated' in jaxpr and f'feature_group_count={groups}' in jaxpr
    else:  # shifted multiply-adds (depthwise) or the im2col matrix product (dense)
        assert 'conv_general_dilated' not in jaxpr


def test_use_implementation_gives_the_enclosing_choice_back_on_exit():
    def depthwise():
        return traced_convbnact(8, kernel_size=3, groups=8)
    with kernels.use_implementation('xla'):
        with kernels.use_implementation('cpu'):
            assert 'conv_general_dilated' not in depthwise()
        assert 'conv_general_dilated' in depthwise() and 'platform_index' not in depthwise()
    assert 'platform_index' in depthwise()  # 'auto': chosen per platform when compiled


@pytest.mark.parametrize('implementation', kernels.IMPLEMENTATIONS)
def test_1x1_stride1_conv_is_a_matrix_product_under_every_implementation(implementation):
    with kernels.use_implementation(implementation):
        jaxpr = traced_convbnact(6, kernel_size=1)
    assert 'dot_general' in jaxpr and 'conv_general_dilated' not in jaxpr
