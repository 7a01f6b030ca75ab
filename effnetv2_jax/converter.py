"""PyTorch state_dict <-> Flax variables for EfficientNetV2, strict in both directions.

Torch-free: state_dicts are numpy arrays here (`to_numpy` makes them of torch tensors without
importing torch); reading and writing PyTorch files is `convert.torch_io`'s.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from effnetv2_jax import layouts
from effnetv2_jax.checkpoint import check_variables, model_metadata
from effnetv2_jax.configs import VARIANTS, Variant, get_variant
from effnetv2_jax.layers import PADDINGS
from effnetv2_jax.layouts import Family, Layout
from effnetv2_jax.messages import first_few
from effnetv2_jax.model import EfficientNetV2

# The producer mark of every file this project writes in a PyTorch format (convert.torch_io's
# --to-torch files, hub's save_pretrained weights), each with its writer beside it.
PRODUCER = 'effnetv2-jax'
STRIP_PREFIXES = ('module.', '_orig_mod.')  # DataParallel / DDP, torch.compile


class CheckpointError(Exception):
    """A user-facing problem with an input file or its contents (one line, exit status 2)."""


class Description(NamedTuple):
    """What a checkpoint says of its weights besides the tensors, and who says it (`origin`,
    for messages): a training checkpoint names its model (`architecture`, with timm's
    `model_args`), a --to-torch file gives its layout, variant, padding and BN eps. None: not
    said."""
    origin: str
    architecture: Optional[str] = None
    model_args: dict = {}
    layout: Optional[str] = None
    variant: Optional[str] = None
    padding: Optional[str] = None
    bn_eps: Optional[float] = None


def to_numpy(state_dict) -> dict[str, np.ndarray]:
    """A torch state_dict as float32 numpy arrays (duck-typed: torch is not imported), without
    `num_batches_tracked` and without the `module.` / `_orig_mod.` prefixes of DataParallel,
    DDP and torch.compile."""
    out = {}
    for key, tensor in state_dict.items():
        for prefix in STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        if not key.endswith('num_batches_tracked'):
            out[key] = tensor.detach().float().cpu().numpy()
    return out


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


class Reading(NamedTuple):
    """How a state_dict is read: the PyTorch model its tensors are taken to be of, and why."""
    layout: Layout
    variant: Variant
    num_classes: int
    family: Family  # the layout's models the tensors are of
    padding: str  # the family's, unless a flag or the file says otherwise
    bn_eps: float
    # For --verify, e.g. "timm efficientnetv2_s: symmetric padding, BN eps 1e-5 (from the
    # checkpoint's arch)"
    assumption: str


def resolve(state_dict: dict[str, np.ndarray], layout: str | None = None,
            variant: str | None = None, padding: str | None = None, bn_eps: float | None = None,
            description: Description | None = None) -> Reading:
    """How `torch_to_flax` reads `state_dict`: layout, variant and classes from the tensors
    (unless given), the family of the layout's models they are of (`_family`), and that
    family's padding and BN eps unless `padding`, `bn_eps` or the file's `description` (see
    `torch_io.read_state_dict`) say otherwise.

    CheckpointError when the tensors fit no model, when the description contradicts them, and
    when they fit two families and nothing says which (timm's tf_efficientnetv2_s, 'same' and
    eps 1e-3, and efficientnetv2_s, symmetric and 1e-5, have the same tensors): a guess would
    convert one of the two wrongly, and --verify, running the guessed model, would agree.
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
    for given in (padding, description and description.padding):
        if given and given not in PADDINGS:
            raise CheckpointError(f'padding must be one of {PADDINGS}, got {given!r}')
    family, because, said_padding, said_eps = _family(source, var, variant, padding, description)
    # Flags win over what the file says, which wins over the family's own.
    chosen_padding = padding or said_padding or family.padding
    eps = float(bn_eps) if bn_eps is not None else said_eps if said_eps is not None else (
        family.bn_eps)
    flagged = lambda given, flag: f' ({flag})' if given is not None and flag not in because else ''
    assumption = (f'{source.name} {family.model_name(var.name)}: '
                  f'{layouts.padding_words(chosen_padding)}{flagged(padding, "--padding")}, '
                  f'{layouts.eps_words(eps)}{flagged(bn_eps, "--bn-eps")} ({because})')
    return Reading(source, var, num_classes, family, chosen_padding, eps, assumption)


def _family(source: Layout, var: Variant, variant: str | None, padding: str | None,
            description: Description | None) -> tuple[Family, str, str | None, float | None]:
    """(family, why, padding, BN eps) for tensors of `var` in `source`: the family the file's
    description names, else the one `variant` names (e.g. 'efficientnetv2_s'), else the only one
    with the variant, else the one with the `padding` flag; padding and eps are what the
    description says (None: the family's)."""
    families = source.families_of(var.name)
    if not families:
        raise CheckpointError(f'{source.source} has no EfficientNetV2-{var.name.upper()}')
    if description is not None:
        said = description.origin
        if description.layout not in (None, source.name):
            raise CheckpointError(f'{said} says {description.layout} layout, but the tensors '
                                  f'are in the {source.name} layout')
        if description.variant is not None and description.variant != var.name:
            raise CheckpointError(f'{said} says EfficientNetV2-{description.variant.upper()}, '
                                  f'but the tensors are EfficientNetV2-{var.name.upper()}')
        if description.architecture is not None:
            name = description.architecture.lower()
            named = [f for f in families if f.model_name(var.name) == name]
            if not named:
                raise CheckpointError(
                    f'{said} is {description.architecture!r}, but the tensors are '
                    f"{source.name}'s {' or '.join(f.model_name(var.name) for f in families)}")
            said_padding, said_eps = None, None
            if description.model_args:
                try:
                    said_padding, said_eps = layouts.timm_model_args(description.model_args)
                except ValueError as e:
                    raise CheckpointError(f'{said} is {description.architecture!r} built with '
                                          f'{e}') from None
            return named[0], f'from {said}', said_padding, said_eps
        if description.padding is not None:
            return (source.family_for(var.name, description.padding), f'from {said}',
                    description.padding, description.bn_eps)
    named = [f for f in families if variant and f.model_name(var.name) == variant.lower()]
    if named:
        return named[0], 'from --variant', None, None
    if len(families) == 1:
        return families[0], f'the only {source.name} model with these tensors', None, None
    chosen = [f for f in families if f.padding == padding]
    if len(chosen) == 1:
        return chosen[0], 'from --padding', None, None
    choices = ' and '.join(f'{f.model_name(var.name)} ({layouts.padding_words(f.padding)}, '
                           f'{layouts.eps_words(f.bn_eps)})' for f in families)
    raise CheckpointError(f"{source.name}'s {choices} have the same tensors; say which with "
                          + ' or '.join(f'--padding {f.padding}' for f in families))


def to_flax(state_dict: dict[str, np.ndarray], reading: Reading) -> tuple[dict, dict[str, Any]]:
    """Maps a torch state_dict, read as `reading` says, onto Flax `{'params', 'batch_stats'}`
    plus the file metadata."""
    variables: dict = {'params': {}, 'batch_stats': {}}
    for e in layouts.entries(reading.variant, reading.layout,
                             with_classifier=reading.num_classes > 0):
        node = variables[e.collection]
        for name in e.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[e.flax_path[-1]] = layouts.torch_to_flax_array(state_dict[e.torch_key], e.axes)
    model = EfficientNetV2(variant=reading.variant, num_classes=reading.num_classes,
                           padding=reading.padding, bn_eps=reading.bn_eps)
    return variables, model_metadata(
            model, source_layout=reading.layout.name,
            preprocessing=reading.family.spec(reading.variant, reading.num_classes))


def torch_to_flax(state_dict: dict[str, np.ndarray], layout: str | None = None,
                  variant: str | None = None, padding: str | None = None,
                  bn_eps: float | None = None, description: Description | None = None
                  ) -> tuple[dict, dict[str, Any]]:
    """Maps a torch state_dict onto Flax `{'params', 'batch_stats'}` plus the file metadata.

    Layout (a name or alias of `layouts.LAYOUTS`), variant and num_classes are detected unless
    given; padding and BN eps are those of the layout's models of the tensors (`resolve`: timm's
    S, M, L and XL need `padding` or a `description` to say whether they are its tf_ models or
    its own). Strict: every tensor consumed, every leaf filled, every shape checked, no guess,
    else `CheckpointError` naming the offending keys or the choices.
    """
    return to_flax(state_dict, resolve(state_dict, layout, variant, padding, bn_eps,
                                       description))


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
