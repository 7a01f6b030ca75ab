"""How the real sharded train step's img/s grows with the global batch size and with the number of
(fake) CPU devices, i.e. the overhead of sharding the step.

    python -m benchmarks.scaling                 # b0, 64 px, batches 8 16 32 64 x devices 1 2 4 8
    python -m benchmarks.scaling --variant s --image-size 128 --batch-sizes 16 32 --devices 1 4

The step is `train.trainer.jit_train_step` as `python -m train` builds it (SGD, the default
recipe's EMA, label smoothing, dropout and drop path; 1000 classes), on a mesh of
`--xla_force_host_platform_device_count` CPU devices, one worker process per device count (the
count is fixed when JAX starts) measuring every global batch it divides. Each step includes
`global_batch` (splitting a prepared uint8 batch over the devices), as in train/loop.py, but no
data loading. Per cell: compile + first step (cold: no compilation cache), and the median img/s
over `--repeats` rounds of `--steps` steps. Peak RSS is per worker (per device count, over all its
batch sizes): the OS only keeps a running maximum.

How to read the numbers: the fake devices share the same cores, so at a fixed global batch the
ideal ratio to 1 device is 1.0, and anything below it is the sharded step's overhead: partitioning,
the all-reduces of the gradients and of the BatchNorm statistics, and smaller per-device matrix
products that use the cores less well. Down the 1-device column, img/s growing with the batch is
fixed per-step cost (dispatch, the optimizer and EMA updates, small-batch inefficiency) being
amortised. On real multi-device hardware the same code divides the work instead, and img/s should
grow with the device count.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.throughput import machine, random_variables, receive, send

MAX_DEVICES = 64  # beyond this, on a few cores, only thread contention would be measured
RECORDED_FIELDS = ('optimizer', 'momentum', 'weight_decay', 'label_smoothing', 'ema_decay',
                   'drop_path_rate', 'dropout', 'mixup', 'cutmix')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m benchmarks.scaling',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('--variant', default='b0')
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[8, 16, 32, 64],
                   help='global batch sizes')
    p.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4, 8],
                   help='fake CPU device counts')
    p.add_argument('--repeats', type=int, default=5, help='rounds (the median is reported)')
    p.add_argument('--steps', type=int, default=5, help='steps per round')
    p.add_argument('--output', type=Path, help='basename of the .json and .md results '
                   '(default: benchmarks/results/scaling-cpu-<variant>-<size>)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from effnetv2_jax import get_variant
    try:
        get_variant(args.variant)
    except ValueError as e:
        p.error(str(e))
    for name in ('image_size', 'repeats', 'steps'):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.batch_sizes) < 1:
        p.error('--batch-sizes must be positive')
    if not all(1 <= d <= MAX_DEVICES for d in args.devices):
        p.error(f'--devices must be between 1 and {MAX_DEVICES}')
    args.batch_sizes, args.devices = sorted(set(args.batch_sizes)), sorted(set(args.devices))
    if not args.worker and not any(b % d == 0 for b in args.batch_sizes for d in args.devices):
        p.error('no batch size is a multiple of any device count')
    return args


# --- the worker: one device count, every batch size it divides --------------------------------

def measure(args, batch_size: int) -> dict:
    """One cell: compile + first step time and img/s per round of the real sharded step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import effnetv2_jax
    from effnetv2_jax.transforms import HALF_NORMALISATION
    from train import trainer
    from train.config import TrainConfig
    config = dataclasses.replace(TrainConfig(), variant=args.variant, optimizer='sgd',
                                 batch_size=batch_size, image_size=args.image_size,
                                 dtype=args.dtype)
    model = effnetv2_jax.create_model(config.variant, drop_path_rate=config.drop_path_rate,
                                      dtype=jnp.dtype(config.dtype))
    rng = np.random.default_rng(0)
    # On the host: the state's EMA starts as the parameters, and device_put of one device array
    # twice would alias the two, which the donating step refuses.
    variables = jax.device_get(random_variables(model, rng))
    schedule = trainer.learning_rate_schedule(config, steps_per_epoch=100)
    tx = trainer.make_optimizer(config, schedule)
    mesh = trainer.make_mesh()
    state = trainer.create_state(tx, variables, ema=config.ema_decay > 0)
    state_sharding = trainer.state_shardings(mesh, state)
    state = jax.device_put(state, state_sharding)
    size = config.image_size
    batch = {'image': rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
             'label': rng.integers(0, model.num_classes, batch_size, dtype=np.int32)}
    start = time.perf_counter()
    step = trainer.jit_train_step(
            mesh, state_sharding, name=f'scaling b{batch_size}',
            model=model.clone(dropout_rate=config.dropout), tx=tx, schedule=schedule,
            spec=HALF_NORMALISATION, base_key=jax.random.key(config.seed),
            step_config=trainer.StepConfig.of(config, mixup=config.mixup))
    state, _ = step(state, trainer.global_batch(mesh, batch))
    jax.block_until_ready(state)
    first_step_s = time.perf_counter() - start
    rounds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, _ = step(state, trainer.global_batch(mesh, batch))
        jax.block_until_ready(state)  # steps are dispatched asynchronously, as in training
        rounds.append(batch_size * args.steps / (time.perf_counter() - start))
    return {'batch_size': batch_size, 'first_step_s': first_step_s, 'img_per_s_rounds': rounds,
            'img_per_s': statistics.median(rounds)}


def worker(args) -> None:
    import jax
    devices = args.devices[0]
    if jax.device_count() != devices:
        raise RuntimeError(f'asked for {devices} CPU devices, JAX has {jax.device_count()}')
    for batch_size in args.batch_sizes:
        send({'devices': devices, **measure(args, batch_size)})
    send({'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


# --- the driver --------------------------------------------------------------------------------

def worker_env(devices: int) -> dict:
    """CPU only, `devices` fake devices; the user's other XLA flags are kept."""
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
            'XLA_FLAGS': ' '.join([*flags, f'--xla_force_host_platform_device_count={devices}'])}


def run_worker(args, devices: int, batch_sizes: list[int], progress) -> tuple[list[dict], int]:
    command = [sys.executable, '-m', 'benchmarks.scaling', '--worker', f'--variant={args.variant}',
               f'--image-size={args.image_size}', f'--dtype={args.dtype}',
               f'--repeats={args.repeats}', f'--steps={args.steps}', f'--devices={devices}',
               '--batch-sizes', *map(str, batch_sizes)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env=worker_env(devices))
    try:
        cells = []
        for _ in batch_sizes:
            cells.append(receive(process))
            progress.update()
        peak_rss_bytes = receive(process)['peak_rss_bytes']
        process.wait()
        return cells, peak_rss_bytes
    finally:
        process.kill()


def markdown(report: dict) -> str:
    c, m = report['config'], report['machine']
    cells = {(r['batch_size'], r['devices']): r for r in report['results']}
    header = ['| global batch | ' + ' | '.join(f'{d} device' + 's' * (d > 1) for d in c['devices'])
              + ' |', '|---:' * (len(c['devices']) + 1) + '|']

    def rows(text) -> list[str]:
        """One row per batch size; `text(cell, cell at 1 device or None)` per measured cell."""
        return [f'| {b} | ' + ' | '.join(text(cells[b, d], cells.get((b, 1))) if (b, d) in cells
                                         else '-' for d in c['devices']) + ' |'
                for b in c['batch_sizes']]

    rss = {w['devices']: f"{w['peak_rss_bytes'] / 2**30:.2f} GiB" for w in report['workers']}
    return '\n'.join([
        f"EfficientNetV2-{c['variant'].upper()} train step, {c['image_size']} px, {c['dtype']}, "
        f"fake CPU devices ({m['cpu']}, {m['cpus']} CPUs; jax {m.get('jax')}); median of "
        f"{c['repeats']} rounds of {c['steps']} steps.", '', f"`{report['command']}`", '',
        'img/s (ratio to 1 device at the same global batch; ideal 1.00):', '', *header,
        *rows(lambda cell, base: f"{cell['img_per_s']:.1f}" + (
            f" ({cell['img_per_s'] / base['img_per_s']:.2f})" if base else '')),
        '', 'Compile + first step (s), and the peak RSS of each worker:', '', *header,
        *rows(lambda cell, base: f"{cell['first_step_s']:.1f}"),
        f"| peak RSS | {' | '.join(rss.get(d, '-') for d in c['devices'])} |", '',
        '`-`: the batch is not a multiple of the device count.']) + '\n'


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from tqdm import tqdm

    from train.config import TrainConfig
    recipe = dataclasses.replace(TrainConfig(), optimizer='sgd')
    argv = sys.argv[1:] if argv is None else argv
    report = {'command': shlex.join(['python', '-m', 'benchmarks.scaling', *argv]),
              'machine': machine('cpu'),
              'config': {**{k: v for k, v in vars(args).items() if k not in ('worker', 'output')},
                         **{k: getattr(recipe, k) for k in RECORDED_FIELDS}},
              'results': [], 'workers': []}
    grid = {d: [b for b in args.batch_sizes if b % d == 0] for d in args.devices}
    with tqdm(total=sum(map(len, grid.values())), unit='cell', file=sys.stderr) as progress:
        for devices, batch_sizes in grid.items():  # one at a time: they would share the cores
            if not batch_sizes:
                continue
            progress.set_description(f'{devices} device(s)')
            try:
                cells, peak_rss_bytes = run_worker(args, devices, batch_sizes, progress)
            except RuntimeError as e:  # the worker's traceback is above, on stderr
                sys.exit(f'error: {e}')
            report['results'] += cells
            report['workers'].append({'devices': devices, 'peak_rss_bytes': peak_rss_bytes})
    output = args.output or Path('benchmarks/results') / (
        f'scaling-cpu-{args.variant}-{args.image_size}')
    output.parent.mkdir(parents=True, exist_ok=True)
    Path(f'{output}.json').write_text(json.dumps(report, indent=2))
    Path(f'{output}.md').write_text(markdown(report))
    print(markdown(report))
    print(f'wrote {output}.json and {output}.md', file=sys.stderr)


if __name__ == '__main__':
    main()
