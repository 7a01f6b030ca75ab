"""Building blocks with PyTorch semantics: BatchNorm, ConvBNAct, SqueezeExcite, DropPath.

Everything is NHWC. Parameter and statistic names mirror the PyTorch modules they replace
(`conv`, `bn`, `conv_reduce`, `conv_expand`), so the converter's mapping stays readable.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

PADDINGS = ('symmetric', 'same')
# 'auto': shifted multiply-adds on CPU, XLA's grouped convolution elsewhere (cuDNN on GPU).
DEPTHWISE_IMPLEMENTATIONS = ('auto', 'xla', 'shifted')


def explicit_padding(padding: str, kernel_size: int, stride: int, spatial_shape):
    """((top, bottom), (left, right)) for a square kernel on an input of `spatial_shape` (H, W).

    'symmetric' pads (k-1)//2 on every side (PyTorch); 'same' is TensorFlow's SAME, which on a
    stride-2 layer with even input pads one more at the bottom/right than at the top/left.
    """
    if padding == 'symmetric':
        pad = (kernel_size - 1) // 2
        return ((pad, pad), (pad, pad))
    if padding == 'same':  # lax's SAME splits the padding exactly as TensorFlow does
        pads = lax.padtype_to_pads(spatial_shape, (kernel_size,) * 2, (stride,) * 2, 'SAME')
        return tuple(tuple(int(p) for p in pair) for pair in pads)
    raise ValueError(f'padding must be one of {PADDINGS}, got {padding!r}')


def _output_hw(x, kernel_size: int, stride: int, pads):
    return [(x.shape[d] + sum(pads[d - 1]) - kernel_size) // stride + 1 for d in (1, 2)]


def _windows(x, kernel_size: int, stride: int, pads, out_hw):
    """The k*k strided windows of the zero-padded input, in float32: one (N, Ho, Wo, C) per tap."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0))).astype(jnp.float32)
    n, c, (ho, wo), s = xp.shape[0], xp.shape[3], out_hw, stride
    return [lax.slice(xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
                      (1, s, s, 1)) for i in range(kernel_size) for j in range(kernel_size)]


def _shifted_depthwise(x, kernel, stride: int, pads):
    k = kernel.shape[0]
    w = kernel.reshape(k * k, -1).astype(jnp.float32)
    windows = _windows(x, k, stride, pads, _output_hw(x, k, stride, pads))
    return sum(t * w[i] for i, t in enumerate(windows)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_depthwise_conv(x, kernel, stride: int, pads):
    """Depthwise conv as k*k shifted multiply-adds, which XLA:CPU fuses into one loop: 15-100x
    faster there than its grouped convolution (benchmarks/throughput.py; REFERENCE.md).
    x (N, H, W, C), kernel (k, k, 1, C), pads ((top, bottom), (left, right)) -> (N, Ho, Wo, C)."""
    return _shifted_depthwise(x, kernel, stride, pads)


def _shifted_depthwise_fwd(x, kernel, stride, pads):
    return _shifted_depthwise(x, kernel, stride, pads), (x, kernel)


def _shifted_depthwise_bwd(stride, pads, residuals, g):
    x, kernel = residuals
    k, n = kernel.shape[0], x.shape[0]
    dx, = jax.vjp(lambda x: _shifted_depthwise(x, kernel, stride, pads), x)[1](g)  # fused pads
    # Autodiff's kernel gradient is k*k reductions of materialised (N, Ho, Wo, C) products, ~15x
    # slower on CPU. Instead: sum groups of r <= 8 images with explicit adds and write every tap
    # into one (N/r, Ho, Wo, k*k, C) array (one loop fusion: LLVM unswitches the iota selects),
    # then one reduction. More than ~8 terms per group, or a scan, defeats the fusion.
    r, g32 = max(d for d in range(1, 9) if n % d == 0), g.astype(jnp.float32)
    tap_index, per_tap = lax.broadcasted_iota(jnp.int32, (1, 1, 1, k * k, 1), 3), 0
    for t, window in enumerate(_windows(x, k, stride, pads, g.shape[1:3])):
        products = (window * g32).reshape(r, n // r, *g.shape[1:])
        per_tap = jnp.where(tap_index == t, sum(products[m] for m in range(r))[:, :, :, None],
                            per_tap)
    return dx, per_tap.sum((0, 1, 2)).reshape(kernel.shape).astype(kernel.dtype)


shifted_depthwise_conv.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def _xla_or_cpu_path(implementation, what, operands, xla, cpu, cpu_name, cpu_pays=True):
    """`xla(*operands)` or the CPU path `cpu(*operands)`, as `implementation` says: 'xla',
    `cpu_name`, or 'auto': the CPU path when compiled for CPU if `cpu_pays`, else xla."""
    if implementation == 'auto' and cpu_pays:
        return lax.platform_dependent(*operands, cpu=cpu, default=xla)
    if implementation in ('auto', 'xla'):
        return xla(*operands)
    if implementation == cpu_name:
        return cpu(*operands)
    raise ValueError(f"{what} implementation must be one of {('auto', 'xla', cpu_name)}, "
                     f"got {implementation!r}")


def depthwise_conv(x, kernel, stride: int, pads, implementation: str = 'auto'):
    """x (N, H, W, C), kernel (k, k, 1, C) -> (N, Ho, Wo, C); `implementation` is one of
    DEPTHWISE_IMPLEMENTATIONS ('auto' picks per backend when compiled, also inside jax.export
    artifacts for several platforms). All agree to float32 rounding (tests/test_layers.py)."""
    def grouped(x, kernel):
        return lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=x.shape[-1])

    def shifted(x, kernel):
        return shifted_depthwise_conv(x, kernel, stride, pads)

    return _xla_or_cpu_path(implementation, 'depthwise', (x, kernel), grouped, shifted, 'shifted')


def _dense_conv(x, kernel, stride: int, pads):
    return lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _im2col_patches(x, kernel_size: int, stride: int, pads, out_hw):
    """The k*k strided windows of the padded input side by side: (N, Ho, Wo, k*k, C) float32."""
    return jnp.stack(_windows(x, kernel_size, stride, pads, out_hw), axis=3)


CONV_IMPLEMENTATIONS = ('auto', 'xla', 'im2col')
# Measured on a 2-core CPU, batch 8 (README, Performance). Forward: im2col is ~4x faster than
# XLA's for S's 3->24 stem, whose 3 input channels use the vector units poorly, and 1.5-6x slower
# from 24 input channels on. Kernel gradient: im2col is 1.3-3.6x faster than XLA's for the 24->96,
# 48->192 and 64->256 convs of S, but ~1.5x slower for its 24->24: a narrow matrix product does
# not pay for writing the k*k windows.
IM2COL_MAX_INPUT_FEATURES = 4
IM2COL_MIN_FEATURES = 64


def conv_forward(x, kernel, stride: int, pads, implementation: str = 'auto'):
    """A dense conv: x (N, H, W, C_in), kernel (k, k, C_in, C_out) -> (N, Ho, Wo, C_out).

    'xla' is XLA's convolution; 'im2col' one matrix product of the k*k strided windows
    (N*Ho*Wo, k*k*C_in) with the kernel (k*k*C_in, C_out); 'auto' picks im2col on CPU for
    C_in <= IM2COL_MAX_INPUT_FEATURES, else xla.
    """
    def im2col(x, kernel):
        k, c_in, c_out = kernel.shape[0], x.shape[-1], kernel.shape[-1]
        patches = _im2col_patches(x, k, stride, pads, _output_hw(x, k, stride, pads))
        patches = patches.astype(x.dtype)
        return lax.dot_general(patches, kernel.reshape(k * k, c_in, c_out),
                               (((3, 4), (0, 1)), ((), ())))

    def xla(x, kernel):
        return _dense_conv(x, kernel, stride, pads)

    return _xla_or_cpu_path(implementation, 'conv', (x, kernel), xla, im2col, 'im2col',
                            cpu_pays=x.shape[-1] <= IM2COL_MAX_INPUT_FEATURES)


def conv_kernel_gradient(x, g, kernel_size: int, stride: int, pads, implementation: str = 'auto'):
    """The kernel gradient of a dense conv: input x (N, H, W, C_in) and output cotangent
    g (N, Ho, Wo, C_out) -> float32 (k, k, C_in, C_out).

    'xla' is XLA's transposed convolution; 'im2col' one matrix product of the k*k strided windows
    (N*Ho*Wo, k*k*C_in) with g (N*Ho*Wo, C_out); 'auto' picks im2col on CPU for
    C_out >= IM2COL_MIN_FEATURES, else xla.
    """
    k, c_in, c_out = kernel_size, x.shape[-1], g.shape[-1]

    def xla(x, g):
        kernel = jax.ShapeDtypeStruct((k, k, c_in, c_out), x.dtype)
        dw, = jax.linear_transpose(lambda w: _dense_conv(x, w, stride, pads), kernel)(g)
        return dw.astype(jnp.float32)

    def im2col(x, g):
        patches = _im2col_patches(x, k, stride, pads, g.shape[1:3])
        dw = lax.dot_general(patches.reshape(-1, k * k * c_in),
                             g.reshape(-1, c_out).astype(jnp.float32), (((0,), (0,)), ((), ())))
        return dw.reshape(k, k, c_in, c_out)

    return _xla_or_cpu_path(implementation, 'conv', (x, g), xla, im2col, 'im2col',
                            cpu_pays=c_out >= IM2COL_MIN_FEATURES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_conv(x, kernel, stride: int, pads):
    """`conv_forward(..., 'auto')` with the kernel gradient of `conv_kernel_gradient(..., 'auto')`:
    XLA:CPU's own is 3-7x slower than the forward for the wide convs of the fused blocks.
    x (N, H, W, C_in), kernel (k, k, C_in, C_out), pads ((top, bottom), (left, right))
    -> (N, Ho, Wo, C_out)."""
    return conv_forward(x, kernel, stride, pads)


def _dense_conv_fwd(x, kernel, stride, pads):
    return conv_forward(x, kernel, stride, pads), (x, kernel)


def _dense_conv_bwd(stride, pads, residuals, g):
    x, kernel = residuals
    dx, = jax.vjp(lambda x: _dense_conv(x, kernel, stride, pads), x)[1](g)
    dw = conv_kernel_gradient(x, g, kernel.shape[0], stride, pads)
    return dx, dw.astype(kernel.dtype)


dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


class Conv(nn.Module):
    """A kxk conv without bias, dense (`dense_conv`) or depthwise (`depthwise_conv`, which needs
    features == C_in); the parameter is `kernel` (k, k, C_in or 1 if depthwise, features), as
    nn.Conv's with `feature_group_count` 1 or C_in, so converted weights fit either."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: str = 'symmetric'
    depthwise: bool = False
    depthwise_implementation: str = 'auto'  # see DEPTHWISE_IMPLEMENTATIONS
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param('kernel', self.kernel_init,
                            (k, k, 1 if self.depthwise else x.shape[-1], self.features),
                            self.param_dtype)
        pads = explicit_padding(self.padding, k, self.stride, x.shape[1:3])
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.depthwise:
            return depthwise_conv(x, kernel, self.stride, pads, self.depthwise_implementation)
        return dense_conv(x, kernel, self.stride, pads)


class PointwiseConv(nn.Module):
    """A 1x1 conv without bias as a matrix product over the channel axis; the parameter is
    `kernel` (1, 1, C_in, features), as nn.Conv's."""

    features: int
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        return lax.dot_general(x.astype(self.dtype), kernel[0, 0].astype(self.dtype),
                               (((x.ndim - 1,), (0,)), ((), ())))


class BatchNorm(nn.Module):
    """BatchNorm over N, H, W with `torch.nn.BatchNorm2d` semantics.

    Train mode normalises with the biased batch variance but updates `batch_stats/var` with the
    unbiased one, as PyTorch does (Flax's `nn.BatchNorm` uses the biased one). Statistics and the
    normalisation arithmetic are float32 whatever the compute dtype. Under `jax.jit` with a sharded
    batch the means are over the global batch.

    Attributes:
        momentum: weight of the old running statistics (PyTorch momentum 0.1 == 0.9 here).
        epsilon: added to the variance (1e-3 for EfficientNetV2; timm's non-TF models use 1e-5).
    """

    momentum: float = 0.9
    epsilon: float = 1e-3
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)  # two-pass: no cancellation
            if not self.is_initializing():
                count = x.size // features
                unbiased = var * (count / max(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        y = (x32 - mean) * mul + bias
        return y.astype(self.dtype or x.dtype)


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation, PyTorch's `ConvBNAct`.

    Input (N, H, W, C_in) in `dtype`; output (N, H/stride, W/stride, features).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    activation: Optional[Callable] = nn.silu
    padding: str = 'symmetric'
    bn_eps: float = 1e-3
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    depthwise_implementation: str = 'auto'  # see DEPTHWISE_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernel_size
        kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
        depthwise = self.groups > 1 and self.groups == x.shape[-1] == self.features
        if self.groups != 1 and not depthwise:
            raise ValueError(f'groups must be 1 or, for a depthwise conv, the channel count '
                             f'{x.shape[-1]} == features; got {self.groups}')
        if k == 1 and self.stride == 1 and not depthwise:
            x = PointwiseConv(self.features, kernel_init, self.dtype, self.param_dtype,
                              name='conv')(x)
        else:
            x = Conv(self.features, k, self.stride, self.padding, depthwise,
                     self.depthwise_implementation, kernel_init, self.dtype, self.param_dtype,
                     name='conv')(x)
        x = BatchNorm(self.bn_momentum, self.bn_eps, dtype=self.dtype, name='bn')(x, train)
        return self.activation(x) if self.activation is not None else x


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid gate; shape-preserving."""

    squeeze_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda features, name: nn.Conv(
            features, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = nn.silu(conv(self.squeeze_channels, 'conv_reduce')(scale))
        scale = nn.sigmoid(conv(x.shape[-1], 'conv_expand')(scale))
        return x * scale


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples with probability `rate`, scales the rest by 1/keep.

    Draws from the `drop_path` RNG stream; the identity when `deterministic` or `rate == 0`.
    """

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng('drop_path'), keep_prob, shape)
        return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))
