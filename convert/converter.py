"""PyTorch state_dict <-> Flax variables for EfficientNetV2, strict in both directions."""
from __future__ import annotations

from typing import Any

import numpy as np

from convert import layouts
from convert.torch_io import CheckpointError
from effnetv2_jax.configs import VARIANTS, Variant, get_variant
from effnetv2_jax.layers import PADDINGS

DEFAULT_BN_EPS = 1e-3  # timm's non-`tf_` models use 1e-5: pass bn_eps


def _num_classes(state_dict, layout: str) -> int:
    weight = state_dict.get(layouts.CLASSIFIER_KEYS[layout])
    return 0 if weight is None else int(weight.shape[0])


def _diff_report(expected: dict, state_dict: dict, limit: int = 8) -> str:
    """One line naming missing, unexpected and shape-mismatched keys (the first few of each)."""
    def show(items):
        items = list(items)
        more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
        return ', '.join(items[:limit]) + more
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f'{k} {tuple(state_dict[k].shape)} != {expected[k]}'
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    parts = [f'{label} {show(items)}' for label, items in
             (('missing:', missing), ('unexpected:', unexpected), ('shape mismatch:', mismatched))
             if items]
    return '; '.join(parts)


def resolve_variant(state_dict, layout: str, num_classes: int, variant: str | None) -> Variant:
    """The variant named, or the one whose keys and shapes match `state_dict` exactly."""
    if variant is not None:
        try:
            return get_variant(variant)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    candidates = layouts.candidate_variants(state_dict, layout, num_classes)
    if len(candidates) == 1:
        return candidates[0]
    # No exact key match: report against the variant sharing the most keys.
    best = max(VARIANTS.values(), key=lambda v: len(
        {e.torch_key for e in layouts.entries(v, layout, num_classes > 0)} & set(state_dict)))
    expected = layouts.torch_shapes(best, layout, num_classes)
    raise CheckpointError(f'no EfficientNetV2 variant matches this {layout} state_dict '
                          f'(closest: {best.name}; {_diff_report(expected, state_dict)})')


def torch_to_flax(state_dict: dict[str, np.ndarray], layout: str | None = None,
                  variant: str | None = None, padding: str | None = None,
                  bn_eps: float | None = None) -> tuple[dict, dict[str, Any]]:
    """Maps a torch state_dict onto Flax `{'params', 'batch_stats'}` plus the file metadata.

    Layout, variant and num_classes are detected unless given. Strict: every tensor consumed,
    every leaf filled, every shape checked, else `CheckpointError` naming the offending keys.
    timm weights default to TF 'same' padding (its pretrained EfficientNetV2 are the `tf_*` ones).
    """
    layout = layout or _detect_layout(state_dict)
    num_classes = _num_classes(state_dict, layout)
    var = resolve_variant(state_dict, layout, num_classes, variant)
    expected = layouts.torch_shapes(var, layout, num_classes)
    report = _diff_report(expected, state_dict)
    if report:
        raise CheckpointError(f'state_dict does not fit EfficientNetV2-{var.name.upper()} '
                              f'({layout} layout): {report}')
    padding = padding or ('same' if layout == 'timm' else 'symmetric')
    if padding not in PADDINGS:
        raise CheckpointError(f'padding must be one of {PADDINGS}, got {padding!r}')
    variables: dict = {'params': {}, 'batch_stats': {}}
    for e in layouts.entries(var, layout, with_classifier=num_classes > 0):
        node = variables[e.collection]
        for name in e.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[e.flax_path[-1]] = layouts.torch_to_flax_array(state_dict[e.torch_key], e.kind)
    metadata = {
        'variant': var.name, 'num_classes': num_classes, 'padding': padding,
        'bn_eps': DEFAULT_BN_EPS if bn_eps is None else float(bn_eps), 'source_layout': layout,
        'preprocessing': layouts.preprocessing(layout, var, padding, num_classes),
    }
    return variables, metadata


def _detect_layout(state_dict) -> str:
    try:
        return layouts.detect_layout(state_dict)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def flax_to_torch(variables: dict, metadata: dict[str, Any], layout: str) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: a state_dict in `layout`, with `num_batches_tracked` = 0."""
    var = get_variant(metadata['variant'])
    state_dict = {}
    for e in layouts.entries(var, layout, with_classifier=metadata['num_classes'] > 0):
        leaf = variables[e.collection]
        for name in e.flax_path:
            leaf = leaf[name]
        state_dict[e.torch_key] = layouts.flax_to_torch_array(np.asarray(leaf), e.kind)
        if e.torch_key.endswith('running_var'):
            state_dict[e.torch_key.replace('running_var', 'num_batches_tracked')] = np.array(
                0, np.int64)
    return state_dict
