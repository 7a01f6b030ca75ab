"""Shared test helpers: randomized PyTorch models, real photos, conversion through the CLI."""
from __future__ import annotations

import math
import os

# Tests must not grab every core's worth of threads twice (torch and XLA side by side).
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=true')

import numpy as np
import pytest
import torch

import effnetv2_jax
from convert.__main__ import main as convert_main


RESIDUAL_BRANCH_GAIN = 0.1  # trained nets have small last-BN gammas (timm zero-inits them); at
# gain 1 a random 100-block net is chaotic and amplifies fp32 rounding ~1e4-fold (measured)


def _is_residual_block(module) -> bool:
    # seed reference / torchvision / timm spell the flag differently
    return any(getattr(module, flag, False) is True
               for flag in ('has_shortcut', 'use_res_connect', 'has_skip'))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, calibration_size: int = 64) -> torch.nn.Module:
    """Random weights, BN affine parameters and BN running statistics; returns it in eval mode.

    Conv/linear weights are He-normal. Each BN's running statistics are set, in one eval-mode
    pass over a random batch, to the statistics of the input that BN actually receives, perturbed
    per channel (variance x U(0.8, 1.2), mean + 0.1 sigma N(0, 1)). So no statistic equals its
    default (a mapping that swaps or drops mean/var/scale/bias cannot pass), and yet activations
    stay O(1) through 100 blocks: a BN downstream of a perturbed one sees the perturbed
    activations, so perturbations do not compound into a chaotic, ill-conditioned network.
    """
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.copy_(randn(*m.weight.shape) * math.sqrt(2.0 / m.weight[0].numel()))
            if m.bias is not None:
                m.bias.copy_(randn(*m.bias.shape) * 0.1)

    def calibrate(bn, inputs):
        x = inputs[0].transpose(0, 1).flatten(1)  # (C, N*H*W)
        bn.running_var.copy_(x.var(1) * (0.8 + 0.4 * rand(bn.num_features)))
        bn.running_mean.copy_(x.mean(1) + 0.1 * randn(bn.num_features) * x.std(1))

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(0.5 + rand(m.num_features))
            m.bias.copy_(randn(m.num_features) * 0.2)
            hooks.append(m.register_forward_pre_hook(calibrate))
    for block in filter(_is_residual_block, model.modules()):
        last_bn = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        last_bn.weight.mul_(RESIDUAL_BRANCH_GAIN)
        last_bn.bias.mul_(RESIDUAL_BRANCH_GAIN)
    model.eval()
    model(randn(4, 3, calibration_size, calibration_size))
    for hook in hooks:
        hook.remove()
    return model


def convert(torch_model: torch.nn.Module, directory, *flags: str, name: str = 'ckpt'):
    """Saves `torch_model`'s state_dict, converts it with `python -m convert` (in process) and
    returns `(flax_model, variables, metadata)` loaded from the converter's output."""
    source = directory / f'{name}.pth'
    torch.save(torch_model.state_dict(), source)
    output = directory / f'{name}.msgpack'
    assert convert_main([str(source), '-o', str(output), *flags]) == 0
    model, variables = effnetv2_jax.load(output)
    return model, variables, effnetv2_jax.checkpoint.read(output)[1]


def real_photos(size: int) -> np.ndarray:
    """scikit-image's sample photos (cat, coffee, astronaut, rocket), center-cropped to a square,
    resized to `size` and normalised with mean = std = 0.5: (4, size, size, 3) float32."""
    from PIL import Image
    from skimage import data
    photos = []
    for image in (data.chelsea(), data.coffee(), data.astronaut(), data.rocket()):
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = Image.fromarray(image[top:top + side, left:left + side])
        resized = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32) / 255.0
        photos.append((resized - 0.5) / 0.5)
    return np.stack(photos)


@pytest.fixture(scope='session', autouse=True)
def _torch_threads():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
