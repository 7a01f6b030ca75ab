"""Images per second per CPU core of the training transform (decode, random-resized crop, flip,
RandAugment), ours against timm's, side by side in one run, with the decode-only ceiling.

    python -m benchmarks.input_pipeline
    python -m benchmarks.input_pipeline --cases 128:10 300:10 --images ~/imagenet/train/n01440764

Ours is `train.input_pipeline.train_transform`, what a grain worker runs per image. timm's is
`timm.data.create_transform(size, is_training=True, auto_augment='rand-m<M>-n2',
interpolation='bicubic', use_prefetcher=True)` (scale (0.08, 1), ratio (3/4, 4/3), flip 0.5;
uint8 output, normalisation left to the device as ours) after timm's loader's decode,
`Image.open(path).convert('RGB')`. timm applies each RandAugment op with probability 0.5 and
clips magnitudes to 10; ours applies both ops always (as the TF code) at the full magnitude. The
ceiling is PIL's full-size decode, `Image.open(path).convert('RGB')` and nothing else.

One core: the process is pinned to one CPU (`os.sched_setaffinity`), torch to one thread, and PIL
and numpy run these ops in the calling thread; img/s counts the process's CPU time
(`time.process_time`), so other people's load on the machine slows the figures only through the
caches. The cases and the two transforms take turns in `--rounds` rounds, so that the noise hits all
alike; reported: the median over rounds, and ours / timm's.

Images: `--images DIR` (every JPEG under it), or by default ImageNet-sized JPEGs made from
scikit-image's sample photos (500 x 375, quality 90, 4:2:0 chroma: ImageNet's median size and PIL's
default subsampling).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.throughput import host

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry',
          'retina', 'stereo_motorcycle')
PHOTO_SIZE = (500, 375)
# (size, RandAugment magnitude): the four sizes at magnitude 10, and the presets' stages
# (progressive learning from 128 px at magnitude 5 to S 300/10, M 384/15, L 384/20).
CASES = ('128:10', '192:10', '300:10', '384:10', '128:5', '384:15', '384:20')
MIN_SCALE = 0.08  # the imagenet presets' and timm's default


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m benchmarks.input_pipeline',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('--cases', nargs='+', default=list(CASES), metavar='SIZE:MAGNITUDE',
                   help='output size in pixels and RandAugment magnitude (2 layers)')
    p.add_argument('--images', type=Path, help='folder of JPEGs (default: sample photos)')
    p.add_argument('--rounds', type=int, default=9, help='rounds (the median is reported)')
    p.add_argument('--passes', type=int, default=8, help='passes over the images per round')
    p.add_argument('--cpu', type=int, help='CPU to pin to (default: the last one allowed)')
    p.add_argument('--output', type=Path, default=Path('benchmarks/results/input-pipeline'),
                   help='basename of the .json and .md results')
    args = p.parse_args(argv)
    try:
        args.cases = [tuple(float(v) for v in case.split(':')) for case in args.cases]
        args.cases = [(int(size), magnitude) for size, magnitude in args.cases]
    except ValueError:
        p.error('--cases takes SIZE:MAGNITUDE pairs, e.g. 300:10')
    return args


def sample_jpegs(folder: Path) -> list[Path]:
    """scikit-image's colour sample photos, scaled to cover `PHOTO_SIZE` and center-cropped,
    as quality-90 JPEGs in `folder`."""
    from skimage import data
    paths = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()[..., :3] if name != 'stereo_motorcycle'
                                else data.stereo_motorcycle()[0])
        scale = max(PHOTO_SIZE[0] / image.width, PHOTO_SIZE[1] / image.height)
        resized = image.resize((round(image.width * scale), round(image.height * scale)),
                               Image.Resampling.LANCZOS)
        left, top = (resized.width - PHOTO_SIZE[0]) // 2, (resized.height - PHOTO_SIZE[1]) // 2
        paths.append(folder / f'{name}.jpg')
        resized.crop((left, top, left + PHOTO_SIZE[0], top + PHOTO_SIZE[1])).save(
            paths[-1], quality=90)
    return paths


def transforms(size: int, magnitude: float) -> dict:
    """name -> f(path, seed) for our transform and timm's at `size` and `magnitude`."""
    import timm.data
    import torch

    from train.input_pipeline import train_transform
    timm_transform = timm.data.create_transform(
        size, is_training=True, scale=(MIN_SCALE, 1.0), hflip=0.5,
        auto_augment=f'rand-m{magnitude:g}-n2', interpolation='bicubic', use_prefetcher=True)

    def ours(path, seed):
        return train_transform(str(path), np.random.default_rng(seed), image_size=size,
                               min_scale=MIN_SCALE, flip=True, randaug_layers=2,
                               randaug_magnitude=magnitude)

    def timm_(path, seed):
        random.seed(seed)  # timm's transforms draw from `random` and torch
        torch.manual_seed(seed)
        with Image.open(path) as image:
            return timm_transform(image.convert('RGB'))

    return {'ours': ours, 'timm': timm_}


def decode(path, seed):
    with Image.open(path) as image:
        return image.convert('RGB')


def cpu_seconds(fn, paths: list[Path], passes: int, first_seed: int) -> float:
    start = time.process_time()
    for p in range(passes):
        for i, path in enumerate(paths):
            fn(path, first_seed + p * len(paths) + i)
    return time.process_time() - start


def pin_to_one_core(cpu: int | None) -> int:
    import torch
    torch.set_num_threads(1)
    cpu = max(os.sched_getaffinity(0)) if cpu is None else cpu
    os.sched_setaffinity(0, {cpu})
    return cpu


def measure(args, paths: list[Path]) -> list[dict]:
    """One result per (case, transform) and one for the decode, img/s per round."""
    runs = {('decode', 0, 0.0): decode}
    for size, magnitude in args.cases:
        for name, fn in transforms(size, magnitude).items():
            runs[name, size, magnitude] = fn
    rounds = {key: [] for key in runs}
    for fn in runs.values():  # warm-up: imports, PIL's lazy initialisation, the page cache
        cpu_seconds(fn, paths, 1, 0)
    keys = list(runs)
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            seconds = cpu_seconds(runs[key], paths, args.passes, r * args.passes * len(paths))
            rounds[key].append(args.passes * len(paths) / seconds)
        print(f'  round {r + 1}/{args.rounds}', file=sys.stderr, flush=True)
    return [{'transform': name, 'size': size, 'magnitude': magnitude,
             'img_per_s': statistics.median(values), 'img_per_s_rounds': values}
            for (name, size, magnitude), values in rounds.items()]


def markdown(report: dict) -> str:
    c, m = report['config'], report['machine']
    by_key = {(r['transform'], r['size'], r['magnitude']): r['img_per_s']
              for r in report['results']}
    [ceiling] = [r['img_per_s'] for r in report['results'] if r['transform'] == 'decode']
    lines = [f"Train transform img/s on one core of {m['cpu']} ({report['images']}); "
             f"Pillow {report['versions']['pillow']} (libjpeg-turbo "
             f"{report['versions']['libjpeg-turbo']}), timm {report['versions']['timm']}; "
             f"median of {c['rounds']} rounds of {c['passes']} passes.", '',
             f"`{report['command']}`", '',
             '| size | RandAugment | ours | timm | ours / timm |', '|---:|---:|---:|---:|---:|']
    for size, magnitude in c['cases']:
        ours, timm_ = by_key['ours', size, magnitude], by_key['timm', size, magnitude]
        lines.append(f'| {size} | 2 x {magnitude:g} | {ours:.0f} | {timm_:.0f} | '
                     f'{ours / timm_:.2f}x |')
    lines += ['', f'Decode only (PIL, full size, to RGB): {ceiling:.0f} img/s.']
    return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
    args = parse_args(argv)
    import PIL
    import timm
    from PIL import features
    cpu = pin_to_one_core(args.cpu)
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            paths = sorted(p for p in args.images.rglob('*')
                           if p.suffix.lower() in ('.jpg', '.jpeg'))
            if not paths:
                sys.exit(f'error: no JPEGs under {args.images}')
            images = f'{len(paths)} JPEGs of {args.images}'
        else:
            paths = sample_jpegs(Path(tmp))
            images = (f'{len(paths)} JPEGs {PHOTO_SIZE[0]} x {PHOTO_SIZE[1]}, quality 90, made '
                      'from scikit-image photos')
        results = measure(args, paths)
    report = {'command': shlex.join(['python', '-m', 'benchmarks.input_pipeline', *argv]),
              'machine': {**host(), 'pinned_cpu': cpu,
                          'load_average': os.getloadavg()},
              'versions': {'pillow': PIL.__version__, 'timm': timm.__version__,
                           'libjpeg-turbo': features.version_feature('libjpeg_turbo'),
                           'numpy': np.__version__},
              'images': images,
              'config': {k: v for k, v in vars(args).items() if k not in ('output', 'images')},
              'results': results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Path(f'{args.output}.json').write_text(json.dumps(report, indent=2, default=str))
    Path(f'{args.output}.md').write_text(markdown(report))
    print(markdown(report))
    print(f'wrote {args.output}.json and {args.output}.md', file=sys.stderr)


if __name__ == '__main__':
    main()
