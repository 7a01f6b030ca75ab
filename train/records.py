"""The packed image format of `python -m train.pack`: ArrayRecord shards plus one JSON file.

    OUT/dataset.json                         format, version, class names, per split: its shards
                                             with their record counts, and images per class
    OUT/train-00000-of-00004.array_record    records of the train split, in folder order
    OUT/val-00000-of-00001.array_record      (only when the folder had a val/ folder)

A record is a msgpack map {'image': the file's bytes as they are, 'label': int, 'name':
'<class>/<file>'}. Records keep the folder's order (classes sorted, then file names sorted), so
record i of a split is image i of the folder and the labels follow from the per-class counts.
Shards are written with `group_size:1`, for random access. The JSON is read through etils'
`epath` (local paths; `gs://` with gcsfs installed), the shards by array_record's own reader,
which opens local paths and, in array_record 0.8+, `gs://` itself.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

import msgpack
import numpy as np
from etils import epath

from effnetv2_jax.files import OutputKind

DATASET_FILE = 'dataset.json'
FORMAT, VERSION = 'effnetv2-jax packed images', 1
SPLITS = ('train', 'val')
WRITER_OPTIONS = 'group_size:1'  # one record per chunk: random access reads only that record


def shard_name(split: str, index: int, count: int) -> str:
    return f'{split}-{index:05d}-of-{count:05d}.array_record'


def encode_record(image: bytes, label: int, name: str) -> bytes:
    return msgpack.packb({'image': image, 'label': int(label), 'name': name})


def decode_record(record: bytes) -> dict:
    """{'image': bytes, 'label': int, 'name': str} of one record."""
    return msgpack.unpackb(record)


def write_shard(path: str, records: Iterable[bytes]):
    """An ArrayRecord file of `records`, in order."""
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()


def is_packed(root: str) -> bool:
    """Whether `root` (a local path or a URI epath opens) holds a `DATASET_FILE`."""
    return (epath.Path(root) / DATASET_FILE).exists()


def read_info(root: str) -> dict:
    """The checked `DATASET_FILE` of `root`; ValueError with a one-line reason if it is not one
    this version reads."""
    path = epath.Path(root) / DATASET_FILE
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f'{path} is not JSON: {e}') from None
    if not isinstance(info, dict) or info.get('format') != FORMAT:
        raise ValueError(f'{path} is not a {FORMAT} description (python -m train.pack)')
    if info.get('version') != VERSION:
        raise ValueError(f'{path} has format version {info.get("version")}; this version of '
                         f'effnetv2-jax reads version {VERSION} (pack the folder again)')
    try:
        classes = len(info['class_names'])
        for name, split in info['splits'].items():
            total = sum(shard['records'] for shard in split['shards'])
            if len(split['class_counts']) != classes or sum(split['class_counts']) != total:
                raise ValueError(f'{path}: the class counts of split {name} do not match its '
                                 f'{classes} classes and {total} records')
        if 'train' not in info['splits']:
            raise ValueError(f'{path} has no train split')
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'{path} lacks or misspells {e}') from None
    return info


def split_labels(split: dict) -> np.ndarray:
    """int32 [N]: the labels of a split's records, from its per-class counts (records are in
    class order)."""
    counts = split['class_counts']
    return np.repeat(np.arange(len(counts), dtype=np.int32), counts)


def shard_paths(root: str, split: dict) -> list[str]:
    """The paths of a split's shards, in record order."""
    return [str(epath.Path(root) / shard['file']) for shard in split['shards']]


def _recognise(path) -> bool:
    """Whether folder `path` may be replaced: it is empty, or holds nothing but a valid
    `DATASET_FILE` and (some of) the shard files it lists, so that no file of anyone else's goes
    with it."""
    try:
        entries = list(path.iterdir())
        if not entries:
            return True
        info = read_info(str(path))
        ours = {DATASET_FILE} | {shard['file'] for split in info['splits'].values()
                                 for shard in split['shards']}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(e.name in ours and e.is_file() and not e.is_symlink() for e in entries)


OUTPUT_KIND = OutputKind(f'a folder of {FORMAT} (python -m train.pack)', _recognise,
                         directory=True)
