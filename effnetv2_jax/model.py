"""EfficientNetV2 in Flax linen: FusedMBConv and MBConv blocks, the network, and its builder."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effnetv2_jax.configs import VARIANTS, Variant, get_variant, implied_by_name
from effnetv2_jax.layers import ConvBNAct, DropPath, SqueezeExcite

Dtype = Any


class FusedMBConv(nn.Module):
    """kxk conv expand (+ 1x1 project), residual with drop path when stride 1 and in == out.

    With `single_conv` (`Stage.single_conv`: a fused stage of expansion 1, unless timm's
    `efficientnetv2_rw_s`/`_m` keep the project conv) the block is one kxk ConvBNAct *with*
    activation (named `project_conv`, as in WZMIAOMIAO's model.py). Input (N, H, W, C_in); output
    (N, H/stride, W/stride, out_channels).
    """

    out_channels: int
    expansion: int
    stride: int
    kernel_size: int = 3
    single_conv: bool = False
    drop_path_rate: float = 0.0
    conv: Any = ConvBNAct  # a partial of ConvBNAct carrying padding, BN eps and dtypes

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_channels = x.shape[-1]
        if self.single_conv:
            y = self.conv(features=self.out_channels, kernel_size=self.kernel_size,
                          stride=self.stride, name='project_conv')(x, train)
        else:
            y = self.conv(features=in_channels * self.expansion, kernel_size=self.kernel_size,
                          stride=self.stride, name='expand_conv')(x, train)
            y = self.conv(features=self.out_channels, kernel_size=1, activation=None,
                          name='project_conv')(y, train)
        if self.stride == 1 and in_channels == self.out_channels:
            y = DropPath(rate=self.drop_path_rate)(y, deterministic=not train) + x
        return y


class MBConv(nn.Module):
    """1x1 expand -> kxk depthwise -> squeeze-excite -> 1x1 project, residual as in FusedMBConv.

    Input (N, H, W, C_in); output (N, H/stride, W/stride, out_channels).
    """

    out_channels: int
    expansion: int
    stride: int
    kernel_size: int = 3
    se_ratio: float = 0.25
    drop_path_rate: float = 0.0
    conv: Any = ConvBNAct
    squeeze_excite: Any = SqueezeExcite

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_channels = x.shape[-1]
        expanded = in_channels * self.expansion
        y = self.conv(features=expanded, kernel_size=1, name='expand_conv')(x, train)
        y = self.conv(features=expanded, kernel_size=self.kernel_size, stride=self.stride,
                      groups=expanded, name='dwconv')(y, train)
        if self.se_ratio > 0:
            y = self.squeeze_excite(squeeze_channels=int(in_channels * self.se_ratio),
                                    name='se')(y)
        y = self.conv(features=self.out_channels, kernel_size=1, activation=None,
                      name='project_conv')(y, train)
        if self.stride == 1 and in_channels == self.out_channels:
            y = DropPath(rate=self.drop_path_rate)(y, deterministic=not train) + x
        return y


BLOCKS = {'fused': FusedMBConv, 'mbconv': MBConv}


class EfficientNetV2(nn.Module):
    """EfficientNetV2 (arXiv:2104.00298) over NHWC images.

    `__call__(x, train)` takes x (N, H, W, 3) float and returns float32 logits (N, num_classes);
    pooled features (N, head_channels) when `num_classes == 0`; with `features_only`, a list with
    the feature map at the end of every stage, (N, H_s, W_s, C_s) each. `train=True` uses batch
    statistics (pass `mutable=['batch_stats']`) and needs the `dropout` and `drop_path` RNG
    streams when those rates are non-zero; `train=False` is deterministic. How convolutions are
    computed is no field: it is chosen per platform when compiled, or for a whole model with
    `effnetv2_jax.kernels.use_implementation`.

    Attributes:
        variant: the architecture (see `effnetv2_jax.configs`).
        num_classes: classifier outputs; 0 for no classifier (pooled features out).
        dropout_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, growing linearly from 0 at the first block to this.
        padding: 'symmetric' (PyTorch: torchvision, timm, WZMIAOMIAO's model.py) or 'same'
            (TensorFlow, timm `tf_*`).
        bn_eps, bn_momentum: BatchNorm epsilon and weight of the old running statistics.
        dtype: compute dtype; BatchNorm statistics and the logits stay float32.
        param_dtype: parameter dtype.
        remat: recompute each block's activations in the backward pass (less memory).
        features_only: return the stage outputs instead of the logits.
    """

    variant: Variant
    num_classes: int = 1000
    dropout_rate: float = 0.2
    drop_path_rate: float = 0.2
    padding: str = 'symmetric'
    bn_eps: float = 1e-3
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    features_only: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(
            ConvBNAct, padding=self.padding, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
            dtype=self.dtype, param_dtype=self.param_dtype)
        squeeze_excite = functools.partial(
            SqueezeExcite, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        x = conv(features=self.variant.stem_channels, kernel_size=3, stride=2, name='stem')(
            x, train)

        stage_outputs = []
        block_id, total = 0, self.variant.num_blocks
        for stage in self.variant.stages:
            block_cls = BLOCKS[stage.block]
            if self.remat:
                block_cls = nn.remat(block_cls, static_argnums=(2,))
            extra = ({'se_ratio': stage.se_ratio, 'squeeze_excite': squeeze_excite}
                     if stage.block == 'mbconv' else {'single_conv': stage.single_conv})
            for j in range(stage.repeats):
                x = block_cls(
                    out_channels=stage.out_channels, expansion=stage.expansion,
                    stride=stage.stride if j == 0 else 1, kernel_size=stage.kernel_size,
                    drop_path_rate=self.drop_path_rate * block_id / total, conv=conv,
                    name=f'blocks_{block_id}', **extra)(x, train)
                block_id += 1
            stage_outputs.append(x)
        if self.features_only:
            return stage_outputs

        x = conv(features=self.variant.head_channels, kernel_size=1, name='head_conv')(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes == 0:
            return x
        x = nn.Dropout(rate=self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(features=self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(0.01), name='classifier')(x)


def list_models() -> list[str]:
    """Names accepted by `create_model`: 's', 'm', 'l', 'xl', 'b0'..'b3', 'rw_t', 'rw_s', 'rw_m'."""
    return list(VARIANTS)


def create_model(name: str, num_classes: int = 1000, **overrides) -> EfficientNetV2:
    """Builds an `EfficientNetV2` linen module with the variant's default rates.

    A timm model name implies timm's padding and BN eps (`tf_efficientnetv2_b0`: 'same', 1e-3;
    `efficientnetv2_rw_t`: symmetric, 1e-5); `efficientnetv2_s` (m, l, xl), which is also
    WZMIAOMIAO's name for an eps-1e-3 model, is a ValueError unless `bn_eps` is given; other
    names ('s', 'EfficientNetV2-S', 'efficientnet_v2_s') take the fields' defaults
    (`configs.implied_by_name`). `overrides` are `EfficientNetV2` field names (`dropout_rate`,
    `drop_path_rate`, `padding`, `bn_eps`, `bn_momentum`, `dtype`, `param_dtype`, `remat`,
    `features_only`) and win over the name; any other name raises TypeError.
    """
    variant = get_variant(name)
    fields = {f.name for f in dataclasses.fields(EfficientNetV2)} - {'parent', 'name', 'variant'}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown override(s) {sorted(unknown)}; valid: {sorted(fields)}')
    kwargs = {'dropout_rate': variant.dropout_rate, 'drop_path_rate': variant.drop_path_rate,
              **implied_by_name(name, overrides.get('bn_eps'))}
    kwargs.update(overrides)
    return EfficientNetV2(variant=variant, num_classes=num_classes, **kwargs)


def abstract_variables(model: nn.Module, image_size: int = 32) -> dict:
    """`model`'s variables as `jax.ShapeDtypeStruct`s, without running its initialisers.

    Shapes do not depend on `image_size` (>= 32 for every variant's strides); float32 input.
    """
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
