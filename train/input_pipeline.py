"""Image-folder input pipeline on grain: deterministic, resumable, and independent of the number
of processes and workers.

The training stream is one global sequence of positions: epoch e holds a permutation of the N
images fixed by (seed, e), and global batch s is positions [s G, (s + 1) G). Process p of P takes
the contiguous chunk [s G + p L, s G + (p + 1) L), L = G / P, because
`jax.make_array_from_process_local_data` concatenates process-local rows in process order. Every
random choice for an element comes from (seed, stage, position), so a global batch holds the same
images with the same augmentation for any P and any number of grain workers.

One grain element is one local batch: workers (`mp_prefetch`) get whole batches, so decoding runs
in the workers and batch contents do not depend on how batches are spread over them.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import os
import sys
from typing import Any, BinaryIO

import grain
import numpy as np
from absl import flags
from PIL import Image

from effnetv2_jax.messages import first_line
from effnetv2_jax.transforms import eval_transform, open_image, to_rgb
from train import records
from train.randaugment import rand_augment

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
MAX_SUBSTITUTIONS = 16  # consecutive unreadable images tolerated before giving up
# Batch-level threads per process (main or worker): PIL decodes and resizes without the GIL.
READ_THREADS = 2
_SHUFFLE, _AUGMENT = 0, 1  # seed-sequence tags keep the two random streams apart

_DTYPES = {'image': np.uint8, 'label': np.int32, 'mask': np.float32, 'skipped': np.int32}

log = logging.getLogger(__name__)


class DataError(Exception):
    """A problem with the user's data or data settings; the message is one line."""


class ImageSource:
    """What the pipeline reads: `len(source)` encoded images, their int32 `labels` [N] indexing
    `class_names`, and `root` to name the source in messages. Subclasses are frozen dataclasses,
    so grain can pickle them into its worker processes."""
    root: str
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def subset(self, indices) -> ImageSource:
        """The images at `indices`, same classes."""
        raise NotImplementedError

    def image_file(self, index: int) -> str | BinaryIO:
        """What `open_image` decodes for image `index`: a path, or a binary file whose `name` is
        the image's name for messages (`image_name`)."""
        raise NotImplementedError


def image_name(file: str | BinaryIO) -> str:
    """The name of an `ImageSource.image_file` for messages."""
    return getattr(file, 'name', file)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFolder(ImageSource):
    """Images and labels of a class-per-subfolder tree; labels index the sorted class names."""
    root: str
    paths: tuple[str, ...]
    labels: np.ndarray  # int32 [N]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> ImageFolder:
        indices = np.asarray(indices, np.int64)
        return dataclasses.replace(self, paths=tuple(self.paths[i] for i in indices),
                                   labels=self.labels[indices])

    def image_file(self, index: int) -> str:
        return self.paths[index]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedImages(ImageSource):
    """One split of a `python -m train.pack` folder (train/records.py): the image of position i
    is record `indices[i]` of `records`."""
    root: str  # the split, 'OUT/train', for messages
    records: Any  # random access to the encoded records: array_record's ArrayRecordDataSource
    labels: np.ndarray  # int32 [N]
    class_names: tuple[str, ...]
    indices: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices) -> PackedImages:
        indices = np.asarray(indices, np.int64)
        return dataclasses.replace(self, labels=self.labels[indices],
                                   indices=self.indices[indices])

    def image_file(self, index: int) -> io.BytesIO:
        number = int(self.indices[index])
        try:
            record = records.decode_record(self.records[number])
        except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: array_record's reader
            raise DataError(f'cannot read record {number} of {self.root}: {first_line(e)}'
                            ) from None
        file = io.BytesIO(record['image'])
        file.name = f'{self.root}/{record["name"]}'
        return file


def read_packed(root: str) -> dict[str, PackedImages]:
    """The splits of a `python -m train.pack` folder (a local path, or `gs://` ...), by name.
    Opens every shard once: a missing, truncated or foreign one is a `DataError` now rather
    than in the middle of a run."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    try:
        info = records.read_info(root)
    except (OSError, ValueError) as e:
        raise DataError(first_line(e)) from None
    splits = {}
    for name, split in info['splits'].items():
        labels = records.split_labels(split)
        try:
            source = ArrayRecordDataSource(records.shard_paths(root, split))
        except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: array_record's reader
            raise DataError(f'cannot read the {name} shards of {root}: {first_line(e)}') from None
        if len(source) != len(labels):
            raise DataError(f'the {name} shards of {root} hold {len(source)} records, its '
                            f'{records.DATASET_FILE} says {len(labels)}')
        splits[name] = PackedImages(f'{root.rstrip("/")}/{name}', source, labels,
                                    tuple(info['class_names']), np.arange(len(labels)))
    return splits


def scan_image_folder(root: str) -> ImageFolder:
    """Reads `root/<class>/<image>` (one level, hidden entries skipped, everything sorted). An
    image entry that cannot even be examined (a symlink loop) is listed like any other file, to
    be counted as unreadable where it is drawn; a class folder that cannot be is a `DataError`."""
    if not os.path.isdir(root):
        raise DataError(f'data folder {root} is a file, not a folder' if os.path.exists(root)
                        else f'data folder not found: {root}')
    class_names = tuple(sorted(e.name for e in _entries(root)
                               if not e.name.startswith('.') and _is_class_folder(e)))
    if not class_names:
        raise DataError(f'no class subfolders in {root} (expected {root}/<class>/<image>)')
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files = sorted(e.name for e in _entries(folder) if not e.name.startswith('.')
                       and e.name.lower().endswith(IMAGE_EXTENSIONS) and _may_be_image(e))
        paths += [os.path.join(folder, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise DataError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in the class folders of '
                        f'{root}')
    return ImageFolder(root, tuple(paths), np.asarray(labels, np.int32), class_names)


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as e:
        raise DataError(f'cannot read {folder}: {e.strerror or first_line(e)}') from None


def _is_class_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError as e:  # ELOOP: a symlink loop, which may have been meant as a class folder
        raise DataError(f'cannot read {entry.path}: {e.strerror or first_line(e)}') from None


def _may_be_image(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # ELOOP: unreadable, like a file that does not decode
        return True


def _given_splits(data_dir: str) -> tuple[ImageSource, ImageSource | None]:
    """(train, val or None) as `data_dir` holds them: a packed folder's splits, or its `train/`
    and `val/` folders when `train/` exists, else `data_dir` as one class tree."""
    if _is_packed(data_dir):
        splits = read_packed(data_dir)
        return splits['train'], splits.get('val')
    if '://' in data_dir:
        raise DataError(f'{data_dir} has no {records.DATASET_FILE}: only packed folders '
                        '(python -m train.pack) are read from a URI')
    train_dir, val_dir = os.path.join(data_dir, 'train'), os.path.join(data_dir, 'val')
    if not os.path.isdir(train_dir):
        return scan_image_folder(data_dir), None
    train = scan_image_folder(train_dir)
    if not os.path.isdir(val_dir):
        return train, None
    val = scan_image_folder(val_dir)
    if val.class_names != train.class_names:
        only_train = sorted(set(train.class_names) - set(val.class_names))
        only_val = sorted(set(val.class_names) - set(train.class_names))
        raise DataError(f'class folders of {val_dir} and {train_dir} differ: only in '
                        f'train {only_train[:5]}, only in val {only_val[:5]}')
    return train, val


def _is_packed(data_dir: str) -> bool:
    try:
        return records.is_packed(data_dir)
    except (ImportError, OSError) as e:  # ImportError: epath opens gs:// through gcsfs or TF
        raise DataError(f'cannot open {data_dir}: {first_line(e)}') from None


def eval_split(data_dir: str) -> ImageSource:
    """What `--eval-only` evaluates: the val split of `data_dir` (packed or a `val/` folder) if
    it has one, else all of it (a packed train split, or one class tree)."""
    if _is_packed(data_dir):
        splits = read_packed(data_dir)
        return splits.get('val', splits['train'])
    val_dir = os.path.join(data_dir, 'val')
    return scan_image_folder(val_dir if os.path.isdir(val_dir) else data_dir)


def find_splits(data_dir: str, val_split: float = 0.0,
                seed: int = 0) -> tuple[ImageSource, ImageSource | None]:
    """(train, val) of `data_dir`: a `python -m train.pack` folder's splits, or its `train/` and
    `val/` folders when `train/` exists, else `data_dir` as one class tree. Without a val split,
    `val_split` in (0, 1) holds out that fraction of every class (seeded; each class keeps at
    least one training image); val is None when `val_split` is 0 or holds out nothing. A packed
    folder gives the same splits as the folder it was packed from."""
    if not 0 <= val_split < 1:
        raise DataError(f'val_split must be in [0, 1), got {val_split}')
    train, val = _given_splits(data_dir)
    if val is not None:
        return train, val
    if val_split == 0:
        return train, None
    held_out = []
    for label in range(len(train.class_names)):
        members = np.flatnonzero(train.labels == label)
        count = min(int(round(len(members) * val_split)), len(members) - 1)
        if count > 0:
            rng = np.random.default_rng([seed, label])
            held_out.append(rng.choice(members, count, replace=False))
    if not held_out:
        return train, None
    val_indices = np.sort(np.concatenate(held_out))
    train_indices = np.setdiff1d(np.arange(len(train)), val_indices)
    return train.subset(train_indices), train.subset(val_indices)


def _decode(file) -> Image.Image:
    return to_rgb(open_image(file))  # the decompression-bomb limit, as at inference


def load_image(file: str | BinaryIO, warn: bool = True, crop=None) -> Image.Image | None:
    """The decoded 'RGB' image of `file` (an `ImageSource.image_file`), or None (logged if
    `warn`) when it cannot be read or decoded. `crop`, a function of the opened but not yet
    decoded image (as `random_resized_crop`), decodes it instead and gives its result, so that
    only what the crop needs is decoded."""
    try:
        if crop is None:
            return _decode(file)
        with open_image(file, decode=False) as image:
            return crop(image)
    except Exception as e:  # noqa: BLE001 -- any decoder failure means "unreadable"
        if warn:
            log.warning('unreadable image %s: %s', image_name(file), e)
        return None


def require_readable(source: ImageSource):
    """Raises `DataError` unless some image of `source` decodes; reads only up to the first that
    does, so a usable source costs one decode."""
    first_failure = None
    for index in range(len(source)):
        file = source.image_file(index)
        try:
            _decode(file)
            return
        except Exception as e:  # noqa: BLE001 -- as in load_image
            first_failure = first_failure or f'{image_name(file)}: {first_line(e)}'
    raise DataError(f'none of the {len(source)} images in {source.root} can be read '
                    f'({first_failure})')


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float],
                        rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop (10 tries, then a center crop of clamped aspect ratio),
    resized bicubic to an 'RGB' `size` x `size`.

    `image` may be a file opened but not yet decoded (`open_image(path, decode=False)`): a JPEG
    whose crop is at least twice `size` each way is then decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling, PIL's `draft`), the smallest that keeps the crop at least `size`, and
    resized from there, which costs a fraction of the full decode and resize.
    """
    left, top, w, h = _crop_box(image.size, scale, ratio, rng)
    width, height = image.size
    drafted = image.draft(None, (-(-width * size // w), -(-height * size // h)))
    reduction = width / drafted[1][2] if drafted else 1  # the DCT scale's denominator
    box = tuple(v / reduction for v in (left, top, left + w, top + h))
    return to_rgb(image).resize((size, size), Image.Resampling.BICUBIC, box=box)


def _crop_box(image_size: tuple[int, int], scale: tuple[float, float],
              ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (left, top, width, height) in an image of `image_size`."""
    width, height = image_size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:
        if width / height < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif width / height > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return left, top, w, h


def train_transform(path: str | BinaryIO, rng: np.random.Generator, *, image_size: int,
                    min_scale: float, flip: bool, randaug_layers: int, randaug_magnitude: float,
                    warn: bool = True) -> np.ndarray | None:
    """Random-resized crop (decoding only what it needs), optional horizontal flip, RandAugment
    of the image at `path` (an `ImageSource.image_file`): uint8 [size, size, 3], or None (logged
    if `warn`) when the file cannot be read or decoded. A function of the file and of `rng`'s
    state."""
    image = load_image(path, warn, functools.partial(
        random_resized_crop, size=image_size, scale=(min_scale, 1.0), rng=rng))
    if image is None:
        return None
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(rand_augment(image, randaug_layers, randaug_magnitude, rng))


@functools.lru_cache(maxsize=2)  # per process; consecutive batches share an epoch
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _SHUFFLE, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Global batch s, process p -> the stream positions of p's local batch."""
    global_batch_size: int
    process_index: int
    process_count: int

    def __post_init__(self):
        g, p, count = self.global_batch_size, self.process_index, self.process_count
        if g <= 0 or count <= 0 or g % count:
            raise DataError(f'global batch size {g} must be a positive multiple of the process '
                            f'count {count}')
        if not 0 <= p < count:
            raise DataError(f'process index {p} is not in [0, {count})')

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def positions(self, step: int) -> range:
        first = step * self.global_batch_size + self.process_index * self.local_batch_size
        return range(first, first + self.local_batch_size)


class _LocalBatch:
    """Step -> this process's local batch, one `_element(position)` per row; subclasses are
    dataclasses, so grain can pickle them into its worker processes."""

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        elements = [self._element(q) for q in self.layout.positions(step)]
        return {k: np.asarray([e[k] for e in elements], _DTYPES[k]) for k in elements[0]}


@dataclasses.dataclass(frozen=True)
class _TrainBatch(_LocalBatch):
    """Augmented training rows of the global stream."""
    folder: ImageSource
    layout: _Layout
    seed: int
    stage: int
    transform: functools.partial  # train_transform with its keyword settings

    def _element(self, position: int) -> dict:
        n = len(self.folder)
        # An unreadable image is replaced by the next readable one in the stream, so shapes stay
        # fixed. Only the element's own position is counted (and logged): the images it looked at
        # beyond are counted by their own positions, so each draw of a bad file counts once.
        for offset in range(MAX_SUBSTITUTIONS):
            epoch, k = divmod(position + offset, n)
            index = _epoch_permutation(self.seed, epoch, n)[k]
            rng = np.random.default_rng([self.seed, _AUGMENT, self.stage, position])
            file = self.folder.image_file(index)
            image = self.transform(file, rng, warn=offset == 0)
            if image is not None:
                break
        else:
            raise DataError(f'{MAX_SUBSTITUTIONS} unreadable images in a row in the training '
                            f'stream, the last {image_name(file)}')
        return {'image': image, 'label': self.folder.labels[index], 'skipped': int(offset > 0)}


@dataclasses.dataclass(frozen=True)
class _EvalBatch(_LocalBatch):
    """Eval rows in folder order; positions past the data are masked padding."""
    folder: ImageSource
    layout: _Layout
    spec: dict

    def _element(self, position: int) -> dict:
        blank = {'image': np.zeros((self.spec['size'],) * 2 + (3,), np.uint8), 'label': 0,
                 'mask': 0.0, 'skipped': 0}
        if position >= len(self.folder):
            return blank
        label = self.folder.labels[position]
        image = load_image(self.folder.image_file(position))
        if image is None:
            return {**blank, 'label': label, 'skipped': 1}
        return {'image': eval_transform(image, self.spec), 'label': label, 'mask': 1.0,
                'skipped': 0}


def _batches(make_batch, steps: range, num_workers: int) -> grain.IterDataset:
    ds = grain.MapDataset.range(steps.start, steps.stop).map(make_batch)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                              prefetch_buffer_size=READ_THREADS))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads an absl flag when it starts workers (google/grain#1355), which
            # fails in programs that, like ours, parse their arguments without absl.app.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def train_dataset(folder: ImageSource, *, global_batch_size: int, image_size: int,
                  randaug_layers: int, randaug_magnitude: float, seed: int, stage: int = 0,
                  process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                  min_scale: float = 0.08, flip: bool = True,
                  start_step: int = 0) -> grain.IterDataset:
    """Infinite stream of this process's local training batches, from global step `start_step`:
    'image' uint8 [L, image_size, image_size, 3], 'label' int32 [L], 'skipped' int32 [L] (1
    where the image drawn was unreadable and the next readable one in the stream took its place),
    L = global_batch_size / process_count. Summed over a run, 'skipped' counts each unreadable
    file once per epoch that draws it.

    A function of its arguments only: `iter(ds)` with `set_state` of a saved iterator resumes
    exactly, and so does a new dataset with `start_step` = the next global step."""
    layout = _Layout(global_batch_size, process_index, process_count)
    transform = functools.partial(
        train_transform, image_size=image_size, min_scale=min_scale, flip=flip,
        randaug_layers=randaug_layers, randaug_magnitude=randaug_magnitude)
    make_batch = _TrainBatch(folder, layout, seed, stage, transform)
    return _batches(make_batch, range(start_step, sys.maxsize), num_workers)


def num_eval_batches(folder: ImageSource, global_batch_size: int) -> int:
    """Global eval batches covering every image once: ceil(N / global_batch_size)."""
    return -(-len(folder) // global_batch_size)


def eval_dataset(folder: ImageSource, *, global_batch_size: int, spec: dict,
                 process_index: int = 0, process_count: int = 1,
                 num_workers: int = 0) -> grain.IterDataset:
    """Every image exactly once, in folder order, as `num_eval_batches` local batches: 'image'
    uint8 [L, size, size, 3] (`eval_transform` with `spec`), 'label' int32 [L], 'mask' float32
    [L] (0 for padding and unreadable images), 'skipped' int32 [L] (1 where unreadable).
    Re-iterable: each `iter()` starts from the first batch."""
    layout = _Layout(global_batch_size, process_index, process_count)
    steps = range(num_eval_batches(folder, global_batch_size))
    return _batches(_EvalBatch(folder, layout, dict(spec)), steps, num_workers)
