"""Runs converted weights in PyTorch and in Flax on the same batch and compares the logits.

The PyTorch side: a builder of each layout family's models (`BUILDERS`), which the torch-free
layouts (effnetv2_jax.layouts) leave to this module.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from effnetv2_jax.converter import CheckpointError
from effnetv2_jax.layouts import TIMM, TORCHVISION, WZMIAOMIAO, Family, Layout

TOLERANCE = 1e-5  # max |Δ logit| relative to max |logit|, fp32 on CPU; ports reach ~1e-6


def _build_reference(name: str, num_classes: int, bn_eps: float):
    from convert import torch_reference
    return torch_reference.create(name, num_classes)  # the model.py's own eps, 1e-3


def _build_torchvision(name: str, num_classes: int, bn_eps: float):
    import torchvision
    return getattr(torchvision.models, name)(num_classes=num_classes)


def _build_timm(name: str, num_classes: int, bn_eps: float):
    try:
        import timm
        import torch
    except ImportError:
        raise ValueError('verifying timm weights needs timm: pip install timm') from None
    module = timm.create_model(name, pretrained=False, num_classes=num_classes)
    for layer in module.modules():  # timm's models take their eps from the weights' source
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.eps = bn_eps
    return module


# (layout name, family model pattern) -> (model name, num_classes, bn_eps) -> torch.nn.Module
BUILDERS: dict[tuple[str, str], Callable] = {
    (WZMIAOMIAO.name, WZMIAOMIAO.families[0].model): _build_reference,
    (TORCHVISION.name, TORCHVISION.families[0].model): _build_torchvision,
    **{(TIMM.name, family.model): _build_timm for family in TIMM.families},
}


def torch_model(layout: Layout, family: Family, metadata: dict[str, Any],
                state_dict: dict[str, np.ndarray]):
    """`family`'s PyTorch model of the metadata's variant and classes, in eval mode, with
    `state_dict` loaded and the metadata's BN eps where the family takes one.

    The model pads as its family does, whatever the metadata says: --verify then shows what a
    padding that departs from the source's models does to the outputs.
    """
    import torch
    variant = metadata['variant']
    if variant not in family.variants:
        raise CheckpointError(f'there is no {family.model_name(variant)}')
    build = BUILDERS[layout.name, family.model]
    try:
        model = build(family.model_name(variant), metadata['num_classes'],
                      metadata['bn_eps']).eval()
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    tensors = {k: torch.from_numpy(np.array(v, order='C')) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        raise CheckpointError(f'{family.model_name(metadata["variant"])} does not take these '
                              f'weights: missing {missing[:5]}, unexpected {unexpected[:5]}')
    return model


class Comparison(NamedTuple):
    max_abs_diff: float
    max_abs_logit: float
    same_top1: bool

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-12)


def compare(torch_module, flax_model, variables, images_nhwc: np.ndarray) -> Comparison:
    """Eval-mode outputs of both models on `images_nhwc` (N, H, W, 3) float32."""
    import jax
    import torch
    with torch.no_grad():
        expected = torch_module(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(jax.jit(flax_model.apply)(variables, images_nhwc))
    same_top1 = expected.ndim < 2 or bool(np.all(expected.argmax(-1) == got.argmax(-1)))
    return Comparison(float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected))),
                      same_top1)


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """A normalised-looking random batch (N, size, size, 3) float32."""
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32)
