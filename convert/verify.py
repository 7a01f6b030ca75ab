"""Runs converted weights in PyTorch and in Flax on the same batch and compares the logits."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from convert.torch_io import CheckpointError

TOLERANCE = 1e-5  # max |Δ logit| relative to max |logit|, fp32 on CPU; ports reach ~1e-6


def torch_model(layout: str, metadata: dict[str, Any], state_dict: dict[str, np.ndarray]):
    """The PyTorch model that natively reads `layout`, in eval mode, with `state_dict` loaded.

    seed: our reference of the seed architecture (symmetric padding, BN eps 1e-3, as the seed's
    `model.py`); torchvision: `efficientnet_v2_{s,m,l}` (the same); timm: `tf_efficientnetv2_*`
    for 'same' padding, else `efficientnetv2_*`, with the metadata's BN eps. Seed and torchvision
    ignore the metadata's padding and eps on purpose: --verify then shows what flags that depart
    from those models do to the outputs.
    """
    import torch
    name, num_classes = metadata['variant'], metadata['num_classes']
    padding, bn_eps = metadata['padding'], metadata['bn_eps']
    if layout == 'seed':
        from convert import torch_reference
        model = torch_reference.create(name, num_classes)
    elif layout == 'torchvision':
        if name not in ('s', 'm', 'l'):
            raise CheckpointError(f'torchvision has no EfficientNetV2-{name.upper()}')
        import torchvision
        model = getattr(torchvision.models, f'efficientnet_v2_{name}')(num_classes=num_classes)
    elif layout == 'timm':
        try:
            import timm
        except ImportError:
            raise CheckpointError('verifying timm weights needs timm: pip install timm') from None
        timm_name = f'{"tf_" if padding == "same" else ""}efficientnetv2_{name}'
        if timm_name not in timm.list_models():
            raise CheckpointError(f'timm has no {timm_name} to verify against')
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = bn_eps
    else:
        raise CheckpointError(f'unknown layout {layout!r}')
    tensors = {k: torch.from_numpy(np.array(v, order='C')) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        raise CheckpointError(f'{layout} model does not take these weights: missing {missing[:5]}'
                              f', unexpected {unexpected[:5]}')
    return model.eval()


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
