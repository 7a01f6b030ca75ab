"""Eval-time image preprocessing that reproduces the transform each weights source expects.

`spec` is the `metadata['preprocessing']` dict of a converted checkpoint: `size`, `resize`
('shorter' | 'squash'), `crop_pct`, `interpolation` ('bilinear' | 'bicubic' | 'nearest'),
`mean`, `std`. Only numpy and PIL are needed, so data-loading processes stay light.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

# The two normalisations of the weights in circulation (REFERENCE.md): ImageNet statistics, and
# mean = std = 0.5 (the seed, TF-trained weights). Lists, so that they serialise as metadata.
IMAGENET_NORMALISATION = {'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}
HALF_NORMALISATION = {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}

RESAMPLING = {
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'nearest': Image.Resampling.NEAREST,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 'RGB' (grayscale, palette, RGBA, CMYK ... converted; alpha dropped)."""
    if image.mode == 'RGB':
        return image
    if image.mode == 'P' and 'transparency' in image.info:
        # Going through RGBA avoids PIL's warning about palette transparency; alpha is dropped
        # either way, as torchvision's and timm's loaders do.
        image = image.convert('RGBA')
    return image.convert('RGB')


def resize_size(spec: dict[str, Any]) -> int:
    """The side that `eval_transform` resizes to before center-cropping `spec['size']`."""
    if not 0 < spec['crop_pct'] <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {spec['crop_pct']}")
    return int(spec['size'] / spec['crop_pct'])  # timm's math.floor


def eval_transform(image: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """Resize + center crop as torchvision `Resize(int)` + `CenterCrop` ('shorter') or timm's
    crop_mode 'squash': uint8 [size, size, 3]."""
    image = to_rgb(image)
    size, scale = spec['size'], resize_size(spec)
    w, h = image.size
    if spec['resize'] == 'shorter':
        # torchvision truncates the long side: int(short_target * long / short).
        if w <= h:
            new_w, new_h = scale, int(scale * h / w)
        else:
            new_w, new_h = int(scale * w / h), scale
    elif spec['resize'] == 'squash':
        new_w = new_h = scale
    else:
        raise ValueError(f"unknown resize mode {spec['resize']!r}")
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), RESAMPLING[spec['interpolation']])
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def normalize(images, spec: dict[str, Any]):
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std, in the input's array namespace (numpy, or
    jax and traceable under jit)."""
    mean = np.asarray(spec['mean'], np.float32)
    std = np.asarray(spec['std'], np.float32)
    return (images.astype(np.float32) / 255.0 - mean) / std
