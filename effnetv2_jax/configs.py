"""EfficientNetV2 variant configurations, as data, in one registry.

The official variants follow the paper (arXiv:2104.00298, Table 4 and the appendix), its
TensorFlow code (google/automl, efficientnetv2/effnetv2_configs.py) and WZMIAOMIAO's PyTorch
`model.py`. `rw_t`, `rw_s` and `rw_m` are timm's own EfficientNetV2s (`efficientnetv2_rw_*`),
which exist only in timm.
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
    # A fused block of expansion 1 is one kxk conv with activation (the paper, WZMIAOMIAO,
    # torchvision, timm's 'cn'); with `fused_project` it keeps the 1x1 project conv as with a
    # larger expansion: kxk conv + BN + act, 1x1 conv + BN (timm's 'er' block in rw_s, rw_m).
    fused_project: bool = False

    @property
    def single_conv(self) -> bool:
        """Whether each block of this stage is one kxk ConvBNAct (a fused stage of expansion 1)."""
        return self.block == 'fused' and self.expansion == 1 and not self.fused_project


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
    source: str = 'official'  # 'official' (paper and google/automl) or 'timm' (timm's own)

    @property
    def num_blocks(self) -> int:
        return sum(stage.repeats for stage in self.stages)


def _fused(repeats, stride, expansion, out_channels):
    return Stage('fused', repeats, stride, expansion, out_channels)


def _fused_project(repeats, stride, expansion, out_channels):
    return Stage('fused', repeats, stride, expansion, out_channels, fused_project=True)


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
        # timm's `_gen_efficientnetv2_s` (timm/models/efficientnet.py) scales S's arch_def: widths
        # by round_channels(c * channel multiplier) (to a multiple of 8, at least 90% of c *
        # multiplier), repeats by ceil(r * depth multiplier); rw=True makes the first stage 'er'
        # (fused_project), the last 272 wide and the head 1792. The numbers it builds, written
        # out. Sizes: its pretrained configs (train input_size / test_input_size). Its training
        # recipes give no dropout or drop path rate: those of the official S and M.
        # efficientnetv2_rw_t: channel multiplier 0.8, depth 0.9, rw=False.
        Variant('rw_t', 24, (
                _fused(2, 1, 1, 24), _fused(4, 2, 4, 40), _fused(4, 2, 4, 48),
                _mbconv(6, 2, 4, 104), _mbconv(9, 1, 6, 128), _mbconv(14, 2, 6, 208),
        ), 1024, train_size=224, eval_size=288, dropout_rate=0.2, source='timm'),
        # efficientnetv2_rw_s: multipliers 1.0, rw=True.
        Variant('rw_s', 24, (
                _fused_project(2, 1, 1, 24), _fused(4, 2, 4, 48), _fused(4, 2, 4, 64),
                _mbconv(6, 2, 4, 128), _mbconv(9, 1, 6, 160), _mbconv(15, 2, 6, 272),
        ), 1792, train_size=288, eval_size=384, dropout_rate=0.2, source='timm'),
        # efficientnetv2_rw_m: channel multiplier 1.2 (stem too: 24 -> 32), depth 1.2 for the
        # first four stages and 1.6 for the last two, rw=True.
        Variant('rw_m', 32, (
                _fused_project(3, 1, 1, 32), _fused(5, 2, 4, 56), _fused(5, 2, 4, 80),
                _mbconv(8, 2, 4, 152), _mbconv(15, 1, 6, 192), _mbconv(24, 2, 6, 328),
        ), 2152, train_size=320, eval_size=416, dropout_rate=0.3, source='timm'),
)}

# The paper's and google/automl's variants, which WZMIAOMIAO's model.py and timm's tf_ models
# build; timm's own (`source='timm'`) exist only as timm's symmetric-padding models.
OFFICIAL_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.source == 'official')


class TimmFamily(NamedTuple):
    """One of timm's two EfficientNetV2 families: the prefix of its model names, the padding and
    BatchNorm epsilon its models use, and the variants it has."""
    prefix: str
    padding: str
    bn_eps: float
    variants: tuple[str, ...]


# timm's ports of the TensorFlow weights pad as TensorFlow does ('same') with its eps; timm's
# own models pad symmetrically with PyTorch's eps. Both have S, M, L and XL, with the same
# tensors: only the name tells them apart.
TIMM_TF = TimmFamily('tf_efficientnetv2_', 'same', 1e-3, OFFICIAL_VARIANTS)
TIMM_OWN = TimmFamily('efficientnetv2_', 'symmetric', 1e-5,
                      ('s', 'm', 'l', 'xl', 'rw_t', 'rw_s', 'rw_m'))
TIMM_FAMILIES = (TIMM_TF, TIMM_OWN)


def get_variant(name: str) -> Variant:
    """Looks a variant up by name ('s', 'efficientnetv2_s' and 'EfficientNetV2-S' all work)."""
    key = name.lower().replace('-', '_')
    for prefix in ('tf_', 'efficientnetv2_', 'efficientnet_v2_'):
        key = key.removeprefix(prefix)
    if key not in VARIANTS:
        raise ValueError(f'unknown variant {name!r}; known: {", ".join(VARIANTS)}')
    return VARIANTS[key]


def timm_model(name: str) -> tuple[Variant, TimmFamily]:
    """The variant and family of timm's EfficientNetV2 called `name` ('tf_efficientnetv2_s',
    'efficientnetv2_rw_t'; any case); ValueError (one line) for a name timm has no model of."""
    lower = name.lower()
    family = next((f for f in TIMM_FAMILIES if lower.startswith(f.prefix)), None)
    variant = family and lower.removeprefix(family.prefix)
    if family is None or variant not in family.variants:
        models = ', '.join(f'{f.prefix}{{{",".join(f.variants)}}}' for f in TIMM_FAMILIES)
        raise ValueError(f"timm has no EfficientNetV2 called {name!r}; timm's are {models}")
    return VARIANTS[variant], family


def implied_by_name(name: str, bn_eps: float | None = None) -> dict[str, object]:
    """The `padding` and `bn_eps` that the model name `name` implies, as model fields ({} where
    it implies none).

    timm's names imply timm's conventions: `tf_efficientnetv2_*` 'same' padding and eps 1e-3,
    `efficientnetv2_rw_*` symmetric and 1e-5. `efficientnetv2_s` (`_m`, `_l`, `_xl`) is both
    timm's model (eps 1e-5) and the function of WZMIAOMIAO's model.py (eps 1e-3), both
    symmetric: ValueError unless `bn_eps` says which. Other spellings (`'s'`, the paper's
    `'EfficientNetV2-S'`, torchvision's `'efficientnet_v2_s'`) imply nothing.
    """
    lower = name.lower()
    if not lower.startswith(tuple(f.prefix for f in TIMM_FAMILIES)):
        return {}
    variant, family = timm_model(name)
    if family is TIMM_OWN and variant.name in TIMM_TF.variants:
        if bn_eps is None:
            timm_eps = f'{TIMM_OWN.bn_eps:.0e}'.replace('e-0', 'e-')  # 1e-5
            raise ValueError(
                f"{name!r} names both timm's model (BN eps {timm_eps}) and the function of "
                f"WZMIAOMIAO's model.py (BN eps 1e-3); say {variant.name!r} (WZMIAOMIAO's and "
                f"torchvision's conventions) or {TIMM_TF.prefix + variant.name!r}, or pass "
                f"bn_eps={timm_eps} for timm's")
        return {'padding': family.padding, 'bn_eps': bn_eps}
    return {'padding': family.padding, 'bn_eps': family.bn_eps}
