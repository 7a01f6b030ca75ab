"""Pretrained weights by name: `hf-hub:`, `torchvision:` and `local-dir:` names to
`(variables, metadata)`, converted once and cached.

    hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k[@revision]   a timm repository on the Hub
    torchvision:efficientnet_v2_s[:IMAGENET1K_V1]               torchvision's weights (needs torch)
    local-dir:/path/to/folder                                   a folder in timm's Hub format

Hub files come through huggingface_hub (its cache, `HF_HUB_OFFLINE`, `HF_TOKEN` or `hf auth login`
for private repositories); the Hub path never imports torch. torchvision's files come through
torch.hub (its cache under `$TORCH_HOME`, the hash in the file name checked on download). The
converted weights are cached under `$EFFNETV2_JAX_WEIGHTS_CACHE` (default
`~/.cache/effnetv2_jax/weights`), keyed by repository and commit, or by torchvision's file name
(which holds its hash), so a second load reads one local file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from effnetv2_jax import checkpoint, converter, hub
from effnetv2_jax.converter import CheckpointError
from effnetv2_jax.messages import first_line

SCHEMES = checkpoint.PRETRAINED_SCHEMES
CACHE_ENV = 'EFFNETV2_JAX_WEIGHTS_CACHE'
CACHE_VERSION = 1  # bump when a conversion's output changes: older entries are then not read


def cache_dir() -> Path:
    """Where converted weights are kept (see the module docstring)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'effnetv2_jax' / 'weights')


def read(name: str) -> tuple[dict, dict[str, Any]]:
    """`(variables, metadata)` of a pretrained name (module docstring); metadata['source'] says
    where they came from. ValueError (one line) when the name cannot be resolved or loaded."""
    scheme, _, rest = name.partition(':')
    if not rest:
        raise ValueError(f'{name}: empty name after {scheme}:')
    readers = {'hf-hub': _read_hub, 'torchvision': _read_torchvision,
               'local-dir': lambda name, folder: hub.read_folder(folder, name)}
    if scheme not in readers:
        raise ValueError(f'{name}: unknown scheme; one of {", ".join(SCHEMES)}')
    try:
        return readers[scheme](name, rest)
    except CheckpointError as e:
        raise ValueError(f'{name}: {e}') from None


def _cached(key: tuple[str, ...], name: str, convert) -> tuple[dict, dict[str, Any]]:
    """The weights cached under `key`, else `convert()`'s, cached for next time (a cache that
    cannot be written costs only the next load's conversion: a warning, not an error)."""
    path = cache_dir().joinpath(f'v{CACHE_VERSION}', *key[:-1], f'{key[-1]}.msgpack')
    if path.is_file():
        try:
            return checkpoint.read(path)
        except ValueError:  # damaged or from an incompatible version: convert again
            pass
    variables, metadata = convert()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(path, variables, metadata)
    except OSError as e:
        print(f'warning: cannot cache the converted {name}: {first_line(e)}', file=sys.stderr)
    return variables, metadata


# --- the Hugging Face Hub ----------------------------------------------------------------------

def _hub_errors():
    """huggingface_hub's errors, most specific first, with what each means for a user."""
    from huggingface_hub import errors
    return (
        (errors.GatedRepoError, 'the repository is gated: accept its terms on the Hub and log in '
         '(hf auth login, or HF_TOKEN)'),
        (errors.RepositoryNotFoundError, 'no such repository on the Hugging Face Hub (or it is '
         'private: log in with hf auth login, or set HF_TOKEN)'),
        (errors.RevisionNotFoundError, 'no such revision in the repository'),
        (errors.LocalEntryNotFoundError, 'not in the local Hugging Face cache, and the Hub cannot '
         'be reached (offline, or HF_HUB_OFFLINE=1)'),
        (errors.EntryNotFoundError, f'the repository has no {hub.CONFIG_NAME} and '
         f'{hub.WEIGHTS_NAME} (not a timm model)'),
        (errors.HFValidationError, 'not a valid repository name (owner/name[@revision])'),
        (OSError, 'cannot download it'),
    )


def _download(name: str, repo_id: str, filename: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(f'{name}: hf-hub: names need huggingface_hub: pip install '
                         'huggingface_hub') from None
    from effnetv2_jax import __version__
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision,
                                    library_name='effnetv2-jax', library_version=__version__))
    except Exception as e:  # noqa: BLE001 - mapped to a one-line reason below, else re-raised
        for kind, reason in _hub_errors():
            if isinstance(e, kind):
                detail = f' ({first_line(e)})' if kind is OSError else ''
                raise ValueError(f'{name}: {reason}{detail}') from None
        raise


def _read_hub(name: str, rest: str) -> tuple[dict, dict[str, Any]]:
    repo_id, _, revision = rest.partition('@')
    config_path = _download(name, repo_id, hub.CONFIG_NAME, revision or None)
    # huggingface_hub keeps a repository's files in snapshots/<commit>/: the commit resolved now.
    commit = config_path.parent.name

    def convert():
        folder = _download(name, repo_id, hub.WEIGHTS_NAME, commit).parent
        return hub.read_folder(folder, f'hf-hub:{repo_id}@{commit}')
    return _cached(('hf-hub', repo_id.replace('/', '--'), commit), name, convert)


# --- torchvision -------------------------------------------------------------------------------

def _read_torchvision(name: str, rest: str) -> tuple[dict, dict[str, Any]]:
    try:
        import torch
        import torchvision
    except ImportError:
        raise ValueError(f'{name}: torchvision: names need torch and torchvision: pip install '
                         "'effnetv2-jax[torch]' torchvision") from None
    model_name, _, tag = rest.partition(':')
    if not model_name.startswith('efficientnet_v2_'):
        raise ValueError(f'{name}: not an EfficientNetV2 of torchvision (efficientnet_v2_s, '
                         'efficientnet_v2_m, efficientnet_v2_l)')
    try:
        weights_enum = torchvision.models.get_model_weights(model_name)
    except ValueError:
        raise ValueError(f'{name}: torchvision has no model {model_name!r}') from None
    if tag and tag not in weights_enum.__members__:
        raise ValueError(f'{name}: torchvision has no weights {tag!r} for {model_name}; one of '
                         f'{", ".join(weights_enum.__members__)}')
    weights = weights_enum[tag] if tag else weights_enum.DEFAULT
    file_name = weights.url.rsplit('/', 1)[-1]  # e.g. efficientnet_v2_s-dd5fe13b.pth

    def convert():
        try:
            state_dict = torch.hub.load_state_dict_from_url(
                weights.url, map_location='cpu', check_hash=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - no network, a failed hash check, a bad file
            raise ValueError(f'{name}: cannot download {weights.url}: {first_line(e)}') from None
        variables, metadata = converter.torch_to_flax(converter.to_numpy(state_dict),
                                                      'torchvision')
        metadata.update(source=f'torchvision:{model_name}:{weights.name}',
                        class_names=list(weights.meta['categories']))
        return variables, metadata
    return _cached(('torchvision', file_name.removesuffix('.pth')), name, convert)
