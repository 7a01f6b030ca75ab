"""Flax modules with PyTorch semantics: Conv, BatchNorm, ConvBNAct, SqueezeExcite, DropPath.

Everything is NHWC. Parameter and statistic names mirror the PyTorch modules they replace
(`conv`, `bn`, `conv_reduce`, `conv_expand`), so the converter's mapping stays readable. How a
convolution is computed is `effnetv2_jax.kernels`' business.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from effnetv2_jax import kernels

Dtype = Any

PADDINGS = ('symmetric', 'same')


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


class Conv(nn.Module):
    """A kxk conv without bias (`kernels.conv2d`), dense or depthwise (features == C_in).

    The parameter is `kernel` (k, k, C_in or 1 if depthwise, features), as nn.Conv's with
    `feature_group_count` 1 or C_in, so converted weights fit either. Input (N, H, W, C_in);
    output (N, H/stride, W/stride, features) in `dtype`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: str = 'symmetric'  # see PADDINGS
    depthwise: bool = False
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
        return kernels.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
                              pads=pads, depthwise=self.depthwise)


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

    @nn.compact
    def __call__(self, x, train: bool = False):
        depthwise = self.groups > 1 and self.groups == x.shape[-1] == self.features
        if self.groups != 1 and not depthwise:
            raise ValueError(f'groups must be 1 or, for a depthwise conv, the channel count '
                             f'{x.shape[-1]} == features; got {self.groups}')
        x = Conv(features=self.features, kernel_size=self.kernel_size, stride=self.stride,
                 padding=self.padding, depthwise=depthwise, dtype=self.dtype,
                 param_dtype=self.param_dtype, name='conv')(x)
        x = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype,
                      name='bn')(x, train)
        return self.activation(x) if self.activation is not None else x


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid gate; shape-preserving."""

    squeeze_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda features, name: nn.Conv(
            features=features, kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
            name=name)
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
