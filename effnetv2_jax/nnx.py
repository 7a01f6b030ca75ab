"""EfficientNetV2 for Flax NNX: the linen model inside an `nnx.Module`, with its state as NNX
variables and PyTorch's train/eval switch.

    from effnetv2_jax import nnx as effnet_nnx
    model = effnet_nnx.load('hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k')  # or a weights file
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, images)   # float32 [N, 384, 384, 3] -> [N, 1000]
    model.train()   # batch statistics; running statistics updated in place; dropout, drop path

The architecture has one source of truth, the linen `effnetv2_jax.model.EfficientNetV2`: this
module holds its variables as `nnx.Param` (`params`) and `nnx.BatchStat` (`batch_stats`), under
the same paths as in linen, and calls it with `train=` set by `train()` / `eval()` and the
BatchNorm statistics collection mutable in training mode, so PyTorch's BatchNorm semantics
(momentum, unbiased running variance) carry over unchanged. `nnx.bridge.ToNNX` alone would not:
it leaves `train=` to the caller and freezes the statistics unless `mutable=['batch_stats']` is
passed on every call. Why a wrapper and not native NNX modules: docs/nnx.md.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnetv2_jax import checkpoint
from effnetv2_jax.model import EfficientNetV2 as LinenEfficientNetV2
from effnetv2_jax.model import create_model as create_linen_model

COLLECTIONS = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class EfficientNetV2(nnx.Module):
    """An NNX EfficientNetV2 over a linen `EfficientNetV2` and its variables.

    `model(images)` takes NHWC float images (N, H, W, 3) and returns what the linen module
    returns (float32 logits (N, num_classes), pooled features, or stage feature maps). In
    training mode (`model.train()`, the NNX default at construction) BatchNorm normalises with
    batch statistics and updates `batch_stats` in place, and dropout and drop path draw from the
    `dropout` and `drop_path` streams of `rngs` (default stream otherwise); in evaluation mode
    (`model.eval()`) it is deterministic.
    """

    def __init__(self, module: LinenEfficientNetV2, variables: dict, *,
                 rngs: nnx.Rngs | None = None, metadata: dict[str, Any] | None = None):
        self.module = module  # static: the architecture and its options
        self.metadata = dict(metadata or {})  # static: the weights' eval transform, class names
        self.params = nnx.data(jax.tree.map(nnx.Param, variables['params']))
        self.batch_stats = nnx.data(jax.tree.map(nnx.BatchStat, variables['batch_stats']))
        self.rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.deterministic = False  # set by train() / eval()

    def linen_variables(self) -> dict:
        """`{'params', 'batch_stats'}` as linen takes them (arrays, same paths)."""
        value = lambda v: v.get_value()
        return {'params': jax.tree.map(value, self.params, is_leaf=_is_variable),
                'batch_stats': jax.tree.map(value, self.batch_stats, is_leaf=_is_variable)}

    def __call__(self, images: jax.Array):
        variables = self.linen_variables()
        if self.deterministic:
            return self.module.apply(variables, images, train=False)
        rngs = {'dropout': self.rngs.dropout(), 'drop_path': self.rngs.drop_path()}
        out, updates = self.module.apply(variables, images, train=True, rngs=rngs,
                                         mutable=['batch_stats'])
        jax.tree.map(lambda var, new: var.set_value(new), self.batch_stats,
                     updates['batch_stats'], is_leaf=_is_variable)
        return out


def from_linen(module: LinenEfficientNetV2, variables: dict, *, rngs: nnx.Rngs | None = None,
               metadata: dict[str, Any] | None = None) -> EfficientNetV2:
    """The NNX model of a linen module and its `{'params', 'batch_stats'}` (copied)."""
    variables = jax.tree.map(jnp.asarray, {k: variables[k] for k in COLLECTIONS})
    return EfficientNetV2(module, variables, rngs=rngs, metadata=metadata)


def to_linen(model: EfficientNetV2) -> tuple[LinenEfficientNetV2, dict]:
    """`(linen module, variables)` with the NNX model's current state."""
    return model.module, model.linen_variables()


@functools.lru_cache(maxsize=8)
def _initialiser(module: LinenEfficientNetV2):
    """A jitted `key -> module.init(...)`'s variables (from a 32 px image: shapes do not depend
    on it). Cached per module, so that models of one architecture compile it once."""
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return jax.jit(lambda key: module.init(key, images, train=False))


def create_model(name: str, num_classes: int = 1000, *, rngs: nnx.Rngs, **overrides
                 ) -> EfficientNetV2:
    """A freshly initialised model (parameters from `rngs.params()`); `name` and `overrides`
    as in `effnetv2_jax.create_model` (`dropout_rate`, `drop_path_rate`, `dtype`, `remat`,
    `features_only`, ...; `num_classes=0` for pooled features)."""
    module = create_linen_model(name, num_classes=num_classes, **overrides)
    return from_linen(module, _initialiser(module)(rngs.params()), rngs=rngs)


def load(path: str | os.PathLike, *, rngs: nnx.Rngs | None = None, **overrides
         ) -> EfficientNetV2:
    """The model of a weights file or pretrained name (see `effnetv2_jax.checkpoint.read`),
    `overrides` as in `create_model`. Another `num_classes` keeps everything but the classifier,
    which is initialised afresh from `rngs.params()` (none for 0: pooled features). The file's
    metadata (eval transform, class names) is kept as `model.metadata`. Like every NNX module it
    starts in training mode: call `model.eval()` to predict."""
    variables, metadata = checkpoint.read(path)
    module = checkpoint.build_model(metadata, **overrides)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if module.num_classes != metadata['num_classes']:
        variables = checkpoint.fit_classifier(module, variables, rngs.params())
        metadata = {k: v for k, v in metadata.items() if k != 'class_names'}
    return from_linen(module, variables, rngs=rngs, metadata=metadata)


def save(model: EfficientNetV2, path: str | os.PathLike, fmt: str = 'msgpack'):
    """Writes the model's current state as a weights file (`effnetv2_jax.save`'s format, which
    `load`, `effnetv2_jax.load`, `Predictor` and the converter read)."""
    module, variables = to_linen(model)
    # The file's eval transform and class names; not its format_version: save writes its own.
    kept = {k: v for k, v in model.metadata.items() if k != 'format_version'}
    metadata = checkpoint.model_metadata(module, **kept)
    checkpoint.save(path, jax.tree.map(np.asarray, variables), metadata, fmt=fmt)
