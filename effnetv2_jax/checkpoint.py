"""The converted-weights file: Flax variables plus the metadata needed to rebuild the model.

Two formats, same content: one Flax msgpack file (`{'variables': ..., 'metadata': ...}`), or an
Orbax checkpoint directory (`variables/` via Orbax, `metadata.json` beside it). Writes follow
`files.atomic_write` (atomic, and only over a weights file of the same format). Reads are strict:
the variables must be exactly the tree of the model the metadata describes.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from effnetv2_jax.messages import first_few, first_line, silence_orbax
from effnetv2_jax.configs import get_variant
from effnetv2_jax.files import (LOCAL_DIR_SCHEME, REMOTE_SCHEMES, OutputKind, atomic_write,
                                atomic_write_bytes)
from effnetv2_jax.layers import PADDINGS
from effnetv2_jax.model import EfficientNetV2, abstract_variables, create_model
from effnetv2_jax.transforms import check_spec

FORMAT_VERSION = 1
MODEL_KEYS = ('variant', 'num_classes', 'padding', 'bn_eps')  # metadata that shapes the model
COLLECTIONS = ('params', 'batch_stats')
# Pretrained names that `read` and `load` take besides paths (convert/pretrained.py resolves them).
PRETRAINED_SCHEMES = (*REMOTE_SCHEMES, LOCAL_DIR_SCHEME)


def _is_msgpack_weights(path: Path) -> bool:
    """Whether `path` is a msgpack map whose first entry is metadata with a format_version (what
    `save` writes: flax serialises the keys sorted), read without loading the variables."""
    import msgpack
    try:
        with open(path, 'rb') as f:
            unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 20)
            if unpacker.read_map_header() != 2 or unpacker.unpack() != 'metadata':
                return False
            metadata = unpacker.unpack()
        return isinstance(metadata, dict) and 'format_version' in metadata
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _is_orbax_weights(path: Path) -> bool:
    """A folder `save` wrote (or an empty one: replacing it loses nothing)."""
    if not path.is_dir() or not {p.name for p in path.iterdir()} <= {'variables', 'metadata.json'}:
        return False
    try:
        return 'format_version' in json.loads((path / 'metadata.json').read_text())
    except (OSError, ValueError, TypeError):
        return not any(path.iterdir())


OUTPUT_KINDS = {
    'msgpack': OutputKind('an effnetv2-jax weights file', _is_msgpack_weights),
    'orbax': OutputKind('an effnetv2-jax Orbax weights folder', _is_orbax_weights, directory=True),
}


def check_metadata(metadata) -> None:
    """ValueError (one line) unless `metadata` holds valid MODEL_KEYS, and valid `preprocessing`
    and `class_names` where it has them."""
    if not isinstance(metadata, dict):
        raise ValueError(f'metadata is a {type(metadata).__name__}, not a mapping')
    missing = [k for k in MODEL_KEYS if k not in metadata]
    if missing:
        raise ValueError(f'metadata lacks {missing}')
    variant, classes, padding, eps = (metadata[k] for k in MODEL_KEYS)
    if not isinstance(variant, str):
        raise ValueError(f'metadata variant {variant!r} is not a name')
    get_variant(variant)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
        raise ValueError(f'metadata num_classes {classes!r} is not a count')
    if padding not in PADDINGS:
        raise ValueError(f'metadata padding {padding!r} is not one of {", ".join(PADDINGS)}')
    if (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps)
            or eps <= 0):
        raise ValueError(f'metadata bn_eps {eps!r} is not a positive number')
    spec, names = metadata.get('preprocessing'), metadata.get('class_names')
    if spec is not None:
        if not isinstance(spec, dict):
            raise ValueError(f'metadata preprocessing is a {type(spec).__name__}, not a mapping')
        try:
            check_spec(spec, complete=False)
        except ValueError as e:
            raise ValueError(f'metadata preprocessing: {e}') from None
    if names is not None and (not isinstance(names, list) or len(names) != classes
                              or not all(isinstance(n, str) for n in names)):
        raise ValueError(f'metadata class_names is not a list of {classes} names')


@functools.lru_cache(maxsize=16)
def variable_leaves(variant: str, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{'params/stem/conv/kernel': (shape, dtype), ...}: every leaf of the variables of
    `create_model(variant, num_classes)` (padding and BN eps change no shape). Cached: tracing the
    model takes about a second."""
    tree = abstract_variables(create_model(variant, num_classes=num_classes))
    return {k: (a.shape, np.dtype(a.dtype)) for k, a in
            traverse_util.flatten_dict({c: tree[c] for c in COLLECTIONS}, sep='/').items()}


def check_variables(variables, metadata: dict[str, Any]) -> None:
    """ValueError (one line, naming the first mismatches) unless `variables` is exactly the
    `{'params', 'batch_stats'}` tree of the model `metadata` describes: same leaves, shapes and
    dtypes."""
    check_metadata(metadata)
    expected = variable_leaves(metadata['variant'], metadata['num_classes'])
    if not isinstance(variables, dict) or not all(
            isinstance(variables.get(c), dict) for c in COLLECTIONS):
        raise ValueError(f'the variables are not a {{{", ".join(COLLECTIONS)}}} tree')
    actual = traverse_util.flatten_dict({c: variables[c] for c in COLLECTIONS}, sep='/')
    problems = [f'missing {k}' for k in expected if k not in actual]
    problems += [f'unexpected {k}' for k in actual if k not in expected]
    for key in (k for k in expected if k in actual):
        leaf, (shape, dtype) = actual[key], expected[key]
        if getattr(leaf, 'shape', None) != shape or getattr(leaf, 'dtype', None) != dtype:
            problems.append(f'{key} is {getattr(leaf, "dtype", type(leaf).__name__)}'
                            f'{list(getattr(leaf, "shape", ()))}, expected {dtype}{list(shape)}')
    if problems:
        name = f'EfficientNetV2-{metadata["variant"].upper()} ({metadata["num_classes"]} classes)'
        raise ValueError(f'the variables do not fit {name}: {first_few(problems, 4)}')


def check_finite(variables, source: str | os.PathLike) -> None:
    """ValueError (one line) naming the first leaves of `variables` (a tree of arrays) that hold
    NaN or Inf: a model with such weights outputs NaN, whatever its input."""
    leaves = traverse_util.flatten_dict(variables, sep='/')
    bad = [k for k, v in leaves.items() if not np.isfinite(np.asarray(v, np.float32)).all()]
    if bad:
        raise ValueError(f'NaN or Inf in {first_few(bad, 4)} of {source}: the model would '
                         'output NaN')


def build_model(metadata: dict[str, Any], **overrides) -> EfficientNetV2:
    """The model that a weights file's metadata (MODEL_KEYS) describes; `overrides` as in
    `create_model` take precedence."""
    kwargs = {'num_classes': metadata['num_classes'], 'padding': metadata['padding'],
              'bn_eps': metadata['bn_eps'], **overrides}
    return create_model(metadata['variant'], **kwargs)


def model_metadata(model: EfficientNetV2, **extra) -> dict[str, Any]:
    """The metadata (MODEL_KEYS) that `build_model` turns back into `model`, followed by `extra`
    (e.g. `preprocessing`, `class_names`); MODEL_KEYS in `extra` give way to the model's."""
    metadata = {'variant': model.variant.name, 'num_classes': model.num_classes,
                'padding': model.padding, 'bn_eps': model.bn_eps}
    return {**metadata, **{k: v for k, v in extra.items() if k not in metadata}}


@functools.lru_cache(maxsize=8)
def _classifier_initialiser(model: EfficientNetV2):
    """A jitted `key -> model.init(key, ...)['params']['classifier']`: jit drops every other
    initialiser. Cached per model, so that models of one architecture compile it once."""
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)  # no shape depends on the image size
    return jax.jit(lambda key: model.init(key, images, train=False)['params']['classifier'])


def fit_classifier(model: EfficientNetV2, variables, key: jax.Array) -> dict:
    """`variables` (`{'params', 'batch_stats'}` of `model`'s architecture, for any number of
    classes) with a classifier for `model.num_classes`: theirs if it has that many outputs, else
    a fresh one, the one `model.init(key, ...)` makes (numpy; kernel normal(0.01), zero bias), or
    none for 0 classes (pooled features). Everything else is kept; `variables` is not changed."""
    params = variables['params']
    classes = params['classifier']['kernel'].shape[-1] if 'classifier' in params else 0
    if classes == model.num_classes:
        return variables
    params = {k: v for k, v in params.items() if k != 'classifier'}
    if model.num_classes:
        params['classifier'] = jax.device_get(_classifier_initialiser(model)(key))
    return {**variables, 'params': params}


def save(path: str | os.PathLike, variables, metadata: dict[str, Any], fmt: str = 'msgpack'):
    """Writes `{'params', 'batch_stats'}` and `metadata` (JSON-able, with MODEL_KEYS) atomically,
    over nothing but a weights file of the same format (`files.OutputError` otherwise).
    ValueError if the variables do not fit the model the metadata describes."""
    if fmt not in OUTPUT_KINDS:
        raise ValueError(f"format must be 'msgpack' or 'orbax', got {fmt!r}")
    variables = jax.tree.map(np.asarray, {k: variables[k] for k in COLLECTIONS})
    check_variables(variables, metadata)
    metadata = {'format_version': FORMAT_VERSION, **metadata}
    if fmt == 'msgpack':
        atomic_write_bytes(path, serialization.msgpack_serialize(
            {'variables': variables, 'metadata': metadata}), OUTPUT_KINDS[fmt])
    else:
        import orbax.checkpoint as ocp

        def write(tmp: Path):
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp.absolute() / 'variables', variables)
            (tmp / 'metadata.json').write_text(json.dumps(metadata, indent=2))
        silence_orbax()
        atomic_write(path, write, OUTPUT_KINDS[fmt])


def _read_metadata_json(folder: Path) -> Any:
    try:
        return json.loads((folder / 'metadata.json').read_bytes())
    except FileNotFoundError:
        raise ValueError('it has no metadata.json') from None
    except ValueError as e:  # JSON's, or Unicode's
        raise ValueError(f'metadata.json is not valid JSON ({first_line(e)})') from None


def read(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """Returns `(variables, metadata)` of a file `save` wrote, as numpy arrays, or of a
    pretrained name (`PRETRAINED_SCHEMES`: 'hf-hub:timm/tf_efficientnetv2_s.in1k',
    'torchvision:efficientnet_v2_s', 'local-dir:FOLDER'; converted once, then cached).

    FileNotFoundError if `path` does not exist; ValueError (one line) if it is not such a file or
    its variables do not fit the model its metadata describes (`check_variables`), or if a name
    cannot be resolved."""
    if str(path).startswith(PRETRAINED_SCHEMES):
        from effnetv2_jax import pretrained  # it reads weights files through this module
        return pretrained.read(str(path))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'{path}: no such file')
    try:
        if path.is_dir():
            import orbax.checkpoint as ocp
            metadata = _read_metadata_json(path)
            with ocp.StandardCheckpointer() as ckptr:
                variables = ckptr.restore(path.absolute() / 'variables')
        else:
            content = serialization.msgpack_restore(path.read_bytes())
            variables, metadata = content['variables'], content['metadata']
        variables = jax.tree.map(np.asarray, variables)
        check_variables(variables, metadata)
    except Exception as e:  # noqa: BLE001 - whatever fails to parse is the file's fault
        raise ValueError(f'{path} is not a valid effnetv2-jax weights file: '
                         f'{first_line(e)}') from None
    return variables, metadata


def load(path: str | os.PathLike, *, key: jax.Array | None = None, **overrides
         ) -> tuple[EfficientNetV2, dict]:
    """Loads converted weights, or pretrained ones by name (see `read`): returns
    `(model, variables)` ready for `model.apply`.

    `overrides` go to `create_model` (e.g. `dtype=jnp.bfloat16`, `features_only=True`,
    `num_classes=0` for pooled features). Another `num_classes` keeps everything but the
    classifier, which is initialised afresh from `key` (default `jax.random.key(0)`; none for 0):
    see `fit_classifier`.
    """
    variables, metadata = read(path)
    model = build_model(metadata, **overrides)
    key = jax.random.key(0) if key is None else key
    return model, fit_classifier(model, variables, key)
