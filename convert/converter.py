"""PyTorch state_dict <-> Flax variables for EfficientNetV2, strict in both directions."""
from __future__ import annotations

from typing import Any

import numpy as np

from convert import layouts
from convert.torch_io import CheckpointError
from convert.layouts import Layout
from effnetv2_jax.checkpoint import check_variables
from effnetv2_jax.messages import first_few
from effnetv2_jax.configs import VARIANTS, Variant, get_variant
from effnetv2_jax.layers import PADDINGS


def _diff_report(expected: dict, state_dict: dict, limit: int = 8) -> str:
    """One line naming missing, unexpected and shape-mismatched keys (the first few of each)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f'{k} {tuple(state_dict[k].shape)} != {expected[k]}'
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    parts = [f'{label} {first_few(items, limit)}' for label, items in
             (('missing:', missing), ('unexpected:', unexpected), ('shape mismatch:', mismatched))
             if items]
    return '; '.join(parts)


def resolve_variant(state_dict, layout: Layout, num_classes: int, variant: str | None) -> Variant:
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
    raise CheckpointError(f'no EfficientNetV2 variant matches this {layout.name} state_dict '
                          f'(closest: {best.name}; {_diff_report(expected, state_dict)})')


def torch_to_flax(state_dict: dict[str, np.ndarray], layout: str | None = None,
                  variant: str | None = None, padding: str | None = None,
                  bn_eps: float | None = None) -> tuple[dict, dict[str, Any]]:
    """Maps a torch state_dict onto Flax `{'params', 'batch_stats'}` plus the file metadata.

    Layout (a name or alias of `layouts.LAYOUTS`), variant and num_classes are detected unless
    given; padding and BN eps default to those of the layout's models of that variant (timm: its
    tf_ models, 'same' and 1e-3, except for the rw variants only its symmetric models have, and
    1e-5 whenever the padding is symmetric). Strict: every tensor consumed, every leaf filled,
    every shape checked, else `CheckpointError` naming the offending keys.
    """
    try:
        source = layouts.get_layout(layout) if layout else layouts.detect_layout(state_dict)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    num_classes = layouts.num_classes(state_dict, source)
    var = resolve_variant(state_dict, source, num_classes, variant)
    expected = layouts.torch_shapes(var, source, num_classes)
    report = _diff_report(expected, state_dict)
    if report:
        raise CheckpointError(f'state_dict does not fit EfficientNetV2-{var.name.upper()} '
                              f'({source.name} layout): {report}')
    family = source.family(padding) if padding else source.default_family(var.name)
    padding = padding or family.padding
    if padding not in PADDINGS:
        raise CheckpointError(f'padding must be one of {PADDINGS}, got {padding!r}')
    variables: dict = {'params': {}, 'batch_stats': {}}
    for e in layouts.entries(var, source, with_classifier=num_classes > 0):
        node = variables[e.collection]
        for name in e.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[e.flax_path[-1]] = layouts.torch_to_flax_array(state_dict[e.torch_key], e.axes)
    metadata = {
        'variant': var.name, 'num_classes': num_classes, 'padding': padding,
        'bn_eps': family.bn_eps if bn_eps is None else float(bn_eps),
        'source_layout': source.name,
        'preprocessing': source.preprocessing(var, padding, num_classes),
    }
    return variables, metadata


def check_finite(state_dict: dict[str, np.ndarray], limit: int = 5):
    """CheckpointError naming the first tensors that hold NaN or Inf, if any do."""
    bad = [k for k, v in state_dict.items()
           if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
    if bad:
        raise CheckpointError(f'NaN or Inf in {first_few(bad, limit)}; '
                              '--allow-nonfinite converts them anyway')


def flax_to_torch(variables: dict, metadata: dict[str, Any], layout: str) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: a state_dict in `layout` (a name or alias), with
    `num_batches_tracked` = 0. Strict: `variables` must be exactly the tree of the model
    `metadata` describes, else `CheckpointError` naming the first mismatches."""
    try:
        check_variables(variables, metadata)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    var, target = get_variant(metadata['variant']), layouts.get_layout(layout)
    if var.name not in target.variants:
        raise CheckpointError(f'{target.source} has no EfficientNetV2-{var.name.upper()}; '
                              f'its variants: {", ".join(target.variants)}')
    state_dict = {}
    for e in layouts.entries(var, target, with_classifier=metadata['num_classes'] > 0):
        leaf = variables[e.collection]
        for name in e.flax_path:
            leaf = leaf[name]
        state_dict[e.torch_key] = layouts.flax_to_torch_array(np.asarray(leaf), e.axes)
        if e.torch_key.endswith('running_var'):
            state_dict[e.torch_key.replace('running_var', 'num_batches_tracked')] = np.array(
                0, np.int64)
    return state_dict
