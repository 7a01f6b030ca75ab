"""EfficientNetV2 variant configurations, as data, in one registry.

Values follow the paper (arXiv:2104.00298, Table 4 and the appendix), its official TensorFlow code
(google/automl, efficientnetv2/effnetv2_configs.py) and WZMIAOMIAO's PyTorch `model.py`.
"""
from __future__ import annotations

from typing import NamedTuple


class Stage(NamedTuple):
    """One stage: `repeats` blocks of one kind; only the first block strides and changes width."""

    block: str  # 'fused' (FusedMBConv) or 'mbconv' (MBConv with squeeze-excite)
    repeats: int
    stride: int
    expansion: int
    out_channels: int
    kernel_size: int = 3
    se_ratio: float = 0.0  # squeeze width = block input channels * se_ratio


class Variant(NamedTuple):
    """A whole network: stem, stages, head, and its default sizes and regularisation."""

    name: str
    stem_channels: int
    stages: tuple[Stage, ...]
    head_channels: int
    train_size: int
    eval_size: int
    dropout_rate: float
    drop_path_rate: float = 0.2

    @property
    def num_blocks(self) -> int:
        return sum(stage.repeats for stage in self.stages)


def _fused(repeats, stride, expansion, out_channels):
    return Stage('fused', repeats, stride, expansion, out_channels)


def _mbconv(repeats, stride, expansion, out_channels):
    return Stage('mbconv', repeats, stride, expansion, out_channels, se_ratio=0.25)


def _b_series(name, stem, widths, repeats, head, train_size, eval_size, dropout_rate):
    """The B0..B3 family shares strides and expansions; only widths and depths differ."""
    kinds = (_fused, _fused, _fused, _mbconv, _mbconv, _mbconv)
    strides = (1, 2, 2, 2, 1, 2)
    expansions = (1, 4, 4, 4, 6, 6)
    stages = tuple(
            kind(r, s, e, w) for kind, r, s, e, w in zip(kinds, repeats, strides, expansions, widths))
    return Variant(name, stem, stages, head, train_size, eval_size, dropout_rate)


_B0_WIDTHS = (16, 32, 48, 96, 112, 192)

VARIANTS: dict[str, Variant] = {v.name: v for v in (
        Variant('s', 24, (
                _fused(2, 1, 1, 24), _fused(4, 2, 4, 48), _fused(4, 2, 4, 64),
                _mbconv(6, 2, 4, 128), _mbconv(9, 1, 6, 160), _mbconv(15, 2, 6, 256),
        ), 1280, train_size=300, eval_size=384, dropout_rate=0.2),
        Variant('m', 24, (
                _fused(3, 1, 1, 24), _fused(5, 2, 4, 48), _fused(5, 2, 4, 80),
                _mbconv(7, 2, 4, 160), _mbconv(14, 1, 6, 176), _mbconv(18, 2, 6, 304),
                _mbconv(5, 1, 6, 512),
        ), 1280, train_size=384, eval_size=480, dropout_rate=0.3),
        Variant('l', 32, (
                _fused(4, 1, 1, 32), _fused(7, 2, 4, 64), _fused(7, 2, 4, 96),
                _mbconv(10, 2, 4, 192), _mbconv(19, 1, 6, 224), _mbconv(25, 2, 6, 384),
                _mbconv(7, 1, 6, 640),
        ), 1280, train_size=384, eval_size=480, dropout_rate=0.4),
        Variant('xl', 32, (
                _fused(4, 1, 1, 32), _fused(8, 2, 4, 64), _fused(8, 2, 4, 96),
                _mbconv(16, 2, 4, 192), _mbconv(24, 1, 6, 256), _mbconv(32, 2, 6, 512),
                _mbconv(8, 1, 6, 640),
        ), 1280, train_size=384, eval_size=512, dropout_rate=0.4),
        _b_series('b0', 32, _B0_WIDTHS, (1, 2, 2, 3, 5, 8), 1280, 192, 224, 0.2),
        _b_series('b1', 32, _B0_WIDTHS, (2, 3, 3, 4, 6, 9), 1280, 192, 240, 0.2),
        _b_series('b2', 32, (16, 32, 56, 104, 120, 208), (2, 3, 3, 4, 6, 10), 1408, 208, 260, 0.3),
        _b_series('b3', 40, (16, 40, 56, 112, 136, 232), (2, 3, 3, 5, 7, 12), 1536, 240, 300, 0.3),
)}


def get_variant(name: str) -> Variant:
    """Looks a variant up by name ('s', 'efficientnetv2_s' and 'EfficientNetV2-S' all work)."""
    key = name.lower().replace('-', '_')
    for prefix in ('tf_', 'efficientnetv2_', 'efficientnet_v2_'):
        key = key.removeprefix(prefix)
    if key not in VARIANTS:
        raise ValueError(f'unknown variant {name!r}; known: {", ".join(VARIANTS)}')
    return VARIANTS[key]
