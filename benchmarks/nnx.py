"""Linen vs NNX in one process: inference and a train step of the linen EfficientNetV2
(`jax.jit(module.apply)`) and of `effnetv2_jax.nnx`'s model over it, with the same weights.

    python -m benchmarks.nnx --sizes b0:64:8 s:128:4

Per model and mode: the first call (trace + compile + one run), then `--rounds` rounds in which
the models take turns (the order rotated every round) making `--calls` timed calls each, so that
load from other processes hits all alike. Reported: the median ms per call over all timed calls,
the spread (min and max of the per-round medians) and the ratio of medians to linen's.
`nnx`: `nnx.jit` on the module (as NNX's docs write it); `nnx-split`: NNX's functional API
(`nnx.split` once, `jax.jit` over the state, `nnx.merge` inside). A train
step is forward in train mode (batch statistics, dropout, drop path), backward, SGD with
momentum (optax) and the BatchNorm statistics update.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.throughput import jax_train_step
from effnetv2_jax import nnx as effnet_nnx
from effnetv2_jax.model import create_model

MODELS = ('linen', 'nnx', 'nnx-split')
TX = optax.sgd(0.01, momentum=0.9)


def loss_fn(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def rngs():
    return nnx.Rngs(0, dropout=1, drop_path=2)


def build(name: str, image_size: int, batch: int, models=MODELS):
    """{model: (infer(), train_step(), NNX module to switch with train()/eval() or None)}:
    closures over one set of weights and one batch."""
    module = create_model(name, num_classes=1000)
    images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
    labels = jnp.arange(batch) % 1000
    variables = jax.jit(lambda k: module.init(k, images[:1], train=False))(jax.random.key(0))
    built = {}

    if 'linen' in models:
        infer = jax.jit(lambda v, x: module.apply(v, x, train=False))

        linen_step = jax.jit(jax_train_step(module, TX))
        state = {'state': (variables['params'], variables['batch_stats'],
                           TX.init(variables['params'])), 'key': jax.random.key(3)}

        def train():
            state['key'], step_key = jax.random.split(state['key'])
            state['state'], value = linen_step(state['state'], images, labels, step_key)
            return value

        built['linen'] = (lambda: infer(variables, images), train, None)

    def nnx_pair(model):
        infer = nnx.jit(lambda m, x: m(x))
        optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, y):
            value, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y))(model)
            optimizer.update(model, grads)
            return value

        return lambda: infer(model, images), lambda: step(model, optimizer, images, labels), model

    def split_pair(model):
        """NNX's functional API: split once, jax.jit over the state, merge inside the trace;
        no per-call graph traversal (the state stays outside the model while training)."""
        model.eval()
        eval_graph, eval_state = nnx.split(model)
        infer = jax.jit(lambda state, x: nnx.merge(eval_graph, state)(x))
        model.train()
        graph, train_state = nnx.split((model, nnx.Optimizer(model, TX, wrt=nnx.Param)))

        @jax.jit
        def step(state, x, y):
            model, optimizer = nnx.merge(graph, state)
            value, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y))(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), value

        holder = {'state': train_state}

        def run_train():
            holder['state'], value = step(holder['state'], images, labels)
            return value

        return lambda: infer(eval_state, images), run_train, None

    if 'nnx-split' in models:
        built['nnx-split'] = split_pair(effnet_nnx.from_linen(module, variables, rngs=rngs()))
    if 'nnx' in models:
        model = effnet_nnx.from_linen(module, variables, rngs=rngs())
        built['nnx'] = nnx_pair(model)
    return built


def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(name, image_size, batch, models, modes, rounds, calls):
    built = build(name, image_size, batch, models)
    rows = []
    for mode in modes:
        index = {'infer': 0, 'train': 1}[mode]
        for m in models:  # train() / eval() traverse the module graph: once, not per call
            getattr(built[m][2], mode if mode == 'train' else 'eval', lambda: None)()
        first = {m: timed(built[m][index]) for m in models}
        per_round = {m: [] for m in models}
        for r in range(rounds):
            order = models[r % len(models):] + models[:r % len(models)]
            for m in order:
                per_round[m].append([timed(built[m][index]) * 1e3 for _ in range(calls)])
        base = statistics.median(sum(per_round['linen'], [])) if 'linen' in models else None
        for m in models:
            times = sum(per_round[m], [])
            medians = [statistics.median(t) for t in per_round[m]]
            median = statistics.median(times)
            rows.append((f'{name} {image_size}px b{batch}', mode, m, median, min(medians),
                         max(medians), median / base if base else float('nan'), first[m]))
            print(f'  {rows[-1][0]} {mode:5s} {m:8s} {median:9.1f} ms  '
                  f'[{min(medians):.1f}-{max(medians):.1f}]  x{rows[-1][6]:.2f}  '
                  f'first call {first[m]:.1f} s', flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sizes', nargs='+', default=['b0:64:8', 's:128:4'],
                   help='variant:image_size:batch')
    p.add_argument('--models', nargs='+', choices=MODELS, default=list(MODELS))
    p.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--calls', type=int, default=3)
    args = p.parse_args()
    jax.config.update('jax_enable_compilation_cache', False)  # each model compiles for itself
    print(f'jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores; '
          f'load average {os.getloadavg()}', flush=True)
    rows = []
    for size in args.sizes:
        name, image_size, batch = size.split(':')
        rows += measure(name, int(image_size), int(batch), args.models, args.modes, args.rounds,
                        args.calls)
    print(f'load average {os.getloadavg()}')
    print('\n| config | mode | model | median ms/call | per-round range | vs linen | first call s |')
    print('|---|---|---|---|---|---|---|')
    for cfg, mode, m, median, lo, hi, ratio, first in rows:
        print(f'| {cfg} | {mode} | {m} | {median:.1f} | {lo:.1f}-{hi:.1f} | {ratio:.2f} | '
              f'{first:.1f} |')


if __name__ == '__main__':
    main()
