"""Our PyTorch reference: EfficientNetV2 with the module tree and state_dict keys of WZMIAOMIAO's
`model.py` (github.com/WZMIAOMIAO/deep-learning-for-image-processing,
pytorch_classification/Test11_efficientnetV2).

Built from the same `Variant` configs as the Flax model, so it covers every official variant
(not timm's own `rw_*`, whose blocks model.py lacks). Used by the converter's `--verify` and
`--to-torch` and by the equivalence tests; imports torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effnetv2_jax.configs import Variant, get_variant


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Zeroes whole samples with probability `rate` and rescales the others by 1/(1-rate)."""
    if rate == 0.0 or not training:
        return x
    keep_prob = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    return x / keep_prob * (mask < keep_prob).to(x.dtype)


class ConvBNAct(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + optional SiLU; padding 'symmetric' or TF 'same'."""

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, groups=1, activation=True,
                 bn_eps=1e-3, padding='symmetric'):
        super().__init__()
        self.kernel_size, self.stride, self.same = kernel_size, stride, padding == 'same'
        pad = 0 if self.same else (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=0.1)
        self.act = nn.SiLU() if activation else nn.Identity()

    def forward(self, x):
        if self.same:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
                total = max((-(-size // self.stride) - 1) * self.stride + self.kernel_size - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, block_in_ch, expanded_ch, se_ratio):
        super().__init__()
        squeeze_ch = int(block_in_ch * se_ratio)
        self.conv_reduce = nn.Conv2d(expanded_ch, squeeze_ch, 1)
        self.conv_expand = nn.Conv2d(squeeze_ch, expanded_ch, 1)

    def forward(self, x):
        scale = F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.conv_expand(scale))


class FusedMBConv(nn.Module):
    def __init__(self, in_ch, out_ch, expansion, stride, kernel_size, drop_rate, **conv_kw):
        super().__init__()
        self.has_shortcut = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate
        if expansion == 1:
            self.project_conv = ConvBNAct(in_ch, out_ch, kernel_size, stride, **conv_kw)
        else:
            mid = in_ch * expansion
            self.expand_conv = ConvBNAct(in_ch, mid, kernel_size, stride, **conv_kw)
            self.project_conv = ConvBNAct(mid, out_ch, 1, activation=False, **conv_kw)

    def forward(self, x):
        y = self.expand_conv(x) if hasattr(self, 'expand_conv') else x
        y = self.project_conv(y)
        if self.has_shortcut:
            y = drop_path(y, self.drop_rate, self.training) + x
        return y


class MBConv(nn.Module):
    def __init__(self, in_ch, out_ch, expansion, stride, kernel_size, drop_rate, se_ratio,
                 **conv_kw):
        super().__init__()
        self.has_shortcut = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate
        mid = in_ch * expansion
        self.expand_conv = ConvBNAct(in_ch, mid, 1, **conv_kw)
        self.dwconv = ConvBNAct(mid, mid, kernel_size, stride, groups=mid, **conv_kw)
        self.se = SqueezeExcite(in_ch, mid, se_ratio) if se_ratio > 0 else nn.Identity()
        self.project_conv = ConvBNAct(mid, out_ch, 1, activation=False, **conv_kw)

    def forward(self, x):
        y = self.project_conv(self.se(self.dwconv(self.expand_conv(x))))
        if self.has_shortcut:
            y = drop_path(y, self.drop_rate, self.training) + x
        return y


class Head(nn.Sequential):
    def __init__(self, in_ch, features, num_classes, dropout_rate, **conv_kw):
        super().__init__()
        self.project_conv = ConvBNAct(in_ch, features, 1, **conv_kw)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        if dropout_rate > 0:
            self.dropout = nn.Dropout(dropout_rate)
        self.classifier = nn.Linear(features, num_classes)


class EfficientNetV2(nn.Module):
    """WZMIAOMIAO's EfficientNetV2: `stem`, `blocks.<g>`, `head.{project_conv,classifier}`. NCHW."""

    def __init__(self, variant: Variant, num_classes=1000, dropout_rate=None, drop_path_rate=None,
                 bn_eps=1e-3, padding='symmetric'):
        super().__init__()
        dropout_rate = variant.dropout_rate if dropout_rate is None else dropout_rate
        drop_path_rate = variant.drop_path_rate if drop_path_rate is None else drop_path_rate
        conv_kw = {'bn_eps': bn_eps, 'padding': padding}
        self.stem = ConvBNAct(3, variant.stem_channels, 3, 2, **conv_kw)
        blocks, in_ch = [], variant.stem_channels
        for stage in variant.stages:
            for j in range(stage.repeats):
                rate = drop_path_rate * len(blocks) / variant.num_blocks
                stride = stage.stride if j == 0 else 1
                if stage.block == 'fused':
                    block = FusedMBConv(in_ch, stage.out_channels, stage.expansion, stride,
                                        stage.kernel_size, rate, **conv_kw)
                else:
                    block = MBConv(in_ch, stage.out_channels, stage.expansion, stride,
                                   stage.kernel_size, rate, stage.se_ratio, **conv_kw)
                blocks.append(block)
                in_ch = stage.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(in_ch, variant.head_channels, num_classes, dropout_rate, **conv_kw)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def create(name: str, num_classes: int = 1000, **kwargs) -> EfficientNetV2:
    """The reference model of an official variant name ('s', 'b0', ...), randomly initialised;
    ValueError for timm's own variants."""
    variant = get_variant(name)
    if variant.source != 'official':
        raise ValueError(f"WZMIAOMIAO's model.py has no EfficientNetV2-{variant.name.upper()}")
    return EfficientNetV2(variant, num_classes, **kwargs)


RESIDUAL_BRANCH_GAIN = 0.1  # trained nets have small last-BN gammas (timm zero-inits them); at
# gain 1 a random 100-block net is chaotic and amplifies fp32 rounding ~1e4-fold (measured)


def _is_residual_block(module) -> bool:
    # our reference / torchvision / timm spell the flag differently
    return any(getattr(module, flag, False) is True
               for flag in ('has_shortcut', 'use_res_connect', 'has_skip'))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, calibration_size: int = 64) -> torch.nn.Module:
    """Random weights, BN affine parameters and BN running statistics; returns it in eval mode.

    For tests and demos of any of the three layouts: default initialisations give near-constant
    logits (torchvision's are ~1e-6), which would make a comparison meaningless.

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
