"""Runs converted weights in PyTorch and in Flax on the same batch and compares the logits."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from convert.layouts import Family
from convert.torch_io import CheckpointError

TOLERANCE = 1e-5  # max |Δ logit| relative to max |logit|, fp32 on CPU; ports reach ~1e-6


def torch_model(family: Family, metadata: dict[str, Any], state_dict: dict[str, np.ndarray]):
    """`family`'s PyTorch model of the metadata's variant and classes, in eval mode, with
    `state_dict` loaded and the metadata's BN eps where the family takes one.

    The model pads as its family does, whatever the metadata says: --verify then shows what a
    padding that departs from the source's models does to the outputs.
    """
    import torch
    try:
        model = family.torch_model(metadata['variant'], metadata['num_classes'],
                                   metadata['bn_eps'])
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
