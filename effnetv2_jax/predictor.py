"""Predictions for people: images in, top-k labels out, through the weights' own eval transform.

    predictor = effnetv2_jax.Predictor('efficientnetv2_s.msgpack')
    predictor.predict('cat.jpg')       # [[Prediction(index=281, label='tabby', probability=.87), ...]]

`python -m effnetv2_jax.predict` (predict.py) is the same from a shell.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from effnetv2_jax.cache import enable_compilation_cache
from effnetv2_jax.checkpoint import build_model, check_finite, read
from effnetv2_jax.messages import first_few
from effnetv2_jax.transforms import (ImageLike, as_image_list, check_spec, eval_crops,
                                     normalize)


class Prediction(NamedTuple):
    index: int
    label: str
    probability: float


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (torchvision's), shipped with the package."""
    text = resources.files('effnetv2_jax').joinpath('imagenet_classes.txt').read_text('utf-8')
    return text.splitlines()


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a file: one per line, or JSON: a list, or a dict index -> name as the
    class_indices.json of WZMIAOMIAO's scripts ({"0": "daisy", ...}) or index -> [id, name] as Keras'
    imagenet_class_index.json."""
    path = Path(path)
    text = path.read_text('utf-8')
    if path.suffix != '.json':
        return [line.strip() for line in text.strip('\n').splitlines()]
    try:
        content = json.loads(text)
        if isinstance(content, dict):
            content = [content[str(i)] for i in range(len(content))]
        return [name[-1] if isinstance(name, list) else str(name) for name in content]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'cannot read labels {path}: expected a list or {{"0": name, ...}} '
                         f'({type(e).__name__}: {e})') from None


class Predictor:
    """A jitted classifier over converted (or trained) weights.

    `weights`: a file `effnetv2_jax.save`, `python -m convert` or `python -m train` wrote, or a
    pretrained name ('hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k', 'torchvision:...').
    `preprocessing`: keys of the eval transform spec to override (`size`, `resize`, `crop_pct`,
    `interpolation`, `mean`, `std`); the rest comes from the file's metadata.
    `labels`: a labels file or a list of names; default: the file's class names, else ImageNet's
    for 1000 classes, else the class index as text.
    `compilation_cache`: True (the default location, see `enable_compilation_cache`), a
    directory, or False; a second process then skips compiling the forward.
    """

    def __init__(self, weights: str | os.PathLike, *, preprocessing: dict | None = None,
                 labels: str | os.PathLike | Sequence[str] | None = None, batch_size: int = 32,
                 dtype: Any = jnp.float32, compilation_cache: bool | str | os.PathLike = True):
        if compilation_cache:
            enable_compilation_cache(None if compilation_cache is True else compilation_cache)
        variables, self.metadata = read(weights)
        check_finite(variables, weights)
        num_classes = self.metadata['num_classes']
        if num_classes == 0:
            raise ValueError(f'{weights} has no classifier (num_classes 0): use '
                             'effnetv2_jax.load for features')
        self.spec = {**(self.metadata.get('preprocessing') or {}), **(preprocessing or {})}
        check_spec(self.spec)
        self.labels = self._labels(labels, num_classes)
        self.batch_size = batch_size
        self.model = build_model(self.metadata, dtype=dtype)
        self.variables = jax.device_put(variables)
        # uint8 crosses to the device, a quarter of float32's bytes; normalised there.
        self._logits = jax.jit(lambda v, x: self.model.apply(v, normalize(x, self.spec)))

    def _labels(self, labels, num_classes: int) -> list[str]:
        if isinstance(labels, (str, os.PathLike)):
            labels = read_labels(labels)
        elif labels is None:
            labels = self.metadata.get('class_names') or (
                imagenet_class_names() if num_classes == 1000 else map(str, range(num_classes)))
        labels = list(labels)
        if len(labels) != num_classes:
            raise ValueError(f'{len(labels)} labels for weights of {num_classes} classes')
        return labels

    def logits(self, images: ImageLike | Sequence[ImageLike], progress: bool = False) -> np.ndarray:
        """float32 [N, num_classes] of one image or a sequence of them, in batches of
        `batch_size`; a last, smaller batch is padded to a power of two, which bounds the number
        of compiled shapes. `progress`: a tqdm bar on stderr."""
        images = as_image_list(images)
        outputs = []
        with tqdm(total=len(images), unit='img', disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(images), self.batch_size):
                batch = eval_crops(images[start:start + self.batch_size], self.spec)
                n = len(batch)
                padding = min(self.batch_size, 1 << (n - 1).bit_length()) - n
                batch = np.concatenate([batch, np.zeros((padding, *batch.shape[1:]), np.uint8)])
                outputs.append(np.asarray(self._logits(self.variables, batch))[:n])
                bar.update(n)
        return np.concatenate(outputs)

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 5,
                progress: bool = False) -> list[list[Prediction]]:
        """The `top_k` most probable classes of each image, most probable first. ValueError if
        the model's logits of an image overflow to Inf or NaN (weights too large for the
        dtype): there are no probabilities to give then."""
        images = as_image_list(images)
        logits = self.logits(images, progress).astype(np.float64)
        overflowed = np.flatnonzero(~np.isfinite(logits).all(-1))
        if overflowed.size:
            names = [images[i] if isinstance(images[i], (str, os.PathLike)) else f'image {i}'
                     for i in overflowed]
            raise ValueError(f'the logits of {first_few(names, 3)} overflow to Inf or NaN: the '
                             f'weights are too large for {jnp.dtype(self.model.dtype).name}')
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        top = np.argsort(-probabilities, axis=-1, kind='stable')[:, :top_k]
        return [[Prediction(int(i), self.labels[i], float(p[i])) for i in row]
                for row, p in zip(top, probabilities)]

    __call__ = predict
