"""Throughput of our model against PyTorch's, side by side in one run: img/s, peak memory, time to
the first result, for inference and a full train step.

    python -m benchmarks.throughput --variant s --image-size 224 --batch-size 8
    python -m benchmarks.throughput --variant s --image-size 300 --batch-size 128 \\
        --dtype bfloat16 --device gpu --frameworks jax wzmiaomiao-cl torchvision-cl

Frameworks: `jax` (this package), `wzmiaomiao` (convert/torch_reference.py: the architecture of
WZMIAOMIAO's model.py in PyTorch), `torchvision`; a `-cl` suffix runs PyTorch channels_last, `-compile` adds torch.compile. Each runs
in its own worker process, built and compiled one after another; then the workers take turns,
`--repeats` rounds of one untimed and `--steps` timed steps each, so machine noise hits all alike.
Reported: the median img/s over rounds; the time from building the step to its first result
(compilation included); peak memory: on GPU the framework's peak device allocation, on CPU the
worker's peak resident set (framework runtime included). A train step is forward, backward, SGD
with momentum and the BatchNorm update, in train mode (dropout, drop path). Writes JSON and
markdown to `--output`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROTOCOL = '@@ '  # worker -> driver lines; anything else a library prints is passed through
# Settings that change the figures: the workers inherit the driver's, and the command shows them.
TUNING_VARIABLES = ('GLIBC_TUNABLES', 'XLA_FLAGS', 'OMP_NUM_THREADS', 'OMP_WAIT_POLICY',
                    'LD_PRELOAD')
FRAMEWORKS = ('jax', 'wzmiaomiao', 'wzmiaomiao-cl', 'wzmiaomiao-compile', 'wzmiaomiao-cl-compile',
              'torchvision', 'torchvision-cl', 'torchvision-cl-compile')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m benchmarks.throughput',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('--variant', default='s')
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
    p.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
    p.add_argument('--frameworks', nargs='+', choices=FRAMEWORKS,
                   default=['jax', 'wzmiaomiao', 'wzmiaomiao-cl'])
    p.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    p.add_argument('--repeats', type=int, default=5, help='rounds (the median is reported)')
    p.add_argument('--steps', type=int, default=5, help='steps per round')
    p.add_argument('--remat', action='store_true', help='jax: rematerialise each block')
    p.add_argument('--output', type=Path, help='basename of the .json and .md results '
                   '(default: benchmarks/results/<device>-<variant>-<size>-b<batch>-<dtype>)')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--mode', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant not in ('s', 'm', 'l') and any(f.startswith('torchvision')
                                                   for f in args.frameworks):
        p.error('torchvision has EfficientNetV2 S, M and L only')
    return args


# --- workers: one framework, one mode ---------------------------------------------------------

def send(message: dict) -> None:
    print(PROTOCOL + json.dumps(message), flush=True)


def jax_train_step(model, tx):
    """`step((params, batch_stats, opt_state), images, labels, key) -> (new state, loss)`: forward
    in train mode, backward, the optax update and the BatchNorm update."""
    import jax
    import optax

    def train_step(state, images, labels, key):
        params, batch_stats, opt_state = state
        dropout, drop_path = jax.random.split(key)

        def loss_fn(params):
            logits, updates = model.apply(
                {'params': params, 'batch_stats': batch_stats}, images, train=True,
                mutable=['batch_stats'], rngs={'dropout': dropout, 'drop_path': drop_path})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates['batch_stats']

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return train_step


def random_variables(model, rng):
    """Variables of `model` with N(0, 0.05) values in the initialisers' shapes: running Flax's
    initialisers compiles for tens of seconds on CPU and is not what is measured."""
    import jax
    import jax.numpy as jnp
    from effnetv2_jax.model import abstract_variables
    shapes = abstract_variables(model)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype), shapes)


def jax_step(args):
    """(step, peak memory) for our model: step() runs one batch and waits for its result."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import effnetv2_jax
    model = effnetv2_jax.create_model(args.variant, dtype=jnp.dtype(args.dtype), remat=args.remat)
    size, batch = args.image_size, args.batch_size
    rng = np.random.default_rng(0)
    variables = random_variables(model, rng)
    images = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, batch))
    if args.mode == 'infer':
        forward = jax.jit(model.apply)
        step = lambda: forward(variables, images).block_until_ready()
    else:
        tx = optax.sgd(0.1, momentum=0.9)
        jitted = jax.jit(jax_train_step(model, tx), donate_argnums=0)
        params = variables['params']
        state = [(params, variables['batch_stats'], tx.init(params))]
        key = jax.random.key(1)

        def step():
            state[0], loss = jitted(state[0], images, labels, key)
            loss.block_until_ready()

    def peak_memory():
        stats = jax.devices()[0].memory_stats() or {}
        if 'peak_bytes_in_use' in stats:
            return stats['peak_bytes_in_use'], 'device peak'
        return _peak_rss(), 'process peak RSS'

    return step, peak_memory


def torch_step(args):
    import torch
    import torch.nn.functional as F
    name = args.worker
    device = torch.device('cuda' if args.device == 'gpu' else 'cpu')
    if name.startswith('wzmiaomiao'):
        from convert.torch_reference import create
        model = create(args.variant)
    else:
        import torchvision
        model = getattr(torchvision.models, f'efficientnet_v2_{args.variant}')()
    memory_format = torch.channels_last if '-cl' in name else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    size, batch = args.image_size, args.batch_size
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == 'bfloat16')
    forward = torch.compile(model) if name.endswith('-compile') else model
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if args.mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                forward(images)
            sync()
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(forward(images), labels)
            loss.backward()
            optimizer.step()
            sync()

    def peak_memory():
        if device.type == 'cuda':
            return torch.cuda.max_memory_allocated(), 'device peak'
        return _peak_rss(), 'process peak RSS'

    return step, peak_memory


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(args) -> None:
    start = time.perf_counter()
    step, peak_memory = (jax_step if args.worker == 'jax' else torch_step)(args)
    step()
    send({'first_result_s': time.perf_counter() - start})
    for command in sys.stdin:
        if command.strip() == 'run':
            step()  # untimed: the other frameworks' turns leave the memory and caches cold
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            send({'seconds': time.perf_counter() - start})
        else:
            memory, kind = peak_memory()
            send({'peak_memory_bytes': memory, 'memory_kind': kind})
            return


# --- the driver --------------------------------------------------------------------------------

def receive(process) -> dict:
    for line in process.stdout:
        if line.startswith(PROTOCOL):
            return json.loads(line[len(PROTOCOL):])
        sys.stderr.write(line)
    raise RuntimeError(f'a benchmark worker died (exit status {process.wait()})')


def host() -> dict:
    """Python's version, the CPU count and the CPU model."""
    info = {'python': platform.python_version(), 'cpus': os.cpu_count(),
            'cpu': platform.processor() or platform.machine()}
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                info['cpu'] = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return info


def machine(device: str) -> dict:
    info = host()
    versions = subprocess.run(
        [sys.executable, '-c', 'import jax, flax, torch; print(jax.__version__, flax.__version__, '
         'torch.__version__, jax.devices()[0].device_kind)'],
        capture_output=True, text=True, env=_env(device)).stdout.split(maxsplit=3)
    if len(versions) == 4:
        info.update(jax=versions[0], flax=versions[1], torch=versions[2],
                    jax_device=versions[3].strip())
    return info


def _env(device: str) -> dict:
    env = {**os.environ, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}  # measure, and share the GPU
    if device == 'cpu':
        env.update(JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
    return env


def run_mode(args, mode: str) -> list[dict]:
    common = [f'--variant={args.variant}', f'--image-size={args.image_size}',
              f'--batch-size={args.batch_size}', f'--dtype={args.dtype}',
              f'--device={args.device}', f'--steps={args.steps}', f'--mode={mode}']
    common += ['--remat'] if args.remat else []
    workers, results = {}, {}
    try:
        for name in args.frameworks:  # one at a time, so that compile times are not shared
            workers[name] = subprocess.Popen(
                [sys.executable, '-m', 'benchmarks.throughput', f'--worker={name}', *common],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(args.device))
            results[name] = {'framework': name, 'mode': mode, **receive(workers[name]),
                             'img_per_s_rounds': []}
            print(f'  {mode} {name}: first result after {results[name]["first_result_s"]:.1f} s',
                  file=sys.stderr)
        for round_ in range(args.repeats):
            order = args.frameworks if round_ % 2 == 0 else args.frameworks[::-1]
            for name in order:
                workers[name].stdin.write('run\n')
                workers[name].stdin.flush()
                seconds = receive(workers[name])['seconds']
                results[name]['img_per_s_rounds'].append(args.batch_size * args.steps / seconds)
        for name, process in workers.items():
            process.stdin.write('quit\n')
            process.stdin.flush()
            results[name].update(receive(process))
            process.wait()
    finally:
        for process in workers.values():
            process.kill()
    for r in results.values():
        r['img_per_s'] = statistics.median(r['img_per_s_rounds'])
    return list(results.values())


def markdown(report: dict) -> str:
    c, m = report['config'], report['machine']
    lines = [f"EfficientNetV2-{c['variant'].upper()}, {c['image_size']} px, batch "
             f"{c['batch_size']}, {c['dtype']}, {c['device']}: {m.get('jax_device', '')} "
             f"({m['cpu']}, {m['cpus']} CPUs); jax {m.get('jax')}, flax {m.get('flax')}, "
             f"torch {m.get('torch')}; median of {c['repeats']} rounds of {c['steps']} steps.",
             '', f"`{report['command']}`", '',
             '| mode | framework | img/s | vs best PyTorch | first result | peak memory |',
             '|---|---|---:|---:|---:|---:|']
    for mode in c['modes']:
        rows = [r for r in report['results'] if r['mode'] == mode]
        torch_best = max((r['img_per_s'] for r in rows if r['framework'] != 'jax'), default=None)
        for r in rows:
            ratio = f"{r['img_per_s'] / torch_best:.2f}x" if torch_best else ''
            lines.append(f"| {mode} | {r['framework']} | {r['img_per_s']:.1f} | {ratio} | "
                         f"{r['first_result_s']:.1f} s | {r['peak_memory_bytes'] / 2**30:.2f} GiB "
                         f"({r['memory_kind']}) |")
    return '\n'.join(lines) + '\n'


def command_line(argv: list[str]) -> str:
    """The command that reproduces this run, with the TUNING_VARIABLES that are set."""
    settings = [f'{k}={os.environ[k]}' for k in TUNING_VARIABLES if k in os.environ]
    return ' '.join([*settings, 'python -m benchmarks.throughput', *argv])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    report = {'command': command_line(argv if argv is not None else sys.argv[1:]),
              'machine': machine(args.device),
              'config': {k: v for k, v in vars(args).items()
                         if k not in ('worker', 'mode', 'output')}, 'results': []}
    for mode in args.modes:
        try:
            report['results'] += run_mode(args, mode)
        except RuntimeError as e:  # the worker's traceback is above, on stderr
            sys.exit(f'error: {e}')
    output = args.output or Path('benchmarks/results') / (
        f'{args.device}-{args.variant}-{args.image_size}-b{args.batch_size}-{args.dtype}')
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix('.json').write_text(json.dumps(report, indent=2, default=str))
    output.with_suffix('.md').write_text(markdown(report))
    print(markdown(report))
    print(f'wrote {output}.json and {output}.md', file=sys.stderr)


if __name__ == '__main__':
    main()
