"""scikit-learn's handwritten digits as a small image folder: a real dataset that needs no
download, for smoke runs and tests of the training pipeline."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from effnetv2_jax.files import OutputKind, atomic_write

SPLITS = (('val', 0.15), ('test', 0.15))  # the rest is train
SIZE = 32
MARKER = '.complete'  # written last, inside the folder that is renamed into place


def materialize_digits(root: str) -> str:
    """Writes `load_digits()` (1797 8x8 images, values 0..16) as `root/{train,val,test}/<digit>/
    <index>.png` and returns `root`.

    Images are 32x32 grayscale PNGs ('L'), upscaled bicubic from 0..255, white digit on black as
    in MNIST (the data's ink is the high value). The split is stratified and fixed (seed 0): per
    class, round(15%) val, round(15%) test, the rest train; 1259 train / 269 val / 269 test.
    Idempotent, and atomic: the folder is built beside `root` and renamed into place, so a killed
    run leaves no partial `root` (concurrent callers are fine too).
    """
    if os.path.isfile(os.path.join(root, MARKER)):
        return root
    if os.path.exists(root):
        raise FileExistsError(f'{root} exists but is not a complete digits folder; remove it')
    from sklearn.datasets import load_digits  # only needed once per folder

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)

    def write(tmp):
        counts = _write_splits(str(tmp), images, digits.target)
        (tmp / MARKER).write_text(json.dumps(counts))
    try:
        atomic_write(root, write, OutputKind('a digits folder', lambda _: False, directory=True))
    except OSError:
        if not os.path.isfile(os.path.join(root, MARKER)):  # not a concurrent caller's
            raise
    return root


def _write_splits(directory: str, images: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    rng = np.random.default_rng(0)
    split_of = np.full(len(labels), 'train', dtype=object)
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for split, fraction in SPLITS:
            count = int(round(len(members) * fraction))
            split_of[members[start:start + count]] = split
            start += count
    for index, (image, digit, split) in enumerate(zip(images, labels, split_of)):
        folder = os.path.join(directory, split, str(digit))
        os.makedirs(folder, exist_ok=True)
        big = Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        big.save(os.path.join(folder, f'{index:04d}.png'))
    return {split: int(np.sum(split_of == split)) for split in ('train', 'val', 'test')}
