"""Reading and writing PyTorch checkpoints safely: never unpickles code, never half-writes."""
from __future__ import annotations

import argparse
import collections
import os
import pickle
import pickletools
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from effnetv2_jax.converter import PRODUCER, CheckpointError, Description, to_numpy
from effnetv2_jax.files import OutputKind, atomic_write
from effnetv2_jax.messages import first_line

EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema', 'ema_state_dict')
MODEL_KEYS = ('state_dict', 'model', 'model_state_dict', 'net', 'params')
# Every PyTorch file this project writes carries its producer and its writer, so that a rerun
# replaces its own output and nothing else (not a save_pretrained folder's weights, which carry
# another writer): in the safetensors header's metadata, or (torch.save) as the root entry of
# the state_dict's `_metadata`, the per-module dict `nn.Module.load_state_dict` passes on and
# otherwise ignores. Files of releases before the writer was recorded carry the producer alone:
# such a file may be a save_pretrained folder's weights, so --to-torch replaces none of them.
EXPORT_MARK = {'producer': PRODUCER, 'written_by': 'convert --to-torch'}
# What a --to-torch file says of its weights besides the tensors, so that converting it back
# needs no flags: the layout written and the model the weights are of.
EXPORT_FIELDS = ('layout', 'variant', 'padding', 'bn_eps')
# timm's train.py saves its argparse.Namespace of flags (`args`) in every checkpoint; torch's
# weights_only unpickler may rebuild that (a plain attribute bag) and nothing more.
SAFE_CLASSES = [argparse.Namespace]
TIMM_CLASS_NAME = 'efficientnet'  # the `arch` timm's train.py saves without `args`: any model


class TorchCheckpoint(NamedTuple):
    """A PyTorch checkpoint as read: the state_dict (float32 numpy, see `to_numpy`), which entry
    of the file it is (`where`, for messages), and what the file says of it, if anything."""
    state_dict: dict[str, np.ndarray]
    where: str
    description: Optional[Description]


def _torch_load(path: Path, mmap: bool = False):
    import torch
    with warnings.catch_warnings(), torch.serialization.safe_globals(SAFE_CLASSES):
        warnings.simplefilter('ignore')  # torch warns about old pickle protocols on stderr
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)


def _marks(path: Path, loaded=None) -> dict:
    """The producer metadata of a PyTorch file (see PRODUCER); {} for none. `loaded`: the file's
    content where it is read already (torch.save files)."""
    if path.suffix == '.safetensors':
        from safetensors import safe_open
        with safe_open(str(path), 'np') as f:
            return f.metadata() or {}
    if loaded is None:
        loaded = _torch_load(path, mmap=True)
    marks = getattr(loaded, '_metadata', {}).get('')
    return marks if isinstance(marks, dict) else {}


def _is_our_export(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        marks = _marks(path)
    except Exception:  # noqa: BLE001 - unreadable: not one of ours
        return False
    return all(marks.get(k) == v for k, v in EXPORT_MARK.items())


EXPORT_KIND = OutputKind('a PyTorch file written by python -m convert --to-torch',
                         _is_our_export)


def _is_state_dict(obj) -> bool:
    import torch
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def _load_raw(path: Path):
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise CheckpointError(f'{path}: not a readable safetensors file ({first_line(e)})')
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as e:
        if 'global' in str(e).lower() or _pickle_imports_objects(path):
            raise CheckpointError(
                f'{path}: refused: the checkpoint holds pickled objects other than tensors and '
                'plain containers (it could run code when loaded); re-save its state_dict')
        raise CheckpointError(f'{path}: not a PyTorch checkpoint (unreadable pickle data)')
    except Exception as e:  # noqa: BLE001 - any failure to parse is the file's fault
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint, or truncated '
                              f'({first_line(e)})')


def _pickle_imports_objects(path: Path) -> bool:
    """Whether a raw pickle file names classes or functions (read by opcode, never run)."""
    try:
        with open(path, 'rb') as f:
            return any(op.name in ('GLOBAL', 'STACK_GLOBAL', 'INST', 'OBJ')
                       for op, _, _ in pickletools.genops(f))
    except Exception:  # noqa: BLE001 - not a well-formed pickle: nothing was imported
        return False


def _exported(path: Path, loaded) -> Optional[Description]:
    """What a --to-torch file says of its weights (EXPORT_FIELDS); None for another file."""
    marks = _marks(path, loaded)
    if not all(marks.get(k) == v for k, v in EXPORT_MARK.items()):
        return None
    if not all(isinstance(marks.get(k), str) for k in EXPORT_FIELDS):
        return None  # written without them (write_state_dict's `model`): as any checkpoint
    fields = {k: marks[k] for k in EXPORT_FIELDS}
    try:
        fields['bn_eps'] = float(fields['bn_eps'])
    except ValueError:
        raise CheckpointError(f'{path}: its {PRODUCER} metadata has bn_eps '
                              f'{fields["bn_eps"]!r}, not a number') from None
    return Description(f"the file's {PRODUCER} metadata", **fields)


def _trained(checkpoint: dict) -> Optional[Description]:
    """What a training checkpoint says of its model: timm's train.py saves the model's name as
    `arch` and its flags as `args` (a Namespace: `model`, `bn_eps`, `gp`, `model_kwargs`),
    torchvision's reference scripts the flags alone. None where it names no model."""
    args = checkpoint.get('args')
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    args = args if isinstance(args, dict) else {}
    origin, name = next(((origin, name) for origin, name in (
        ("the checkpoint's arch", checkpoint.get('arch')),
        ("the checkpoint's args.model", args.get('model'))) if isinstance(name, str)),
        (None, None))
    if name is None or name.lower() == TIMM_CLASS_NAME:
        return None
    model_args = args.get('model_kwargs')
    model_args = dict(model_args) if isinstance(model_args, dict) else {}
    for key, flag in (('bn_eps', 'bn_eps'), ('global_pool', 'gp')):
        if args.get(flag) is not None:
            model_args[key] = args[flag]
    return Description(origin, architecture=name, model_args=model_args)


def read_state_dict(path: str | os.PathLike, ema: bool = False) -> TorchCheckpoint:
    """Loads a .pth/.pt/.bin/.safetensors file: its float32 numpy state_dict, where in the file
    that was, and what the file says of the model (a training checkpoint's model name, a
    --to-torch file's metadata).

    Unwraps `{'model': sd}`, `{'state_dict': sd}` and EMA entries (with `ema=True`), strips
    `module.` / `_orig_mod.` prefixes and drops `num_batches_tracked`. `where` names the entry used
    (and hints at EMA weights left unused).
    """
    path = Path(path)
    obj = _load_raw(path)
    where, description = 'top level', None
    if isinstance(obj, dict) and not _is_state_dict(obj):
        keys = EMA_KEYS if ema else MODEL_KEYS
        found = [k for k in keys if _is_state_dict(obj.get(k))]
        if not found:
            what = 'EMA state_dict' if ema else 'state_dict'
            raise CheckpointError(
                f'{path}: found no {what} (looked for {", ".join(keys)}); top-level keys: '
                f'{", ".join(map(str, list(obj)[:10]))}')
        if not ema and any(_is_state_dict(obj.get(k)) for k in EMA_KEYS):
            where = f"'{found[0]}' (EMA weights present too: --ema takes them)"
        else:
            where = f"'{found[0]}'"
        description = _trained(obj)
        obj = obj[found[0]]
    elif ema:
        raise CheckpointError(f'{path}: --ema given but the file holds a bare state_dict')
    else:
        description = _exported(path, obj)
    if not _is_state_dict(obj):
        raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not a state_dict')
    return TorchCheckpoint(to_numpy(obj), where, description)


def write_state_dict(path: str | os.PathLike, state_dict: dict[str, np.ndarray],
                     model: Optional[dict[str, Any]] = None):
    """Writes a torch state_dict (`.safetensors` by suffix, else `torch.save`) atomically, over
    nothing but a file written by this function (`EXPORT_KIND`). `model` (EXPORT_FIELDS: the
    layout written, variant, padding, bn_eps) goes into the file's metadata, so that
    `read_state_dict` reads it back."""
    import torch
    path = Path(path)
    marks = {**EXPORT_MARK, **{k: str(model[k]) for k in EXPORT_FIELDS if model}}
    tensors = collections.OrderedDict(
        (k, torch.from_numpy(np.array(v, order='C'))) for k, v in state_dict.items())
    tensors._metadata = {'': marks}

    def write(tmp: Path):
        if path.suffix == '.safetensors':
            from safetensors.torch import save_file
            save_file(tensors, tmp, metadata=marks)
        else:
            torch.save(tensors, tmp)
    atomic_write(path, write, EXPORT_KIND)
