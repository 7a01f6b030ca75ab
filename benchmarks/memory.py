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
same with and without it (README, "Memory"), so measure remat on the GPU or TPU it is meant for.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import optax

import effnetv2_jax
from benchmarks.throughput import jax_train_step

DEFAULT_CASES = ['s:512:24', 's:300:128', 'm:384:128', 'l:384:128']


def step_memory(variant: str, size: int, batch: int, dtype, remat: bool,
                depthwise_implementation: str) -> dict:
    """Bytes of the compiled train step: 'state', 'batch', 'temp', 'total'; and compile seconds."""
    model = effnetv2_jax.create_model(variant, dtype=dtype, remat=remat,
                                      depthwise_implementation=depthwise_implementation)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    tx = optax.sgd(0.1, momentum=0.9)
    state = (variables['params'], variables['batch_stats'],
             jax.eval_shape(tx.init, variables['params']))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(jax_train_step(model, tx), donate_argnums=0).lower(
        state, images, labels, jax.random.key(0)).compile()
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
    p.add_argument('--depthwise-implementation', default='xla', help="default 'xla', the "
                   "grouped convolution GPUs and TPUs run (the CPU path plans memory differently)")
    args = p.parse_args(argv)
    print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; '
          f'train step, SGD momentum, {args.dtype}\n')
    print('| variant | size | batch | remat | state | temp | total | compile |')
    print('|---|---:|---:|---|---:|---:|---:|---:|')
    gib = 2 ** 30
    for case in args.cases:
        variant, size, batch = case.split(':')
        for remat in (False, True):
            r = step_memory(variant, int(size), int(batch), jnp.dtype(args.dtype), remat,
                            args.depthwise_implementation)
            print(f"| {variant.upper()} | {size} | {batch} | {'yes' if remat else 'no'} | "
                  f"{r['state'] / gib:.2f} GiB | {r['temp'] / gib:.2f} GiB | "
                  f"{r['total'] / gib:.2f} GiB | {r['compile_s']:.0f} s |", flush=True)


if __name__ == '__main__':
    main()
