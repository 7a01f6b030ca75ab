"""Memory of the JAX train step with and without per-block rematerialisation, from XLA's buffer
assignment of the compiled step (`compiled.memory_analysis()`): nothing runs, so it works for
sizes this machine could not run, on any backend.

    python -m benchmarks.memory                              # S 512 b24; S/M/L at train size
    python -m benchmarks.memory --cases s:512:24 m:384:32 --dtype bfloat16

Reported per case: parameters + optimizer state + BN statistics (the step's donated state), the
batch, and XLA's temporary buffers (activations kept for the backward pass and scratch); their
sum is the step's peak device memory as XLA plans it. A GPU's allocator adds fragmentation and
the runtime's workspace on top (cuDNN), so treat it as a lower bound there.

Remat only pays where the compiler schedules the recomputation late: XLA:CPU's plan comes out the
same with and without it (docs/performance.md, "Memory"). `--target h200` plans for an NVIDIA H200
without one: JAX's CUDA plugin (`pip install "jax[cuda12]==<jax version>"`) compiles for a
described device ("deviceless" ahead-of-time compilation). Nothing is autotuned there, so cuDNN's
convolution workspaces (picked per algorithm on a real GPU) are missing from the plan.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import optax
from jax.experimental import topologies

import effnetv2_jax
from benchmarks.throughput import jax_train_step
from effnetv2_jax import kernels
from effnetv2_jax.model import abstract_variables

DEFAULT_CASES = ['s:512:24', 's:300:128', 'm:384:128', 'l:384:128']

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
        raise SystemExit(f'error: --target h200 needs the CUDA plugin of jax {jax.__version__}: '
                         f'pip install "jax[cuda12]=={jax.__version__}"') from None
    mesh = topologies.make_mesh(topology, (1,), ('device',))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def step_memory(variant: str, size: int, batch: int, dtype, remat: bool,
                conv_implementation: str, sharding=None) -> dict:
    """Bytes of the compiled train step: 'state', 'batch', 'temp', 'total'; and compile seconds.
    Compiled for `sharding`'s device, else for the default one, with the convolutions of
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
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    batch_bytes = images.size * 4 + batch * 4
    state_bytes = m.argument_size_in_bytes - batch_bytes
    # Donated state: its outputs reuse the inputs' buffers (alias), counted once.
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes \
        + m.temp_size_in_bytes
    return {'state': state_bytes, 'batch': batch_bytes, 'temp': m.temp_size_in_bytes,
            'total': total, 'compile_s': seconds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog='python -m benchmarks.memory',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('--cases', nargs='+', default=DEFAULT_CASES, help='variant:size:batch')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='bfloat16')
    p.add_argument('--conv-implementation', choices=kernels.IMPLEMENTATIONS, default='xla',
                   help="default 'xla', the convolutions GPUs and TPUs run (the CPU paths plan "
                   "memory differently)")
    p.add_argument('--target', choices=('local', 'h200'), default='local',
                   help="'local': this machine's default device; 'h200': compile for an NVIDIA "
                   "H200 without one (needs jax[cuda12])")
    args = p.parse_args(argv)
    sharding = h200_sharding() if args.target == 'h200' else None
    device = 'NVIDIA H200 (compile only)' if sharding else jax.devices()[0].device_kind
    print(f'jax {jax.__version__}, {device}, {os.cpu_count()} CPUs; train step, SGD momentum, '
          f'{args.dtype}\n')
    print('| variant | size | batch | remat | state | temp | total | compile |')
    print('|---|---:|---:|---|---:|---:|---:|---:|')
    gib = 2 ** 30
    for case in args.cases:
        variant, size, batch = case.split(':')
        for remat in (False, True):
            r = step_memory(variant, int(size), int(batch), jnp.dtype(args.dtype), remat,
                            args.conv_implementation, sharding)
            print(f"| {variant.upper()} | {size} | {batch} | {'yes' if remat else 'no'} | "
                  f"{r['state'] / gib:.2f} GiB | {r['temp'] / gib:.2f} GiB | "
                  f"{r['total'] / gib:.2f} GiB | {r['compile_s']:.0f} s |", flush=True)


if __name__ == '__main__':
    main()
