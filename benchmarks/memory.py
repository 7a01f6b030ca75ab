"""Memory of the JAX train step with and without per-block rematerialisation, from XLA's buffer
assignment of the compiled step (`compiled.memory_analysis()`): nothing runs, so it works for
sizes this machine could not run, on any backend.

    python -m benchmarks.memory                              # S 512 b24; S/M/L at train size
    python -m benchmarks.memory --cases s:512:24 m:384:32 --dtype bfloat16
    python -m benchmarks.memory --target tpu-v5e-8           # imagenet-s/m/l presets, batch 4096

Reported per case: parameters + optimizer state + BN statistics (the step's donated state), the
batch, and XLA's temporary buffers (activations kept for the backward pass and scratch); their
sum is the step's peak device memory as XLA plans it. A GPU's allocator adds fragmentation and
the runtime's workspace on top (cuDNN), so treat it as a lower bound there.

Remat only pays where the compiler schedules the recomputation late: XLA:CPU's plan comes out the
same with and without it (docs/performance.md, "Memory"). `--target h200` plans for an NVIDIA H200
without one: JAX's CUDA plugin (`pip install "jax[cuda12]==<jax version>"`) compiles for a
described device ("deviceless" ahead-of-time compilation). Nothing is autotuned there, so cuDNN's
convolution workspaces (picked per algorithm on a real GPU) are missing from the plan.

`--target tpu-<generation>-<size>` (Google's accelerator types: tpu-v5e-8, tpu-v5e-256, tpu-v4-32,
tpu-v5p-8) plans per chip for a TPU slice, on any machine with libtpu (`pip install
"jax[tpu]==<jax version>"`): libtpu describes the slice's chips without them, as MaxText's
`train_compile.py` does. There the step is the trainer's own (`train.trainer.jit_train_step`: the
batch sharded over the chips, the state replicated) with the `imagenet-<variant>` preset's
optimizer (RMSProp), EMA, mixup and dropout of its last progressive stage, and a case's batch is
the global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import topologies

import effnetv2_jax
from benchmarks.throughput import jax_train_step
from effnetv2_jax import cli, kernels
from effnetv2_jax.model import abstract_variables
from effnetv2_jax.transforms import HALF_NORMALISATION
from effnetv2_jax.messages import first_line
from train import trainer
from train.config import PRESETS, TrainConfig
from train.progressive import make_stages

DEFAULT_CASES = ['s:512:24', 's:300:128', 'm:384:128', 'l:384:128']
# The imagenet-s/m/l presets: their global batch, at the last progressive stage's size (the
# variant's train size), where activations are largest.
TPU_CASES = ['s:300:4096', 'm:384:4096', 'l:384:4096']
IMAGENET_CLASSES, IMAGENET_TRAIN_IMAGES = 1000, 1_281_167

# An H200 SXM as XLA:GPU's GpuTargetConfig: sm_90, 132 SMs, 139 GiB usable, ~4.8 TB/s, 50 MiB L2.
# The layout is openxla/xla#25919's H100 example (the same GH100 die).
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 150000000000 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H200"
"""


def h200_sharding() -> jax.sharding.NamedSharding:
    """A sharding on one compile-only H200; call before anything initialises a JAX backend."""
    # Without a device, Triton GEMM fusions keep a default tiling that fails on some of the
    # step's dots ("Couldn't find output tile sizes", S 300 b128); cuBLAS takes them instead.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_gpu_enable_triton_gemm=false')
    os.environ['CUDA_VISIBLE_DEVICES'] = '-1'  # plan, even where a real GPU is present
    jax.config.update('jax_platforms', 'cpu')
    try:
        topology = topologies.get_topology_desc(platform='cuda', topology='1x1x1',
                                                target_config=H200_TARGET_CONFIG)
    except NotImplementedError:
        sys.exit(cli.fail(f'--target h200 needs the CUDA plugin of jax {jax.__version__}: '
                          f'pip install "jax[cuda12]=={jax.__version__}"'))
    mesh = topologies.make_mesh(topology, (1,), ('device',))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


class TpuTarget(NamedTuple):
    """A TPU slice as libtpu describes it: `topology` ('v5e:2x4'), `chip_config` ('megacore':
    a v4/v5p chip's two TensorCores as one JAX device), and Google's HBM per chip."""
    name: str  # 'tpu-v5e-8'
    topology: str
    chip_config: str
    chips: int
    hbm_gib: float


# Google's accelerator types count chips for v5e and v6e, TensorCores (2 a chip) for v4 and v5p.
# (libtpu's topology prefix, chip configuration, TensorCores a chip, HBM GiB a chip: Cloud TPU's
# system architecture pages, cloud.google.com/tpu/docs/v5e, v6e, v4 and v5p; v5p and v6e say GB.)
TPU_GENERATIONS = {'v5e': ('v5e', 'default', 1, 16), 'v6e': ('v6e', 'default', 1, 32),
                   'v4': ('v4', 'megacore', 2, 32), 'v5p': ('v5', 'megacore', 2, 95)}
# Slice shapes (chips -> chip grid): 2-D tori for v5e/v6e, 3-D for v4/v5p, as Cloud TPU lists them.
TPU_GRIDS = {2: {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
                 256: '16x16'},
             3: {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
                 256: '4x8x8', 512: '8x8x8'}}


def tpu_target(text: str) -> TpuTarget:
    """'tpu-v5e-8' -> its `TpuTarget` (argparse type; ArgumentTypeError for an unknown one)."""
    generation, _, size = text.removeprefix('tpu-').rpartition('-')
    known = ', '.join(f'tpu-{g}-N' for g in TPU_GENERATIONS)
    if not text.startswith('tpu-') or generation not in TPU_GENERATIONS or not size.isdigit():
        raise argparse.ArgumentTypeError(f'expected local, h200 or one of {known}, got {text!r}')
    prefix, chip_config, cores_per_chip, hbm_gib = TPU_GENERATIONS[generation]
    grids = TPU_GRIDS[2 if cores_per_chip == 1 else 3]
    chips = int(size) // cores_per_chip
    if int(size) % cores_per_chip or chips not in grids:
        sizes = ', '.join(str(c * cores_per_chip) for c in grids)
        raise argparse.ArgumentTypeError(f'tpu-{generation} slices here: {sizes}; got {text!r}')
    return TpuTarget(text, f'{prefix}:{grids[chips]}', chip_config, chips, hbm_gib)


def target(text: str) -> str | TpuTarget:
    """argparse type of --target: 'local', 'h200' or a `TpuTarget`."""
    return text if text in ('local', 'h200') else tpu_target(text)


def tpu_mesh(target: TpuTarget) -> jax.sharding.Mesh:
    """The trainer's mesh over the compile-only chips of `target`; call before anything
    initialises a JAX backend."""
    jax.config.update('jax_platforms', 'cpu')  # plan, even on a TPU VM
    # The chips are never opened, so a plan may run beside a process holding libtpu's lockfile
    # (training, or another plan).
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
        topology = topologies.get_topology_desc(
                topology_name=target.topology, platform='tpu', chip_config_name=target.chip_config)
    except RuntimeError as e:  # libtpu missing, or it cannot describe the slice
        sys.exit(cli.fail(f'--target {target.name} needs libtpu (pip install '
                          f'"jax[tpu]=={jax.__version__}"): {first_line(e)}'))
    return trainer.make_mesh(topology.devices)


def _plan(compiled, batch_bytes: int, seconds: float) -> dict:
    """Bytes of a compiled step's buffers (per device): 'state', 'batch_bytes', 'temp', 'total';
    and its compile seconds."""
    m = compiled.memory_analysis()
    # Donated state: its outputs reuse the inputs' buffers (alias), counted once.
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes \
        + m.temp_size_in_bytes
    return {'state': m.argument_size_in_bytes - batch_bytes, 'batch_bytes': batch_bytes,
            'temp': m.temp_size_in_bytes, 'total': total, 'compile_s': seconds}


def step_memory(variant: str, size: int, batch: int, dtype, remat: bool,
                conv_implementation: str, sharding=None) -> dict:
    """Bytes of the compiled train step: 'state', 'batch_bytes', 'temp', 'total'; and compile
    seconds. Compiled for `sharding`'s device, else for the default one, with the convolutions of
    `conv_implementation` (one of `kernels.IMPLEMENTATIONS`)."""
    model = effnetv2_jax.create_model(variant, dtype=dtype, remat=remat)
    variables = abstract_variables(model)
    tx = optax.sgd(0.1, momentum=0.9)
    state = (variables['params'], variables['batch_stats'],
             jax.eval_shape(tx.init, variables['params']))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    arguments = (state, images, labels, jax.eval_shape(jax.random.key, 0))
    if sharding is not None:
        arguments = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), arguments)
    start = time.perf_counter()
    with kernels.use_implementation(conv_implementation):
        lowered = jax.jit(jax_train_step(model, tx), donate_argnums=0).lower(*arguments)
    compiled = lowered.compile()
    return _plan(compiled, images.size * 4 + batch * 4, time.perf_counter() - start)


def preset_config(variant: str, size: int, global_batch: int, **overrides) -> TrainConfig:
    """The `imagenet-<variant>` preset at `size` px (its last stage) and `global_batch`."""
    return dataclasses.replace(TrainConfig(), **{
            **PRESETS[f'imagenet-{variant}'], 'image_size': size, 'batch_size': global_batch,
            **overrides})


def trainer_step_memory(config: TrainConfig, mesh: jax.sharding.Mesh,
                        conv_implementation: str) -> dict:
    """`step_memory`'s numbers, per device, of the trainer's step on `mesh` for `config`'s last
    progressive stage, compiled from abstract inputs (nothing is allocated)."""
    model = effnetv2_jax.create_model(
            config.variant, num_classes=IMAGENET_CLASSES, drop_path_rate=config.drop_path_rate,
            dtype=jnp.dtype(config.dtype), remat=config.remat)
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    stage = make_stages(config, int(config.epochs * steps_per_epoch), config.image_size)[-1]
    schedule = trainer.learning_rate_schedule(config, steps_per_epoch)
    tx = trainer.make_optimizer(config, schedule)
    state, state_sharding = trainer.abstract_state(mesh, tx, model, ema=config.ema_decay > 0)
    rows, size = config.batch_size, stage.image_size
    batch = {'image': jax.ShapeDtypeStruct((rows, size, size, 3), jnp.uint8,
                                           sharding=trainer.data_sharding(mesh)),
             'label': jax.ShapeDtypeStruct((rows,), jnp.int32,
                                           sharding=trainer.data_sharding(mesh))}
    start = time.perf_counter()
    with kernels.use_implementation(conv_implementation):
        lowered = trainer.jit_train_step(
                mesh, state_sharding, model=model.clone(dropout_rate=stage.dropout), tx=tx,
                schedule=schedule, spec=HALF_NORMALISATION, base_key=jax.random.key(config.seed),
                step_config=trainer.StepConfig.of(config, mixup=stage.mixup)).lower(state, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # XLA:TPU knows the chip's HBM: it rematerialises on its own to fit, and refuses a step
        # that still does not ("... HLO temporaries (32.78G) exceeds available HBM (15.75G)").
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        return {'fits': False, 'error': first_line(e, limit=1000),
                'compile_s': time.perf_counter() - start}
    per_device_rows = rows // mesh.size
    return {'fits': True, **_plan(compiled, per_device_rows * (size * size * 3 + 4),
                                   time.perf_counter() - start)}


def markdown(report: dict) -> str:
    """The report as a Markdown table, with the command and versions under it."""
    gib = 2 ** 30
    tpu = report['target'].get('chips')
    lines = [f"{report['device']}; train step, {report['step']}, {report['dtype']}", '',
             '| variant | size | batch' + (' | per chip' if tpu else '')
             + ' | remat | state | temp | total' + (' | of HBM' if tpu else '') + ' | compile |',
             '|---|---:|---:' + ('|---:' if tpu else '') + '|---|---:|---:|---:'
             + ('|---:' if tpu else '') + '|---:|']
    for r in report['results']:
        cells = [r['variant'].upper(), r['size'], r['batch']]
        if tpu:
            cells.append(r['per_chip_batch'])
        cells.append('yes' if r['remat'] else 'no')
        if r.get('fits', True):
            cells += [f"{r[k] / gib:.2f} GiB" for k in ('state', 'temp', 'total')]
            if tpu:
                cells.append(f"{r['total'] / gib / report['target']['hbm_gib']:.0%}")
        else:  # XLA's message gives the bytes needed, then the HBM it may use (G: GiB)
            sizes = re.findall(r'\d+(?:\.\d+)?[KMGT]\b', r['error'])
            needed, usable = sizes[:2] if len(sizes) > 1 else ('?', '?')
            cells += ['-', f'needs {needed}', '-', f'over {usable}']
        lines.append('| ' + ' | '.join(map(str, cells)) + f" | {r['compile_s']:.0f} s |")
    versions = ', '.join(f'{k} {v}' for k, v in report['versions'].items())
    footer = f"`{report['command']}` ({report['machine']}; {versions})"
    return '\n'.join([*lines, '', footer]) + '\n'


def _earlier_results(output: Path | None, report: dict) -> dict:
    """The results already in `output`.json for the same device and step, by (variant, size,
    batch, remat): a plan of many cases can be run in parts."""
    try:
        earlier = json.loads(Path(f'{output}.json').read_text()) if output else {}
    except (OSError, ValueError):
        return {}
    if any(earlier.get(k) != report[k] for k in ('device', 'step', 'dtype', 'versions')):
        return {}
    return {(r['variant'], r['size'], r['batch'], r['remat']): r for r in earlier['results']}


def _versions(tpu: bool) -> dict:
    names = ['jax', 'jaxlib'] + (['libtpu'] if tpu else [])
    return {name: importlib.metadata.version(name) for name in names}


def main(argv=None) -> None:
    p = cli.parser('benchmarks.memory', __doc__.split('\n\n')[0])
    p.add_argument('--cases', nargs='+', help='variant:size:batch (default: S 512 b24 and S/M/L '
                   f'at their train size, b128; for a TPU: {" ".join(TPU_CASES)}, global batch)')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='bfloat16')
    p.add_argument('--remat', choices=('both', 'yes', 'no'), default='both')
    p.add_argument('--conv-implementation', choices=kernels.IMPLEMENTATIONS, default='xla',
                   help="default 'xla', the convolutions GPUs and TPUs run (the CPU paths plan "
                   "memory differently)")
    p.add_argument('--target', type=target, default='local',
                   help="'local': this machine's default device; 'h200': compile for an NVIDIA "
                   "H200 without one (needs jax[cuda12]); 'tpu-v5e-8', 'tpu-v4-32'...: per chip "
                   "of that TPU slice, without one (needs jax[tpu])")
    p.add_argument('--output', type=Path, help='basename of .json and .md results, rewritten '
                   'after each case; cases it already holds (same device, step and versions) '
                   'are not compiled again')
    args = p.parse_args(argv)
    tpu = args.target if isinstance(args.target, TpuTarget) else None
    cases = args.cases or (TPU_CASES if tpu else DEFAULT_CASES)
    for case in cases:
        variant, *numbers = case.split(':')
        if len(numbers) != 2 or not all(n.isdigit() and int(n) > 0 for n in numbers):
            p.error(f'--cases: expected variant:size:batch, got {case!r}')
        if tpu and f'imagenet-{variant}' not in PRESETS:
            p.error(f'--cases: a TPU plans the imagenet-s/m/l presets, got {case!r}')
        if tpu and int(numbers[1]) % tpu.chips:
            p.error(f'--cases: batch {numbers[1]} is not a multiple of the {tpu.chips} chips')
    sharding = h200_sharding() if args.target == 'h200' else None
    mesh = tpu_mesh(tpu) if tpu else None
    if tpu:
        device = (f'{tpu.name}: {tpu.chips} x {mesh.devices.flat[0].device_kind} (libtpu '
                  f'topology {tpu.topology}, compile only), {tpu.hbm_gib:g} GiB HBM per chip; '
                  'per chip')
    else:
        device = 'NVIDIA H200 (compile only)' if sharding else jax.devices()[0].device_kind
    argv = sys.argv[1:] if argv is None else argv
    report = {'command': shlex.join(['python', '-m', 'benchmarks.memory', *argv]),
              'device': device, 'machine': f'{os.cpu_count()} CPUs',
              'versions': _versions(tpu is not None),
              'target': tpu._asdict() if tpu else {'name': args.target},
              'step': 'the trainer\'s (imagenet preset: RMSProp, EMA)' if tpu else 'SGD momentum',
              'dtype': args.dtype, 'results': []}
    done = _earlier_results(args.output, report)
    print('\n'.join(markdown(report).splitlines()[:4]), flush=True)  # the table's head
    remats = {'both': (False, True), 'yes': (True,), 'no': (False,)}[args.remat]
    for case in cases:
        variant, size, batch = case.split(':')
        size, batch = int(size), int(batch)
        for remat in remats:
            if (variant, size, batch, remat) in done:
                r = done[variant, size, batch, remat]
            elif tpu:
                config = preset_config(variant, size, batch, remat=remat, dtype=args.dtype)
                r = trainer_step_memory(config, mesh, args.conv_implementation)
                r['per_chip_batch'] = batch // tpu.chips
            else:
                r = step_memory(variant, size, batch, jnp.dtype(args.dtype), remat,
                                args.conv_implementation, sharding)
            report['results'].append({**r, 'variant': variant, 'size': size, 'batch': batch,
                                      'remat': remat})
            table = markdown(report)
            print(table.splitlines()[-3], flush=True)
            if args.output:
                Path(f'{args.output}.json').write_text(json.dumps(report, indent=2))
                Path(f'{args.output}.md').write_text(table)


if __name__ == '__main__':
    main()
