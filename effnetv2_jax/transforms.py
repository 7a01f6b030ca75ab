"""Eval-time image preprocessing that reproduces the transform each weights source expects.

`spec` is the `metadata['preprocessing']` dict of a converted checkpoint: `size`, `resize`
('shorter' | 'squash'), `crop_pct`, `interpolation` ('bilinear' | 'bicubic' | 'nearest'),
`mean`, `std`. Only numpy and PIL are needed, so data-loading processes stay light.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image

# The two normalisations of the weights in circulation: ImageNet statistics (torchvision S/M,
# timm's B0-B2 and efficientnetv2_*), and mean = std = 0.5 (WZMIAOMIAO's scripts, weights trained in
# TensorFlow). Lists, so that they serialise as metadata.
IMAGENET_NORMALISATION = {'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}
HALF_NORMALISATION = {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}

# What `preprocess` accepts as one image: a PIL image, a uint8 array [H, W, 3] or [H, W], a path,
# or a binary file object holding an encoded image (io.BytesIO of a file's bytes).
ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, BinaryIO]

SPEC_KEYS = ('size', 'resize', 'crop_pct', 'interpolation', 'mean', 'std')

# The largest image side, in pixels, that anything here takes: the crop size of a spec (and so
# `predict --size`), `export --image-size`, `convert --verify-size`. 8x the largest eval size of
# any variant (XL: 512); beyond, one image's activations alone take gigabytes, and a mistyped
# size would end in a MemoryError (or the kernel's OOM killer) instead of one line.
MAX_IMAGE_SIZE = 4096

RESAMPLING = {
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'nearest': Image.Resampling.NEAREST,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit 'RGB': grayscale, palette, CMYK ... converted by PIL, alpha dropped.

    High-bit-depth grayscale is scaled to 8 bits, not clipped: 'I;16*' and 'I' (how PIL decodes
    16-bit PNG, TIFF and PGM; 'I' clipped to [0, 65535]) keep their high byte, value >> 8, as PIL
    decodes 16-bit colour and torchvision's `to_dtype(..., scale=True)` converts uint16; 'F'
    (float TIFF) is read as [0, 1]: round(255 * value), clipped, NaN as 0. So the 16-bit or float
    copy of an 8-bit picture (v * 257, v / 255) gives back the 8-bit one exactly.
    """
    if image.mode == 'RGB':
        return image
    if image.mode == 'F':
        values = np.nan_to_num(np.asarray(image), nan=0.0)
        image = Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8))
    elif image.mode.startswith('I'):
        image = Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8))
    elif image.mode == 'P' and 'transparency' in image.info:
        # Going through RGBA avoids PIL's warning about palette transparency; alpha is dropped
        # either way, as torchvision's and timm's loaders do.
        image = image.convert('RGBA')
    return image.convert('RGB')


def resize_size(spec: dict[str, Any]) -> int:
    """The side that `eval_transform` resizes to before center-cropping `spec['size']`."""
    if not 0 < spec['crop_pct'] <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {spec['crop_pct']}")
    scale = spec['size'] / spec['crop_pct']
    if not math.isfinite(scale):
        raise ValueError(f"crop_pct {spec['crop_pct']} is too small: size / crop_pct overflows")
    return int(scale)  # timm's math.floor


def check_image_size(size, what: str = 'size') -> int:
    """`size` as an int if it is an integer (not a bool) from 1 to `MAX_IMAGE_SIZE`, else
    ValueError with a one-line reason naming it `what`."""
    if (isinstance(size, bool) or not isinstance(size, (int, np.integer))
            or not 1 <= size <= MAX_IMAGE_SIZE):
        raise ValueError(f'{what} must be an integer from 1 to {MAX_IMAGE_SIZE} (pixels), '
                         f'got {size!r}')
    return int(size)


def image_size(text: str) -> int:
    """An image side in pixels, from 1 to `MAX_IMAGE_SIZE` (argparse type)."""
    try:
        return check_image_size(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an image size from 1 to {MAX_IMAGE_SIZE} '
                                         f'pixels, got {text!r}') from None


# Beyond this many crops' worth of pixels, `eval_transform` resamples only the crop's region of
# the source (a 1 x 20000 PNG would otherwise be resized to 256 x 5120000, 5 GB, for a 224 crop).
WHOLE_RESIZE_MAX_CROPS = 16


def eval_transform(image: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """Resize + center crop as torchvision `Resize(int)` + `CenterCrop` ('shorter') or timm's
    crop_mode 'squash': uint8 [size, size, 3].

    Bit for bit torchvision's PIL path while the resized image holds at most
    `WHOLE_RESIZE_MAX_CROPS` crops ('shorter': aspect ratios up to 16 crop_pct^2, 12:1 at 0.875).
    Beyond, memory stays O(size^2): only the crop's region of the source is resampled, from
    Pillow's float32 `box`: bilinear and bicubic pixels within 2 levels (a weight moved by 1e-7
    may round a level apart in each pass), nearest may take the neighbouring source pixel.
    """
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
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    crop = (left, top, left + size, top + size)
    resample = RESAMPLING[spec['interpolation']]
    if (new_w, new_h) == (w, h):
        return np.asarray(image.crop(crop))
    if new_w * new_h <= WHOLE_RESIZE_MAX_CROPS * size * size:
        return np.asarray(image.resize((new_w, new_h), resample).crop(crop))
    box = (left * w / new_w, top * h / new_h, (left + size) * w / new_w, (top + size) * h / new_h)
    return np.asarray(_resize_region(image, box, size, resample))


def _resize_region(image: Image.Image, box: tuple[float, float, float, float], size: int,
                   resample: Image.Resampling) -> Image.Image:
    """The `box` (left, upper, right, lower: floats, source pixels) of `image` resampled to
    size x size, as `image.resize(..., box=box)`, touching only the pixels its filter reaches.

    Pillow takes the box in float32 (integers exact only below 2**24): the box is taken relative
    to a crop of the rows and columns in reach, so a 1 x 20 000 000 image keeps its precision.
    """
    scale = max(1.0, (box[2] - box[0]) / size, (box[3] - box[1]) / size)  # source px per output px
    reach = math.ceil(2 * scale) + 1  # bicubic's support, the widest of RESAMPLING, plus a pixel
    x0, y0 = max(0, math.floor(box[0]) - reach), max(0, math.floor(box[1]) - reach)
    x1 = min(image.width, math.ceil(box[2]) + reach)
    y1 = min(image.height, math.ceil(box[3]) + reach)
    shifted = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    return image.crop((x0, y0, x1, y1)).resize((size, size), resample, box=shifted)


def normalize(images, spec: dict[str, Any]):
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std, in the input's array namespace (numpy, or
    jax and traceable under jit)."""
    mean = np.asarray(spec['mean'], np.float32)
    std = np.asarray(spec['std'], np.float32)
    return (images.astype(np.float32) / 255.0 - mean) / std


def open_image(image: ImageLike, decode: bool = True) -> Image.Image:
    """A PIL image from an `ImageLike`; ValueError with a one-line reason if it is unusable.

    A file of more than `PIL.Image.MAX_IMAGE_PIXELS` pixels (PIL's decompression-bomb limit,
    89 478 485 by default; None lifts it) is refused before it is decoded. With `decode` False a
    file is only opened (its header read: size, mode), for the caller to decode, e.g. at reduced
    scale with `draft`, and close.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike, io.IOBase)):
        name = (os.fspath(image) if isinstance(image, (str, os.PathLike))
                else getattr(image, 'name', 'from a file object'))
        try:
            with warnings.catch_warnings():
                # PIL only warns between 1 and 2 times the limit and refuses beyond: refuse both.
                warnings.simplefilter('error', Image.DecompressionBombWarning)
                opened = Image.open(image)
            if not decode:
                return opened
            with opened:
                opened.load()  # decode now, so that a truncated file fails here
                return opened
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f'cannot read image {name}: more than '
                             f'{Image.MAX_IMAGE_PIXELS} pixels, PIL\'s decompression-bomb limit '
                             '(PIL.Image.MAX_IMAGE_PIXELS)') from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f'cannot read image {name}: {e}') from None
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError('an image array must be uint8 [H, W], [H, W, 1|3|4]; got '
                         f'{array.dtype} {list(array.shape)}')
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """One image or a sequence of them as a list; a uint8 array [N, H, W, C] is N images."""
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Sequence) and not isinstance(images, str):
        return list(images)
    return [images]


def eval_crops(images: ImageLike | Sequence[ImageLike], spec: dict[str, Any]) -> np.ndarray:
    """`eval_transform` of one image or a sequence of them: uint8 [N, size, size, 3]."""
    return np.stack([eval_transform(open_image(i), spec) for i in as_image_list(images)])


def preprocess(images: ImageLike | Sequence[ImageLike], spec: dict[str, Any]) -> np.ndarray:
    """The whole eval transform of `spec` (resize, center crop, normalise) on one image or a
    sequence of them: float32 [N, size, size, 3], NHWC as the model takes it."""
    return normalize(eval_crops(images, spec), spec)


def _is_real(value) -> bool:
    """Whether `value` is a real number (a bool is not one here)."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool))


def _finite_numbers(values) -> bool:
    """Whether `values` is 3 finite real numbers."""
    return (isinstance(values, (list, tuple, np.ndarray)) and len(values) == 3
            and all(_is_real(v) and math.isfinite(v) for v in values))


def check_spec(spec: dict[str, Any], complete: bool = True) -> None:
    """ValueError with a one-line reason unless `spec` is a valid transform spec: every key of
    SPEC_KEYS with a valid value (`complete`), or valid values for the keys it has. Valid: `size`
    an integer from 1 to MAX_IMAGE_SIZE; `mean` 3 finite numbers and `std` 3 finite numbers > 0
    (anything else could only give NaN or Inf)."""
    missing = [k for k in SPEC_KEYS if k not in spec]
    if complete and missing:
        raise ValueError(f'the preprocessing spec lacks {missing} (the weights file carries no '
                         'eval transform: give it explicitly)')
    if 'size' in spec:
        check_image_size(spec['size'])
    if 'resize' in spec and spec['resize'] not in ('shorter', 'squash'):
        raise ValueError(f"resize must be 'shorter' or 'squash', got {spec['resize']!r}")
    if 'interpolation' in spec and not (isinstance(spec['interpolation'], str)
                                        and spec['interpolation'] in RESAMPLING):
        raise ValueError(f'interpolation must be one of {sorted(RESAMPLING)}, '
                         f"got {spec['interpolation']!r}")
    if 'crop_pct' in spec:
        crop_pct = spec['crop_pct']
        if not _is_real(crop_pct):
            raise ValueError(f'crop_pct must be a number in (0, 1], got {crop_pct!r}')
        # Without a size, the largest it may be combined with.
        resize_size({'size': spec.get('size', MAX_IMAGE_SIZE), 'crop_pct': crop_pct})
    if 'mean' in spec and not _finite_numbers(spec['mean']):
        raise ValueError(f"mean must be 3 finite numbers (R, G, B), got {spec['mean']!r}")
    if 'std' in spec and not (_finite_numbers(spec['std']) and all(v > 0 for v in spec['std'])):
        raise ValueError(f"std must be 3 finite numbers > 0 (R, G, B), got {spec['std']!r}")
