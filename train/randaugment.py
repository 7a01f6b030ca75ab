"""RandAugment on PIL images, following the official TensorFlow EfficientNetV2 code
(google/automl `efficientnetv2/autoaugment.py`, `distort_image_with_randaugment`).

Hand-written because torchvision's and timm's versions need torch, and the training input
pipeline must not. Behaviour of the TF code kept here:

- each of `num_layers` layers picks one of the 16 ops uniformly and always applies it (the TF code
  draws a `prob` in [0.2, 0.8] per op but never uses it: no RandAugment op takes `prob`);
- levels scale with `magnitude / 10` (`_MAX_LEVEL`); magnitudes above 10 are simply stronger;
- rotate, shear and translate get a random sign; the enhance ops (Color, Contrast, Brightness,
  Sharpness) do not: factor = magnitude / 10 * 1.8 + 0.1;
- geometric ops use nearest-neighbour sampling and fill with gray 128, as TF's `unwrap`.

Deliberate differences: translate and cutout are scaled to the image size (TF's 100 px and 40 px
are for 224 px, so at 224 px they agree; at 32 px a 100 px shift would erase the image);
Contrast uses PIL's mean-gray degenerate image (TF's port computes a different, buggy mean);
magnitude 0 returns the image unchanged (TF would still apply the level-free ops).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (128, 128, 128)
REFERENCE_SIZE = 224  # the image size TF's pixel constants were chosen for
TRANSLATE_CONST = 100  # pixels at REFERENCE_SIZE
CUTOUT_CONST = 40  # half side of the cutout square, pixels at REFERENCE_SIZE


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    """Output pixel (x, y) samples input (a x + b y + c, d x + e y + f), as TF's transform."""
    return image.transform(image.size, Image.Transform.AFFINE, coeffs,
                           resample=Image.Resampling.NEAREST, fillcolor=FILL)


def _enhance(enhancer):
    def op(image, level, rng):
        return enhancer(image).enhance(level / MAX_LEVEL * 1.8 + 0.1)
    return op


def _rotate(image, level, rng):
    degrees = _signed(level / MAX_LEVEL * 30.0, rng)
    return image.rotate(degrees, resample=Image.Resampling.NEAREST, fillcolor=FILL)


def _posterize(image, level, rng):
    # TF: bits = int(level / 10 * 4); more than 8 bits would be a negative shift there, and 0
    # bits (level < 2.5) a black image in TF but an error in PIL: keep at least 1 bit.
    return ImageOps.posterize(image, min(max(int(level / MAX_LEVEL * 4), 1), 8))


def _solarize(image, level, rng):
    return ImageOps.solarize(image, int(level / MAX_LEVEL * 256))


def _solarize_add(image, level, rng):
    addition = int(level / MAX_LEVEL * 110)
    lut = [min(i + addition, 255) if i < 128 else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _shear(axis):
    def op(image, level, rng):
        shear = _signed(level / MAX_LEVEL * 0.3, rng)
        return _affine(image, (1, shear, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, shear, 1, 0))
    return op


def _translate(axis):
    def op(image, level, rng):
        pixels = _signed(level / MAX_LEVEL * TRANSLATE_CONST / REFERENCE_SIZE
                         * image.size[axis], rng)
        return _affine(image, (1, 0, pixels, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, pixels))
    return op


def _cutout(image, level, rng):
    w, h = image.size
    pad = int(level / MAX_LEVEL * CUTOUT_CONST / REFERENCE_SIZE * min(w, h))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    image = image.copy()
    image.paste(FILL, (max(cx - pad, 0), max(cy - pad, 0), min(cx + pad, w), min(cy + pad, h)))
    return image


# Order as TF's `available_ops`; each op is (image, level, rng) -> image.
OPS = {
    'AutoContrast': lambda image, level, rng: ImageOps.autocontrast(image),
    'Equalize': lambda image, level, rng: ImageOps.equalize(image),
    'Invert': lambda image, level, rng: ImageOps.invert(image),
    'Rotate': _rotate,
    'Posterize': _posterize,
    'Solarize': _solarize,
    'Color': _enhance(ImageEnhance.Color),
    'Contrast': _enhance(ImageEnhance.Contrast),
    'Brightness': _enhance(ImageEnhance.Brightness),
    'Sharpness': _enhance(ImageEnhance.Sharpness),
    'ShearX': _shear(0),
    'ShearY': _shear(1),
    'TranslateX': _translate(0),
    'TranslateY': _translate(1),
    'Cutout': _cutout,
    'SolarizeAdd': _solarize_add,
}
_OP_LIST = tuple(OPS.values())


def rand_augment(image: Image.Image, num_layers: int, magnitude: float,
                 rng: np.random.Generator) -> Image.Image:
    """Applies `num_layers` uniformly chosen ops at `magnitude` to an 'RGB' image; same size and
    mode out. `num_layers` 0 or `magnitude` 0 returns `image` itself."""
    if num_layers <= 0 or magnitude <= 0:
        return image
    for _ in range(num_layers):
        image = _OP_LIST[rng.integers(len(_OP_LIST))](image, float(magnitude), rng)
    return image
