"""Evaluation: loss, top-1 and top-5 of named variable sets over an eval dataset, and the
validation of a training run that keeps the best result so far."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from train import trainer
from train.input_pipeline import DataError
from train.report import Reporter


def total_over_processes(count: int) -> int:
    """The sum of each process's `count` (every process must call it)."""
    return int(np.sum(multihost_utils.process_allgather(np.int32(count))))


def evaluate(eval_fn, weights: dict[str, dict], dataset, mesh: Mesh) -> dict:
    """{'<name>/loss', '<name>/top1', '<name>/top5' for each name of `weights`, 'images',
    'skipped_images'} over a whole eval dataset (`eval_fn`: a jitted `trainer.eval_step`).
    Unreadable images are left out of the metrics: 'images' counts those evaluated,
    'skipped_images' the unreadable ones. Raises `DataError` when no image was readable."""
    totals, skipped = None, 0
    for batch in dataset:
        skipped += int(batch.pop('skipped').sum())
        sums = eval_fn(weights, trainer.global_batch(mesh, batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    images, skipped = int(totals.pop('count')), total_over_processes(skipped)
    if images == 0:
        raise DataError(f'no readable image to evaluate ({skipped} unreadable)')
    return {**{k: float(v) / images for k, v in totals.items()}, 'images': images,
            'skipped_images': skipped}


class Validation:
    """The run's validation set: evaluates the raw (and EMA) weights of a train state, reports
    the result and remembers the best top-1 (of either) with its step. Without a validation set
    (`dataset` None) it evaluates nothing."""

    def __init__(self, eval_fn, dataset, mesh: Mesh, reporter: Reporter):
        self.eval_fn, self.dataset, self.mesh, self.reporter = eval_fn, dataset, mesh, reporter
        self.best = {'top1': 0.0, 'weights': 'raw', 'step': 0}

    def __call__(self, state: trainer.TrainState, step: int) -> dict | None:
        """The `evaluate` result of `state.weights()` at `step` (None without a dataset)."""
        if self.dataset is None:
            return None
        weights = state.weights()
        result = evaluate(self.eval_fn, weights, self.dataset, self.mesh)
        self.reporter.write(step, {f'eval/{k}': v for k, v in result.items()})
        for name in weights:
            if result[f'{name}/top1'] > self.best['top1']:
                self.best.update(top1=result[f'{name}/top1'], weights=name, step=step)
        self.reporter.print(
                f'step {step}: val top-1 {result["raw/top1"]:.2%} top-5 '
                f'{result["raw/top5"]:.2%} loss {result["raw/loss"]:.3f}'
                + (f' | EMA top-1 {result["ema/top1"]:.2%}' if 'ema' in weights else '')
                + (f' ({result["skipped_images"]} unreadable images skipped)'
                   if result['skipped_images'] else ''))
        return result
