"""Name tables between the Flax variable tree and the three PyTorch state_dict layouts.

A `Entry` pairs one Flax leaf with one torch tensor and says how the array is laid out. The tables
are generated from the variant config, so every variant works in every layout; torch-free.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from effnetv2_jax.configs import VARIANTS, Variant
from effnetv2_jax.model import abstract_variables, create_model
from effnetv2_jax.transforms import HALF_NORMALISATION, IMAGENET_NORMALISATION

LAYOUTS = ('seed', 'torchvision', 'timm')

# A key only this layout has, used to recognise it.
SIGNATURE_KEYS = {'seed': 'stem.conv.weight', 'torchvision': 'features.0.0.weight',
                  'timm': 'conv_stem.weight'}
CLASSIFIER_KEYS = {'seed': 'head.classifier.weight', 'torchvision': 'classifier.1.weight',
                   'timm': 'classifier.weight'}

_TIMM_B_CROP_PCT = {'b0': 0.875, 'b1': 0.882, 'b2': 0.890}
_TIMM_SYMMETRIC_SIZE = {'m': 416}  # timm's test size for efficientnetv2_m; else the eval size


class Entry(NamedTuple):
    collection: str  # 'params' or 'batch_stats'
    flax_path: tuple[str, ...]  # path below the collection
    torch_key: str
    kind: str  # 'conv' (OIHW <-> HWIO), 'linear' ((out, in) <-> (in, out)) or 'vector'


def _module_names(variant: Variant, layout: str) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """Yields (flax module path, module type, torch prefix) for every weight-bearing module.

    Module type 'convbn' has torch children `<conv>` and `<bn>`, given as 'conv|bn' prefixes.
    """
    num_stages = len(variant.stages)
    if layout == 'seed':
        yield ('stem',), 'convbn', 'stem.conv|stem.bn'
    elif layout == 'timm':
        yield ('stem',), 'convbn', 'conv_stem|bn1'
    else:
        yield ('stem',), 'convbn', 'features.0.0|features.0.1'

    g = 0
    for s, stage in enumerate(variant.stages):
        for j in range(stage.repeats):
            parts = _block_parts(stage)
            names = {'seed': _seed_block_names, 'torchvision': _torchvision_block_names,
                     'timm': _timm_block_names}[layout](stage, g, s, j)
            for (part, kind), name in zip(parts, names):
                yield (f'blocks_{g}', *part.split('/')), kind, name
            g += 1

    yield ('head_conv',), 'convbn', {
        'seed': 'head.project_conv.conv|head.project_conv.bn', 'timm': 'conv_head|bn2',
        'torchvision': f'features.{num_stages + 1}.0|features.{num_stages + 1}.1'}[layout]
    yield ('classifier',), 'linear', CLASSIFIER_KEYS[layout].removesuffix('.weight')


def _block_parts(stage) -> list[tuple[str, str]]:
    """(Flax path inside the block, module type) of a block's weight-bearing modules, in order."""
    if stage.block == 'fused':
        if stage.expansion == 1:
            return [('project_conv', 'convbn')]
        return [('expand_conv', 'convbn'), ('project_conv', 'convbn')]
    se = [('se/conv_reduce', 'conv_bias'), ('se/conv_expand', 'conv_bias')]
    return ([('expand_conv', 'convbn'), ('dwconv', 'convbn')] + (se if stage.se_ratio else [])
            + [('project_conv', 'convbn')])


def _seed_block_names(stage, g, s, j):
    return [f'blocks.{g}.{p}.conv|blocks.{g}.{p}.bn' if kind == 'convbn'
            else f'blocks.{g}.{p.replace("/", ".")}' for p, kind in _block_parts(stage)]


def _torchvision_block_names(stage, g, s, j):
    prefix = f'features.{s + 1}.{j}.block'
    if stage.block == 'fused':
        return [f'{prefix}.{i}.0|{prefix}.{i}.1' for i in range(len(_block_parts(stage)))]
    se = [f'{prefix}.2.fc1', f'{prefix}.2.fc2'] if stage.se_ratio else []
    project = 3 if stage.se_ratio else 2
    return ([f'{prefix}.0.0|{prefix}.0.1', f'{prefix}.1.0|{prefix}.1.1'] + se
            + [f'{prefix}.{project}.0|{prefix}.{project}.1'])


def _timm_block_names(stage, g, s, j):
    prefix = f'blocks.{s}.{j}'
    if stage.block == 'fused' and stage.expansion == 1:
        return [f'{prefix}.conv|{prefix}.bn1']
    if stage.block == 'fused':
        return [f'{prefix}.conv_exp|{prefix}.bn1', f'{prefix}.conv_pwl|{prefix}.bn2']
    se = [f'{prefix}.se.conv_reduce', f'{prefix}.se.conv_expand'] if stage.se_ratio else []
    return ([f'{prefix}.conv_pw|{prefix}.bn1', f'{prefix}.conv_dw|{prefix}.bn2'] + se
            + [f'{prefix}.conv_pwl|{prefix}.bn3'])


def entries(variant: Variant, layout: str, with_classifier: bool = True) -> list[Entry]:
    """Every (Flax leaf, torch tensor) pair of `variant` in `layout`, in state_dict order."""
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
    out = []
    for path, kind, torch_name in _module_names(variant, layout):
        if kind == 'convbn':
            conv, bn = torch_name.split('|')
            out += [Entry('params', (*path, 'conv', 'kernel'), f'{conv}.weight', 'conv'),
                    Entry('params', (*path, 'bn', 'scale'), f'{bn}.weight', 'vector'),
                    Entry('params', (*path, 'bn', 'bias'), f'{bn}.bias', 'vector'),
                    Entry('batch_stats', (*path, 'bn', 'mean'), f'{bn}.running_mean', 'vector'),
                    Entry('batch_stats', (*path, 'bn', 'var'), f'{bn}.running_var', 'vector')]
        elif kind == 'conv_bias':
            out += [Entry('params', (*path, 'kernel'), f'{torch_name}.weight', 'conv'),
                    Entry('params', (*path, 'bias'), f'{torch_name}.bias', 'vector')]
        elif with_classifier:
            out += [Entry('params', (*path, 'kernel'), f'{torch_name}.weight', 'linear'),
                    Entry('params', (*path, 'bias'), f'{torch_name}.bias', 'vector')]
    return out


# torch axes -> Flax axes: OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C)); (out, in) -> (in, out)
_TORCH_TO_FLAX_AXES = {'conv': (2, 3, 1, 0), 'linear': (1, 0), 'vector': (0,)}


def torch_to_flax_array(array: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(_TORCH_TO_FLAX_AXES[kind]))


def flax_to_torch_array(array: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(np.argsort(_TORCH_TO_FLAX_AXES[kind])))


def torch_shapes(variant: Variant, layout: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes (without num_batches_tracked) the Flax model implies, in order."""
    abstract = abstract_variables(create_model(variant.name, num_classes))
    shapes = {}
    for e in entries(variant, layout, with_classifier=num_classes > 0):
        leaf = abstract[e.collection]
        for name in e.flax_path:
            leaf = leaf[name]
        shapes[e.torch_key] = flax_to_torch_array(np.empty(leaf.shape, np.uint8), e.kind).shape
    return shapes


def detect_layout(keys) -> str:
    """The layout whose signature key is present; ValueError when none is."""
    found = [layout for layout, key in SIGNATURE_KEYS.items() if key in keys]
    if len(found) != 1:
        raise ValueError('not an EfficientNetV2 state_dict: none of the stem keys '
                         f'{sorted(SIGNATURE_KEYS.values())} is present')
    return found[0]


def candidate_variants(keys, layout: str, num_classes: int) -> list[Variant]:
    """Variants whose key set equals `keys` (shapes unchecked), cheapest check first."""
    keys = set(keys)
    return [v for v in VARIANTS.values()
            if {e.torch_key for e in entries(v, layout, num_classes > 0)} == keys]


def preprocessing(layout: str, variant: Variant, padding: str, num_classes: int = 1000) -> dict:
    """The eval transform the source weights expect: torchvision's `Weights.transforms()`, timm's
    pretrained config of the model's default tag (`resolve_data_config(use_test_size=True)`),
    the seed's predict.py. tests/test_predict.py checks these against torchvision and timm.

    'resize': 'shorter' scales the short side to size / crop_pct then center-crops `size`;
    'squash' scales both sides to size / crop_pct, ignoring aspect, then center-crops.
    """
    name = variant.name
    if layout == 'timm' and padding == 'symmetric':  # efficientnetv2_*: timm's generic config
        size = _TIMM_SYMMETRIC_SIZE.get(name, variant.eval_size)
        return _spec(size, 'shorter', 1.0, 'bicubic', IMAGENET_NORMALISATION)
    if layout == 'timm':  # tf_efficientnetv2_*
        if name == 'b3':  # B3's default tag is in21k_ft_in1k; 21843 classes: the in21k tag
            if num_classes == 21843:
                return _spec(300, 'shorter', 0.904, 'bicubic', HALF_NORMALISATION)
            return _spec(300, 'squash', 0.9, 'bicubic', HALF_NORMALISATION)
        if name in _TIMM_B_CROP_PCT:
            return _spec(variant.eval_size, 'shorter', _TIMM_B_CROP_PCT[name], 'bicubic',
                         IMAGENET_NORMALISATION)
        return _spec(variant.eval_size, 'shorter' if name == 's' else 'squash', 1.0, 'bicubic',
                     HALF_NORMALISATION)
    if layout == 'torchvision':
        if name == 'l':
            return _spec(480, 'shorter', 1.0, 'bicubic', HALF_NORMALISATION)
        return _spec(variant.eval_size, 'shorter', 1.0, 'bilinear', IMAGENET_NORMALISATION)
    return _spec(variant.eval_size, 'shorter', 1.0, 'bilinear', HALF_NORMALISATION)


def _spec(size: int, resize: str, crop_pct: float, interpolation: str, normalisation) -> dict:
    return {'size': size, 'resize': resize, 'crop_pct': crop_pct, 'interpolation': interpolation,
            **normalisation}
