"""`python -m train.pack FOLDER OUT`: an image folder as ArrayRecord shards (train/records.py),
which `python -m train --data-dir OUT` reads like the folder, from local disk or `gs://`.

Every file's bytes are copied as they are, unread ones included, so training from OUT decodes,
substitutes and counts exactly what training from FOLDER does.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from effnetv2_jax import cli
from effnetv2_jax.files import OutputError, atomic_write, check_output
from effnetv2_jax.messages import first_line
from train import records
from train.input_pipeline import DataError, ImageFolder, find_splits

EXAMPLES = """\
  python -m train.pack /data/imagenet /data/imagenet-packed --shards 1024
  gsutil -m cp -r /data/imagenet-packed gs://bucket/imagenet-packed
  python -m train --preset imagenet-s --data-dir gs://bucket/imagenet-packed
"""


def _shard_records(folder: ImageFolder, indices: np.ndarray, progress: tqdm):
    for i in indices:
        path = folder.paths[i]
        try:
            image = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f'cannot read {path}: {e.strerror or first_line(e)}') from None
        progress.update()
        yield records.encode_record(image, folder.labels[i], os.path.relpath(path, folder.root))


def _write_split(out: Path, name: str, folder: ImageFolder, shards: int, progress: tqdm) -> dict:
    """Writes split `name` as min(`shards`, N) shards of consecutive records; its JSON entry."""
    chunks = np.array_split(np.arange(len(folder)), min(shards, len(folder)))
    entries = []
    for k, indices in enumerate(chunks):
        file = records.shard_name(name, k, len(chunks))
        records.write_shard(out / file, _shard_records(folder, indices, progress))
        entries.append({'file': file, 'records': len(indices)})
    counts = np.bincount(folder.labels, minlength=len(folder.class_names))
    return {'shards': entries, 'class_counts': counts.tolist()}


def pack(folder: str, out: str, shards: int) -> dict:
    """Writes `folder` (train/ and val/ folders, or one class tree) into the new folder `out`;
    returns its `records.DATASET_FILE` content. `DataError` or `OSError` (one line) before
    anything is written for a folder that is not an image folder or an `out` that may not be
    written; `out` is complete or absent."""
    check_output(out, records.OUTPUT_KIND, [folder])
    train, val = find_splits(folder)
    if not isinstance(train, ImageFolder):
        raise DataError(f'{folder} is packed already')
    splits = {'train': train, **({'val': val} if val is not None else {})}

    info = {'format': records.FORMAT, 'version': records.VERSION,
            'class_names': list(train.class_names), 'splits': {}}

    def write(tmp: Path):
        total = sum(len(split) for split in splits.values())
        with tqdm(total=total, unit='img', desc=f'packing {folder}') as progress:
            for name, split in splits.items():
                info['splits'][name] = _write_split(tmp, name, split, shards, progress)
        (tmp / records.DATASET_FILE).write_text(json.dumps(info, indent=1))

    try:
        atomic_write(out, write, records.OUTPUT_KIND)
    except OutputError as e:
        if isinstance(e.__cause__, DataError):  # an input's fault, not the output's
            raise e.__cause__ from None
        raise
    return info


@cli.entry_point
def main(argv=None) -> int:
    parser = cli.parser('train.pack', __doc__.split('\n\n')[0], EXAMPLES)
    parser.add_argument('folder', help='image folder: one subfolder per class, or train/ and '
                        'val/ of such (other folders beside train/ and val/ are left out)')
    parser.add_argument('out', help='the new folder of shards and dataset.json (replaces only '
                        'a folder this command wrote)')
    parser.add_argument('--shards', type=cli.positive_int, default=8,
                        help='shards per split, fewer for a split of fewer images (default 8; '
                        'at least one per process reading them helps on a pod)')
    args = parser.parse_args(argv)
    try:
        info = pack(args.folder, args.out, args.shards)
    except (DataError, OSError) as e:
        return cli.fail(first_line(e))
    splits = ', '.join(f'{name} {sum(s["class_counts"])} images in {len(s["shards"])} shards'
                       for name, s in info['splits'].items())
    print(f'{args.out}: {len(info["class_names"])} classes; {splits}')
    return cli.EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
