"""Start-up of `python -m effnetv2_jax.predict` with and without the persistent compilation cache.

    python -m benchmarks.startup [--variants b0 s l] [--repeats 2]

For each variant: weights with the variant's eval transform (random values: timing does not depend
on them), then wall-clock times of the command on one photo: first start with an empty cache, the
following starts (the cache filled), and with the cache off. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import effnetv2_jax
from effnetv2_jax import layouts


def random_weights(variant: str, path: Path) -> dict:
    """Weights file of `variant` (wzmiaomiao layout's metadata) with random values; returns its spec."""
    model = effnetv2_jax.create_model(variant)
    shapes = effnetv2_jax.model.abstract_variables(model)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.0, s.shape).astype(s.dtype), shapes)
    spec = layouts.WZMIAOMIAO.preprocessing(effnetv2_jax.get_variant(variant), 'symmetric')
    effnetv2_jax.save(path, variables, {'variant': variant, 'num_classes': 1000,
                                        'padding': 'symmetric', 'bn_eps': 1e-3,
                                        'preprocessing': spec})
    return spec


def timed_run(weights: Path, image: Path, cache: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'effnetv2_jax.predict', str(image), '--weights',
                    str(weights), '--top-k', '1'], check=True, capture_output=True,
                   env={**os.environ, 'EFFNETV2_JAX_CACHE_DIR': cache})
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--variants', nargs='+', default=['b0', 's', 'l'])
    p.add_argument('--repeats', type=int, default=2, help='warm and cache-off runs per variant')
    args = p.parse_args(argv)
    print(f'jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs\n')
    print('| variant | eval size | first start (empty cache) | next starts (cached) '
          '| cache off | cache size |')
    print('|---|---:|---:|---:|---:|---:|')
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / 'photo.png'
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
                        ).save(image)
        for variant in args.variants:
            weights, cache = tmp / f'{variant}.msgpack', tmp / f'xla-{variant}'
            spec = random_weights(variant, weights)
            cold = timed_run(weights, image, str(cache))
            warm = [timed_run(weights, image, str(cache)) for _ in range(args.repeats)]
            off = [timed_run(weights, image, 'off') for _ in range(args.repeats)]
            size = sum(f.stat().st_size for f in cache.rglob('*') if f.is_file())
            print(f"| {variant} | {spec['size']} | {cold:.1f} s | {statistics.median(warm):.1f} s "
                  f'| {statistics.median(off):.1f} s | {size / 1e6:.1f} MB |', flush=True)


if __name__ == '__main__':
    main()
