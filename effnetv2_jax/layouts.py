"""The PyTorch layouts of EfficientNetV2 weights, one `Layout` each, in one registry.

A layout is everything the converter needs to know about one PyTorch source: how its
state_dicts are recognised, the name of every module in them, the padding and BatchNorm epsilon
its models use, and the eval transform each of its weight sets expects. A new source is one more
`Layout` here (and, for `--verify`, a builder of its PyTorch models in `convert.verify`).
Torch-free.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Optional

import numpy as np

from effnetv2_jax.configs import (OFFICIAL_VARIANTS, TIMM_OWN, TIMM_TF, VARIANTS, Stage, TimmFamily,
                                  Variant)
from effnetv2_jax.checkpoint import variable_leaves
from effnetv2_jax.transforms import HALF_NORMALISATION, IMAGENET_NORMALISATION


# --- the module kinds a state_dict is made of ------------------------------------------------

class ConvBN(NamedTuple):
    """A bias-free conv followed by a BatchNorm2d (Flax: `<path>/conv`, `<path>/bn`)."""
    conv: str
    bn: str


class BiasedConv(NamedTuple):
    """A 1x1 conv with bias: squeeze-excite's reduce and expand (Flax: `<path>/{kernel,bias}`)."""
    name: str


class Linear(NamedTuple):
    """The classifier (Flax: `classifier/{kernel,bias}`)."""
    name: str


TorchModule = ConvBN | BiasedConv | Linear


# --- the eval transform of a set of weights ----------------------------------------------------

class Preprocessing(NamedTuple):
    """An eval transform. 'shorter' resizes the short side to size / crop_pct and center-crops
    `size`; 'squash' resizes both sides to size / crop_pct, ignoring aspect, then crops."""
    size: Optional[int]  # None: the variant's eval size
    resize: str
    crop_pct: float
    interpolation: str
    normalisation: dict  # {'mean': [r, g, b], 'std': [r, g, b]}

    def spec(self, variant: Variant) -> dict:
        """As stored in a weights file's `metadata['preprocessing']`."""
        return {'size': self.size or variant.eval_size, 'resize': self.resize,
                'crop_pct': self.crop_pct, 'interpolation': self.interpolation,
                **self.normalisation}


class Family(NamedTuple):
    """The PyTorch models of one layout that share a padding and BN eps: what `--verify` runs.

    Within a layout, the state_dicts of two families' models of one variant have the same keys
    and shapes: only a name, a flag or a file's metadata can tell which family weights are of.
    `preprocessing` maps a variant name, or (variant name, number of classes) where one
    checkpoint of the family differs by its classes, to the eval transform of its published
    weights; `default_preprocessing` covers the rest.
    """
    model: str  # the models' name in their library, '{}' standing for the variant
    padding: str  # 'symmetric' (PyTorch) or 'same' (TensorFlow's SAME)
    variants: tuple[str, ...]
    default_preprocessing: Preprocessing
    preprocessing: dict = {}
    bn_eps: float = 1e-3

    def model_name(self, variant: str) -> str:
        """The name of this family's model of `variant`, e.g. 'tf_efficientnetv2_s'."""
        return self.model.format(variant)

    def spec(self, variant: Variant, num_classes: int = 1000) -> dict:
        """The eval transform this family's weights of `variant` expect, as a metadata spec."""
        found = (self.preprocessing.get((variant.name, num_classes))
                 or self.preprocessing.get(variant.name))
        return (found or self.default_preprocessing).spec(variant)


def padding_words(padding: str) -> str:
    """"'same' padding" or 'symmetric padding', for messages."""
    return f"'{padding}' padding" if padding == 'same' else f'{padding} padding'


def eps_words(bn_eps: float) -> str:
    """'BN eps 1e-3', for messages."""
    return f'BN eps {np.format_float_scientific(bn_eps, trim="-", exp_digits=1)}'


class Layout(NamedTuple):
    """One PyTorch source of EfficientNetV2 weights; see the module docstring."""
    name: str
    aliases: tuple[str, ...]
    source: str  # where its models are defined, for messages and docs
    signature_key: str  # a state_dict key that only this layout has
    stem: ConvBN
    head: ConvBN
    classifier: Linear
    # (stage, stage index, block index in the stage, block index in the network) -> the torch
    # modules of one block, in the order of `block_parts`
    block_modules: Callable[[Stage, int, int, int], list[TorchModule]]
    families: tuple[Family, ...]

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants some model of this layout exists in."""
        return tuple(v for v in VARIANTS if any(v in f.variants for f in self.families))

    def families_of(self, variant: str) -> tuple[Family, ...]:
        """The families with a model of `variant`: more than one when only a name, a flag or
        metadata can say which the tensors are of (timm's S, M, L, XL)."""
        return tuple(f for f in self.families if variant in f.variants)

    def family_for(self, variant: str, padding: str) -> Family:
        """The family of `variant` that pads with `padding`, else its first one (whose models then
        pad otherwise); ValueError when no family has `variant`."""
        families = self.families_of(variant)
        if not families:
            raise ValueError(f'{self.source} has no EfficientNetV2-{variant.upper()}; its '
                             f'variants: {", ".join(self.variants)}')
        return next((f for f in families if f.padding == padding), families[0])

    def preprocessing(self, variant: Variant, padding: str, num_classes: int = 1000) -> dict:
        """The eval transform the weights of `variant` with `padding` expect, as a metadata
        spec."""
        return self.family_for(variant.name, padding).spec(variant, num_classes)


# --- the three layouts -------------------------------------------------------------------------

def block_parts(stage: Stage) -> list[str]:
    """Flax paths (below `blocks_<i>`) of a block's weight-bearing modules, in order."""
    if stage.block == 'fused':
        return ['project_conv'] if stage.single_conv else ['expand_conv', 'project_conv']
    return (['expand_conv', 'dwconv'] + (['se/conv_reduce', 'se/conv_expand'] if stage.se_ratio
                                          else []) + ['project_conv'])


def _wzmiaomiao_block(stage: Stage, s: int, j: int, g: int) -> list[TorchModule]:
    return [BiasedConv(f'blocks.{g}.{part.replace("/", ".")}') if part.startswith('se/')
            else ConvBN(f'blocks.{g}.{part}.conv', f'blocks.{g}.{part}.bn')
            for part in block_parts(stage)]


def _torchvision_block(stage: Stage, s: int, j: int, g: int) -> list[TorchModule]:
    prefix = f'features.{s + 1}.{j}.block'
    if stage.block == 'fused':
        return [ConvBN(f'{prefix}.{i}.0', f'{prefix}.{i}.1')
                for i in range(len(block_parts(stage)))]
    se = [BiasedConv(f'{prefix}.2.fc1'), BiasedConv(f'{prefix}.2.fc2')] if stage.se_ratio else []
    project = 3 if stage.se_ratio else 2
    return ([ConvBN(f'{prefix}.0.0', f'{prefix}.0.1'), ConvBN(f'{prefix}.1.0', f'{prefix}.1.1')]
            + se + [ConvBN(f'{prefix}.{project}.0', f'{prefix}.{project}.1')])


def _timm_block(stage: Stage, s: int, j: int, g: int) -> list[TorchModule]:
    prefix = f'blocks.{s}.{j}'
    if stage.single_conv:  # timm's ConvBnAct ('cn')
        return [ConvBN(f'{prefix}.conv', f'{prefix}.bn1')]
    if stage.block == 'fused':  # timm's EdgeResidual ('er'), of any expansion
        return [ConvBN(f'{prefix}.conv_exp', f'{prefix}.bn1'),
                ConvBN(f'{prefix}.conv_pwl', f'{prefix}.bn2')]
    se = ([BiasedConv(f'{prefix}.se.conv_reduce'), BiasedConv(f'{prefix}.se.conv_expand')]
          if stage.se_ratio else [])
    return ([ConvBN(f'{prefix}.conv_pw', f'{prefix}.bn1'),
             ConvBN(f'{prefix}.conv_dw', f'{prefix}.bn2')]
            + se + [ConvBN(f'{prefix}.conv_pwl', f'{prefix}.bn3')])


def _timm_family(family: TimmFamily, **preprocessing) -> Family:
    """The layout family of one of timm's families (configs.TIMM_FAMILIES)."""
    return Family(family.prefix + '{}', family.padding, family.variants, bn_eps=family.bn_eps,
                  **preprocessing)


def _shorter(size, interpolation, normalisation, crop_pct=1.0) -> Preprocessing:
    return Preprocessing(size, 'shorter', crop_pct, interpolation, normalisation)


def _squash(size, interpolation, normalisation, crop_pct=1.0) -> Preprocessing:
    return Preprocessing(size, 'squash', crop_pct, interpolation, normalisation)


HALF, IMAGENET = HALF_NORMALISATION, IMAGENET_NORMALISATION

WZMIAOMIAO = Layout(
    name='wzmiaomiao', aliases=('seed',),
    source="WZMIAOMIAO's model.py (deep-learning-for-image-processing, Test11_efficientnetV2)",
    signature_key='stem.conv.weight',
    stem=ConvBN('stem.conv', 'stem.bn'),
    head=ConvBN('head.project_conv.conv', 'head.project_conv.bn'),
    classifier=Linear('head.classifier'),
    block_modules=_wzmiaomiao_block,
    # Its predict.py: short side to the eval size, bilinear, mean = std = 0.5.
    families=(Family('efficientnetv2_{}', 'symmetric', OFFICIAL_VARIANTS,
                     default_preprocessing=_shorter(None, 'bilinear', HALF)),))

TORCHVISION = Layout(
    name='torchvision', aliases=(), source='torchvision.models.efficientnet_v2_*',
    signature_key='features.0.0.weight',
    stem=ConvBN('features.0.0', 'features.0.1'),
    head=ConvBN('features.{last}.0', 'features.{last}.1'),  # {last}: the stage count + 1
    classifier=Linear('classifier.1'),
    block_modules=_torchvision_block,
    # Its weights' `transforms()`.
    families=(Family('efficientnet_v2_{}', 'symmetric', ('s', 'm', 'l'),
                     default_preprocessing=_shorter(None, 'bilinear', IMAGENET),
                     preprocessing={'l': _shorter(480, 'bicubic', HALF)}),))

TIMM = Layout(
    name='timm', aliases=(), source='timm (tf_efficientnetv2_*, efficientnetv2_*)',
    signature_key='conv_stem.weight',
    stem=ConvBN('conv_stem', 'bn1'),
    head=ConvBN('conv_head', 'bn2'),
    classifier=Linear('classifier'),
    block_modules=_timm_block,
    # The pretrained config of each model's default tag, at its test size. timm's pretrained
    # EfficientNetV2 weights are the tf_* ones (ported from TensorFlow: 'same' padding) and
    # those of its own efficientnetv2_rw_t/_s/_m (symmetric, trained in timm).
    families=(
        _timm_family(TIMM_TF, default_preprocessing=_shorter(None, 'bicubic', HALF),
                     preprocessing={
                         'm': _squash(None, 'bicubic', HALF), 'l': _squash(None, 'bicubic', HALF),
                         'xl': _squash(None, 'bicubic', HALF),
                         'b0': _shorter(None, 'bicubic', IMAGENET, crop_pct=0.875),
                         'b1': _shorter(None, 'bicubic', IMAGENET, crop_pct=0.882),
                         'b2': _shorter(None, 'bicubic', IMAGENET, crop_pct=0.890),
                         'b3': _squash(300, 'bicubic', HALF, crop_pct=0.9),  # in21k_ft_in1k
                         ('b3', 21843): _shorter(300, 'bicubic', HALF, crop_pct=0.904),  # in21k
                     }),
        # rw_t/_s/_m (ra2_in1k, agc_in1k): the default, at their eval sizes 288/384/416.
        _timm_family(TIMM_OWN, default_preprocessing=_shorter(None, 'bicubic', IMAGENET),
                     preprocessing={'m': _shorter(416, 'bicubic', IMAGENET)}),
    ))

# timm's model arguments (a Hub config.json's `model_args`; its train.py's --model-kwargs, --gp
# and --bn-eps) that leave the eval forward alone, with the value they must have (None: any).
NEUTRAL_MODEL_ARGS = {'in_chans': 3, 'global_pool': 'avg', 'num_classes': None, 'drop_rate': None,
                      'drop_path_rate': None}


def timm_model_args(args: dict) -> tuple[Optional[str], Optional[float]]:
    """(padding, BN eps) that timm's model arguments set, None for the architecture's own;
    ValueError (one line) for arguments that change the network in a way this package does not
    build."""
    unsupported = [f'{k}={v!r}' for k, v in args.items() if k not in ('pad_type', 'bn_eps') and (
        k not in NEUTRAL_MODEL_ARGS or NEUTRAL_MODEL_ARGS[k] not in (None, v))]
    if args.get('pad_type', '') not in ('', 'same'):
        unsupported.append(f'pad_type={args["pad_type"]!r}')
    if unsupported:
        raise ValueError(f'{", ".join(unsupported)}, which changes the network in a way this '
                         'package does not build')
    padding = None if 'pad_type' not in args else 'same' if args['pad_type'] else 'symmetric'
    return padding, None if args.get('bn_eps') is None else float(args['bn_eps'])


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (WZMIAOMIAO, TORCHVISION, TIMM)}
NAMES = tuple(LAYOUTS)
_BY_NAME = {name: layout for layout in LAYOUTS.values()
            for name in (layout.name, *layout.aliases)}


def get_layout(name: str) -> Layout:
    """The layout called `name` or one of its aliases; ValueError naming the choices."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f'unknown layout {name!r}; one of {", ".join(NAMES)}') from None


def detect_layout(keys: Iterable[str]) -> Layout:
    """The layout whose signature key is among `keys`; ValueError when none is."""
    keys = set(keys)
    found = [layout for layout in LAYOUTS.values() if layout.signature_key in keys]
    if len(found) != 1:
        raise ValueError('not an EfficientNetV2 state_dict: none of the stem keys '
                         f'{sorted(layout.signature_key for layout in LAYOUTS.values())} is '
                         'present')
    return found[0]


# --- the tensor-by-tensor table ----------------------------------------------------------------

# torch axes -> Flax axes: OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C)); (out, in) -> (in, out)
CONV_AXES, LINEAR_AXES, VECTOR_AXES = (2, 3, 1, 0), (1, 0), (0,)


class Entry(NamedTuple):
    """One Flax leaf and the torch tensor it is, with the transpose between them."""
    collection: str  # 'params' or 'batch_stats'
    flax_path: tuple[str, ...]  # below the collection
    torch_key: str
    axes: tuple[int, ...]  # torch_array.transpose(axes) is the Flax array


def _modules(variant: Variant, layout: Layout) -> Iterator[tuple[tuple[str, ...], TorchModule]]:
    """(Flax module path, torch module) of every weight-bearing module, in state_dict order."""
    yield ('stem',), layout.stem
    g = 0
    for s, stage in enumerate(variant.stages):
        for j in range(stage.repeats):
            for part, module in zip(block_parts(stage), layout.block_modules(stage, s, j, g),
                                    strict=True):
                yield (f'blocks_{g}', *part.split('/')), module
            g += 1
    last = str(len(variant.stages) + 1)
    yield ('head_conv',), ConvBN(*(name.replace('{last}', last) for name in layout.head))
    yield ('classifier',), layout.classifier


def entries(variant: Variant, layout: Layout, with_classifier: bool = True) -> list[Entry]:
    """Every (Flax leaf, torch tensor) pair of `variant` in `layout`, in state_dict order."""
    out = []
    for path, module in _modules(variant, layout):
        if isinstance(module, ConvBN):
            conv, bn = module
            out += [Entry('params', (*path, 'conv', 'kernel'), f'{conv}.weight', CONV_AXES),
                    Entry('params', (*path, 'bn', 'scale'), f'{bn}.weight', VECTOR_AXES),
                    Entry('params', (*path, 'bn', 'bias'), f'{bn}.bias', VECTOR_AXES),
                    Entry('batch_stats', (*path, 'bn', 'mean'), f'{bn}.running_mean',
                          VECTOR_AXES),
                    Entry('batch_stats', (*path, 'bn', 'var'), f'{bn}.running_var', VECTOR_AXES)]
        elif isinstance(module, BiasedConv):
            out += [Entry('params', (*path, 'kernel'), f'{module.name}.weight', CONV_AXES),
                    Entry('params', (*path, 'bias'), f'{module.name}.bias', VECTOR_AXES)]
        elif with_classifier:
            out += [Entry('params', (*path, 'kernel'), f'{module.name}.weight', LINEAR_AXES),
                    Entry('params', (*path, 'bias'), f'{module.name}.bias', VECTOR_AXES)]
    return out


def torch_to_flax_array(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(axes))


def flax_to_torch_array(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(np.argsort(axes)))


def torch_shapes(variant: Variant, layout: Layout, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes (without num_batches_tracked) the Flax model implies, in order."""
    leaves = variable_leaves(variant.name, num_classes)
    shapes = {}
    for e in entries(variant, layout, with_classifier=num_classes > 0):
        shape, _ = leaves['/'.join((e.collection, *e.flax_path))]
        shapes[e.torch_key] = flax_to_torch_array(np.empty(shape, np.uint8), e.axes).shape
    return shapes


def num_classes(state_dict, layout: Layout) -> int:
    """The classifier's output count; 0 for a state_dict without a classifier."""
    weight = state_dict.get(f'{layout.classifier.name}.weight')
    return 0 if weight is None else int(weight.shape[0])


def candidate_variants(keys, layout: Layout, num_classes: int) -> list[Variant]:
    """Variants whose key set equals `keys` (shapes unchecked)."""
    keys = set(keys)
    return [v for v in VARIANTS.values()
            if {e.torch_key for e in entries(v, layout, num_classes > 0)} == keys]
