"""Reading and writing PyTorch checkpoints safely: never unpickles code, never half-writes."""
from __future__ import annotations

import collections
import os
import pickle
import pickletools
import warnings
from pathlib import Path

import numpy as np

from effnetv2_jax.messages import first_line
from effnetv2_jax.files import OutputKind, atomic_write

EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema', 'ema_state_dict')
MODEL_KEYS = ('state_dict', 'model', 'model_state_dict', 'net', 'params')
STRIP_PREFIXES = ('module.', '_orig_mod.')  # DataParallel / DDP, torch.compile
# Files `write_state_dict` writes carry this, so that a rerun may replace them and nothing else:
# in the safetensors header's metadata, or (torch.save) as the root entry of the state_dict's
# `_metadata`, the per-module dict `nn.Module.load_state_dict` passes on and otherwise ignores.
PRODUCER = {'producer': 'effnetv2-jax'}


def _is_our_export(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        if path.suffix == '.safetensors':
            from safetensors import safe_open
            with safe_open(str(path), 'np') as f:
                return (f.metadata() or {}).get('producer') == PRODUCER['producer']
        import torch
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            state_dict = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        return getattr(state_dict, '_metadata', {}).get('') == PRODUCER
    except Exception:  # noqa: BLE001 - unreadable: not one of ours
        return False


EXPORT_KIND = OutputKind('a PyTorch file written by python -m convert --to-torch',
                         _is_our_export)


class CheckpointError(Exception):
    """A user-facing problem with an input file or its contents (one line, exit status 2)."""


def _is_state_dict(obj) -> bool:
    import torch
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def _load_raw(path: Path):
    import torch
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise CheckpointError(f'{path}: not a readable safetensors file ({first_line(e)})')
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols on stderr
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
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


def read_state_dict(path: str | os.PathLike, ema: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """Loads a .pth/.pt/.bin/.safetensors file and returns (float32 numpy state_dict, where).

    Unwraps `{'model': sd}`, `{'state_dict': sd}` and EMA entries (with `ema=True`), strips
    `module.` / `_orig_mod.` prefixes and drops `num_batches_tracked`. `where` names the entry used
    (and hints at EMA weights left unused).
    """
    obj = _load_raw(Path(path))
    where = 'top level'
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
        obj = obj[found[0]]
    elif ema:
        raise CheckpointError(f'{path}: --ema given but the file holds a bare state_dict')
    if not _is_state_dict(obj):
        raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not a state_dict')
    return to_numpy(obj), where


def to_numpy(state_dict) -> dict[str, np.ndarray]:
    """A torch state_dict as float32 numpy arrays, without `num_batches_tracked` and without the
    `module.` / `_orig_mod.` prefixes of DataParallel, DDP and torch.compile."""
    out = {}
    for key, tensor in state_dict.items():
        for prefix in STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        if not key.endswith('num_batches_tracked'):
            out[key] = tensor.detach().float().cpu().numpy()
    return out


def write_state_dict(path: str | os.PathLike, state_dict: dict[str, np.ndarray]):
    """Writes a torch state_dict (`.safetensors` by suffix, else `torch.save`) atomically, over
    nothing but a file written by this function (`EXPORT_KIND`)."""
    import torch
    path = Path(path)
    tensors = collections.OrderedDict(
        (k, torch.from_numpy(np.array(v, order='C'))) for k, v in state_dict.items())
    tensors._metadata = {'': PRODUCER}

    def write(tmp: Path):
        if path.suffix == '.safetensors':
            from safetensors.torch import save_file
            save_file(tensors, tmp, metadata=PRODUCER)
        else:
            torch.save(tensors, tmp)
    atomic_write(path, write, EXPORT_KIND)
