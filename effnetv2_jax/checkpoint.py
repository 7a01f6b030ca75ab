"""The converted-weights file: Flax variables plus the metadata needed to rebuild the model.

Two formats, same content: one Flax msgpack file (`{'variables': ..., 'metadata': ...}`), or an
Orbax checkpoint directory (`variables/` via Orbax, `metadata.json` beside it). Writes are atomic
(`files.atomic_write`): a failed write never leaves a partial file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from effnetv2_jax.files import atomic_write, atomic_write_bytes
from effnetv2_jax.model import EfficientNetV2, create_model

FORMAT_VERSION = 1
MODEL_KEYS = ('variant', 'num_classes', 'padding', 'bn_eps')  # metadata that shapes the model


def build_model(metadata: dict[str, Any], **overrides) -> EfficientNetV2:
    """The model that a weights file's metadata (MODEL_KEYS) describes; `overrides` as in
    `create_model` take precedence."""
    kwargs = {'num_classes': metadata['num_classes'], 'padding': metadata['padding'],
              'bn_eps': metadata['bn_eps'], **overrides}
    return create_model(metadata['variant'], **kwargs)


def save(path: str | os.PathLike, variables, metadata: dict[str, Any], fmt: str = 'msgpack'):
    """Writes `{'params', 'batch_stats'}` and `metadata` (JSON-able, with MODEL_KEYS) atomically."""
    path = Path(path)
    missing = [k for k in MODEL_KEYS if k not in metadata]
    if missing:
        raise ValueError(f'metadata lacks {missing}')
    metadata = {'format_version': FORMAT_VERSION, **metadata}
    variables = jax.tree.map(np.asarray, {k: variables[k] for k in ('params', 'batch_stats')})
    if fmt == 'msgpack':
        atomic_write_bytes(path, serialization.msgpack_serialize(
            {'variables': variables, 'metadata': metadata}))
    elif fmt == 'orbax':
        import orbax.checkpoint as ocp

        def write(tmp: Path):
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp.absolute() / 'variables', variables)
            (tmp / 'metadata.json').write_text(json.dumps(metadata, indent=2))
        atomic_write(path, write, directory=True, replace_directory=True)
    else:
        raise ValueError(f"format must be 'msgpack' or 'orbax', got {fmt!r}")


def read(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """Returns `(variables, metadata)` of a file `save` wrote, as numpy arrays."""
    path = Path(path)
    if path.is_dir():
        import orbax.checkpoint as ocp
        with ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(path.absolute() / 'variables')
        metadata = json.loads((path / 'metadata.json').read_text())
    else:
        try:
            content = serialization.msgpack_restore(path.read_bytes())
            variables, metadata = content['variables'], content['metadata']
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f'{path} is not an effnetv2-jax weights file ({e})') from None
    return jax.tree.map(np.asarray, variables), metadata


def load(path: str | os.PathLike, **overrides) -> tuple[EfficientNetV2, dict]:
    """Loads converted weights: returns `(model, variables)` ready for `model.apply`.

    `overrides` go to `create_model` (e.g. `dtype=jnp.bfloat16`, `features_only=True`,
    `num_classes=0` for pooled features: the classifier's variables are then unused).
    """
    variables, metadata = read(path)
    return build_model(metadata, **overrides), variables
