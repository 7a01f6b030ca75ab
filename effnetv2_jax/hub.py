"""EfficientNetV2 weights in timm's Hugging Face Hub format, both ways, without torch.

timm's Hub repositories (and `timm.models._hub.save_for_hf`) hold two files: `model.safetensors`,
a timm state_dict, and `config.json`: `architecture` (e.g. `tf_efficientnetv2_s`), `num_classes`,
`model_args` (keyword arguments of the architecture), `pretrained_cfg` (the eval transform:
input sizes, `crop_pct`, `crop_mode`, `interpolation`, `mean`, `std`) and, where the weights carry
them, `label_names` and `label_descriptions`. `read_folder` turns such a folder into
`(variables, metadata)`, `save_pretrained` writes one that `timm.create_model('local-dir:...')`
loads, `push_to_hub` uploads it. numpy, safetensors and huggingface_hub only.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from effnetv2_jax import converter, layouts
from effnetv2_jax.configs import TIMM_OWN, TIMM_TF, get_variant, timm_model
from effnetv2_jax.converter import PRODUCER, CheckpointError
from effnetv2_jax.files import OutputKind, atomic_write
from effnetv2_jax.messages import first_line
from effnetv2_jax.transforms import IMAGENET_NORMALISATION, RESAMPLING, resize_size

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = 'config.json', 'model.safetensors', 'README.md'
# In the metadata of the model.safetensors `save_pretrained` writes: its own writer, not that of
# a --to-torch file (torch_io.EXPORT_MARK), so that neither is replaced by the other's writer.
WEIGHTS_MARK = {'format': 'pt', 'producer': PRODUCER, 'written_by': 'save_pretrained'}
# timm's defaults where a pretrained_cfg leaves a field out (timm.data.resolve_data_config).
DEFAULT_SIZE, DEFAULT_CROP_PCT, DEFAULT_CROP_MODE = 224, 0.875, 'center'
CROP_MODES = {'center': 'shorter', 'squash': 'squash'}  # timm's crop_mode -> our `resize`
# timm architectures named EfficientNetV2 whose blocks this package does not build, and why.
UNSUPPORTED = {'gc_efficientnetv2_rw_t': 'global-context attention in place of squeeze-excite'}


def architecture(config: dict) -> tuple[str, str, float]:
    """(variant, padding, BN eps) of a timm config; ValueError (one line) for another model."""
    name, args = config.get('architecture'), config.get('model_args') or {}
    if name in UNSUPPORTED:
        raise ValueError(f"timm's {name} has {UNSUPPORTED[name]}, a block this package does not "
                         'build')
    if not isinstance(name, str) or not name.removeprefix('tf_').startswith('efficientnetv2_'):
        raise ValueError(f'its architecture is {name!r}, not an EfficientNetV2 '
                         "(timm's tf_efficientnetv2_* or efficientnetv2_*)")
    try:
        variant, family = timm_model(name)
    except ValueError:
        raise ValueError(f'its architecture {name!r} is not one this package builds') from None
    try:
        padding, bn_eps = layouts.timm_model_args(args)
    except ValueError as e:
        raise ValueError(f'its model_args {e}') from None
    # timm's default eps follows the architecture's name, not a pad_type given in model_args.
    return variant.name, padding or family.padding, family.bn_eps if bn_eps is None else bn_eps


def preprocessing(pretrained_cfg: dict) -> dict:
    """The eval transform spec of a timm pretrained_cfg, as timm's `resolve_data_config(...,
    use_test_size=True)` and `create_transform` resolve it (timm's validate.py evaluates so)."""
    size = pretrained_cfg.get('test_input_size') or pretrained_cfg.get('input_size')
    height, width = size[-2:] if size else (DEFAULT_SIZE, DEFAULT_SIZE)
    crop_mode = pretrained_cfg.get('crop_mode') or DEFAULT_CROP_MODE
    interpolation = pretrained_cfg.get('interpolation') or 'bicubic'
    if height != width or crop_mode not in CROP_MODES or interpolation not in RESAMPLING:
        raise ValueError(f'its eval transform ({height}x{width}, crop_mode {crop_mode!r}, '
                         f'{interpolation}) is not one this package reproduces')
    return {'size': int(height), 'resize': CROP_MODES[crop_mode],
            'crop_pct': float(pretrained_cfg.get('test_crop_pct') or pretrained_cfg.get('crop_pct')
                              or DEFAULT_CROP_PCT),
            'interpolation': interpolation,
            'mean': [float(v) for v in pretrained_cfg.get('mean') or IMAGENET_NORMALISATION['mean']],
            'std': [float(v) for v in pretrained_cfg.get('std') or IMAGENET_NORMALISATION['std']]}


def class_names(config: dict, num_classes: int) -> list[str] | None:
    """Human-readable class names: `label_descriptions` of the `label_names` where given (e.g.
    'tench, Tinca tinca' for 'n01440764'), else the names; None without one per class."""
    pretrained_cfg = config.get('pretrained_cfg') or {}
    names = config.get('label_names') or pretrained_cfg.get('label_names')
    descriptions = config.get('label_descriptions') or pretrained_cfg.get('label_descriptions') or {}
    if isinstance(names, dict):  # index -> name, where indices may have gaps
        names = [names.get(str(i), names.get(i)) for i in range(num_classes)]
    if not isinstance(names, list) or len(names) != num_classes or not all(
            isinstance(n, str) for n in names):
        return None
    return [str(descriptions.get(n, n)) if isinstance(descriptions, dict) else n for n in names]


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A safetensors state_dict as float32 numpy arrays, without `num_batches_tracked` (bfloat16
    and float16 files are read through JAX, which numpy alone cannot)."""
    from safetensors import safe_open
    state_dict = {}
    with safe_open(str(path), 'flax') as f:
        for key in f.keys():
            if not key.endswith('num_batches_tracked'):
                state_dict[key] = np.asarray(f.get_tensor(key), np.float32)
    return state_dict


def read_folder(folder: str | os.PathLike, source: str) -> tuple[dict, dict[str, Any]]:
    """`(variables, metadata)` of a folder holding timm's `config.json` and `model.safetensors`;
    `source` is recorded in the metadata. ValueError (one line) for anything else."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        variant, padding, bn_eps = architecture(config)
        spec = preprocessing(config.get('pretrained_cfg') or {})
        state_dict = read_state_dict(folder / WEIGHTS_NAME)
        variables, metadata = converter.torch_to_flax(state_dict, 'timm', variant, padding, bn_eps)
    except Exception as e:  # noqa: BLE001 - whatever fails to parse is the files' fault
        raise ValueError(f"{source}: not an EfficientNetV2 in timm's format ({first_line(e)})"
                         ) from None
    if config.get('num_classes', metadata['num_classes']) != metadata['num_classes']:
        raise ValueError(f"{source}: config.json says {config['num_classes']} classes, the "
                         f"weights have {metadata['num_classes']}")
    metadata.update(preprocessing=spec, source=source)
    names = class_names(config, metadata['num_classes'])
    if names:
        metadata['class_names'] = names
    return variables, metadata


def config(metadata: dict[str, Any]) -> dict[str, Any]:
    """The timm `config.json` of weights with this metadata: `read_folder` reads it back to the
    same model, eval transform and class names, and so does timm."""
    variant, padding, bn_eps = metadata['variant'], metadata['padding'], metadata['bn_eps']
    # The architecture whose padding the weights have where timm has it (tf_*: 'same'); else
    # the other one, with pad_type: timm has no tf_ rw variants, and no symmetric B0-B3.
    tf = variant in TIMM_TF.variants and (padding == 'same' or variant not in TIMM_OWN.variants)
    # bn_eps always: a reader that takes the default eps from the padding rather than from the
    # architecture would read a tf_ model with pad_type '' (still eps 1e-3 in timm) as 1e-5.
    model_args = {'num_classes': metadata['num_classes'], 'bn_eps': bn_eps}
    if padding != ('same' if tf else 'symmetric'):
        model_args['pad_type'] = 'same' if padding == 'same' else ''
    spec = metadata.get('preprocessing') or layouts.TIMM.preprocessing(
        get_variant(variant), padding, metadata['num_classes'])
    out = {
        'architecture': f'{"tf_" if tf else ""}efficientnetv2_{variant}',
        'num_classes': metadata['num_classes'],
        'num_features': get_variant(variant).head_channels,
        'global_pool': 'avg',
        'model_args': model_args,
        'pretrained_cfg': {
            'custom_load': False, 'input_size': [3, spec['size'], spec['size']],
            'fixed_input_size': False, 'interpolation': spec['interpolation'],
            'crop_pct': spec['crop_pct'],
            'crop_mode': {v: k for k, v in CROP_MODES.items()}[spec['resize']],
            'mean': spec['mean'], 'std': spec['std'], 'num_classes': metadata['num_classes'],
            'first_conv': 'conv_stem', 'classifier': 'classifier'},
    }
    if metadata.get('class_names'):
        out['label_names'] = metadata['class_names']
    return out


MODEL_CARD = """---
library_name: timm
pipeline_tag: image-classification
tags:
- image-classification
- timm
- effnetv2-jax
---
# EfficientNetV2-{variant}, {title}

EfficientNetV2 ([arXiv:2104.00298](https://arxiv.org/abs/2104.00298)) weights in timm's format,
written by effnetv2-jax's `save_pretrained`. timm builds them as `{architecture}` (with the
`model_args` of `config.json`), effnetv2-jax as EfficientNetV2-{variant}; the two give the same
logits, to float32 rounding.
{classes}
Eval transform: {transform}.

## PyTorch, with timm

```python
import timm
from PIL import Image

model = timm.create_model('hf-hub:REPO_ID', pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
logits = model(transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0))
```

## JAX, with effnetv2-jax

```python
import effnetv2_jax

{jax_example}
```
"""
CARD_MAX_CLASS_NAMES = 20  # beyond, the card leaves the names to config.json's label_names


def model_card(metadata: dict[str, Any], content: dict[str, Any]) -> str:
    """The README.md of a `save_pretrained` folder whose `config.json` is `content`; `REPO_ID`
    stands for the repository, which `push_to_hub` fills in."""
    cfg = content['pretrained_cfg']
    size, crop_pct = cfg['input_size'][-1], cfg['crop_pct']
    scale = resize_size({'size': size, 'crop_pct': crop_pct})
    resize = (f'resize the shorter side to {scale} px' if cfg['crop_mode'] == 'center' else
              f'resize to {scale} x {scale} px (ignoring the aspect ratio)')
    numbers = lambda values: ', '.join(f'{v:g}' for v in values)
    names = content.get('label_names') or []
    classes = (f'\nClasses: {", ".join(names)}.\n' if 0 < len(names) <= CARD_MAX_CLASS_NAMES
               else '')
    return MODEL_CARD.format(
        variant=metadata['variant'].upper(), architecture=content['architecture'],
        title=f'{metadata["num_classes"]} classes' if metadata['num_classes'] else 'features',
        classes=classes, jax_example=(
            "predictor = effnetv2_jax.Predictor('hf-hub:REPO_ID')\n"
            f"print(predictor.predict('image.jpg', top_k={min(5, metadata['num_classes'])}))"
            if metadata['num_classes'] else
            "model, variables = effnetv2_jax.load('hf-hub:REPO_ID')  # pooled features [N, "
            f"{content['num_features']}]"),
        transform=f'{resize} and center-crop {size} x {size} px ({cfg["interpolation"]}), then '
                  f'normalise with mean ({numbers(cfg["mean"])}) and std ({numbers(cfg["std"])})')


def _is_pretrained_folder(path: Path) -> bool:
    """A folder `save_pretrained` wrote (or an empty one): nothing but its three files, the
    weights marked as its own, or with the producer alone as every release wrote them before
    writers were told apart (a folder of only these names was save_pretrained's then too)."""
    from safetensors import safe_open
    if not path.is_dir() or not {p.name for p in path.iterdir()} <= {
            CONFIG_NAME, WEIGHTS_NAME, CARD_NAME}:
        return False
    try:
        with safe_open(str(path / WEIGHTS_NAME), 'np') as f:
            marks = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable: ours only if there is nothing to lose
        return not any(path.iterdir())
    return marks.get('producer') == PRODUCER and marks.get('written_by') in (
        WEIGHTS_MARK['written_by'], None)


PRETRAINED_KIND = OutputKind('a folder written by effnetv2_jax.save_pretrained',
                             _is_pretrained_folder, directory=True)


def save_pretrained(directory: str | os.PathLike, variables, metadata: dict[str, Any]) -> Path:
    """Writes `directory` in timm's Hub format: `model.safetensors` (timm's state_dict keys),
    `config.json` (`config`) and a model card; loadable by `timm.create_model('local-dir:' +
    directory, pretrained=True)`, by `effnetv2_jax.load('local-dir:' + directory)`, and after
    `push_to_hub` by their `hf-hub:` names. Atomic; replaces only a folder it wrote
    (`files.OutputError` otherwise); ValueError if the variables do not fit the metadata.

    The arguments are in `effnetv2_jax.save`'s order; the former `(variables, metadata,
    directory)` still works, with a DeprecationWarning, until the next release."""
    from safetensors.numpy import save_file
    if isinstance(directory, Mapping):  # the variables first: the former order
        warnings.warn('save_pretrained(variables, metadata, directory) is deprecated: call '
                      'save_pretrained(directory, variables, metadata)', DeprecationWarning,
                      stacklevel=2)
        directory, variables, metadata = metadata, directory, variables
    try:
        state_dict = converter.flax_to_torch(variables, metadata, 'timm')
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    content = config(metadata)

    def write(tmp: Path):
        save_file(state_dict, tmp / WEIGHTS_NAME, metadata=WEIGHTS_MARK)
        (tmp / CONFIG_NAME).write_text(json.dumps(content, indent=2))
        (tmp / CARD_NAME).write_text(model_card(metadata, content))
    atomic_write(directory, write, PRETRAINED_KIND)
    return Path(directory)


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                token: str | None = None, commit_message: str = 'Upload EfficientNetV2 weights'
                ) -> str:
    """Uploads a `save_pretrained` folder to the Hub repository `repo_id` (created if missing;
    `token`: default huggingface_hub's login or $HF_TOKEN). Returns the commit's URL."""
    directory = Path(directory)
    if not _is_pretrained_folder(directory) or not (directory / CONFIG_NAME).is_file():
        raise ValueError(f'{directory} is not a folder written by save_pretrained')
    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    # The card names the repository; everything else goes up as it is.
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=(
        p.read_bytes().replace(b'REPO_ID', repo_id.encode()) if p.name == CARD_NAME else str(p)))
        for p in sorted(directory.iterdir())]
    return api.create_commit(repo_id, operations=operations,
                             commit_message=commit_message).commit_url
