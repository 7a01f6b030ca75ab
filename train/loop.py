"""`train_and_evaluate`: the whole run, from data and model to the final weights file.

Resumable at any step: state, optimizer, EMA and the data iterator's position come back from the
workdir's newest checkpoint; the randomness of step s is fold_in(seed, s), so a resumed run ends
with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import functools
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import effnetv2_jax
from effnetv2_jax.checkpoint import build_model, read
from effnetv2_jax.transforms import HALF_NORMALISATION
from train import input_pipeline, trainer
from train.config import ConfigError, TrainConfig
from train.digits import materialize_digits
from train.progressive import make_stages, stage_at
from train.report import Reporter, plot_curves
from train.run_checkpoints import RunCheckpoints

WEIGHTS_FILE = 'model.msgpack'  # the final weights, in `python -m convert`'s format


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written and the run can resume."""


def _data_dir(config: TrainConfig) -> str:
    if config.data_dir:
        return config.data_dir
    root = str(Path(config.workdir) / 'digits')
    if jax.process_index() == 0:
        materialize_digits(root)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('digits materialised')
    return root


def _eval_spec(config: TrainConfig, variant, init_metadata: dict | None) -> dict:
    """Eval transform: resize the short side and center-crop; normalisation of the init weights
    (their source's), else the seed's mean = std = 0.5."""
    normalisation = (init_metadata or {}).get('preprocessing') or HALF_NORMALISATION
    return {'size': config.eval_image_size or variant.eval_size, 'resize': 'shorter',
            'crop_pct': 1.0, 'interpolation': 'bicubic',
            'mean': list(normalisation['mean']), 'std': list(normalisation['std'])}


def _read_init(path: str) -> tuple[dict, dict]:
    try:
        return read(path)
    except (OSError, ValueError) as e:
        raise input_pipeline.DataError(f'cannot read --init {path}: {e}') from None


def _model_and_variables(config: TrainConfig, num_classes: int):
    """(model, numpy variables or None, init metadata or None); a checkpoint of another class
    count keeps everything but the classifier, which is initialised afresh."""
    dtype = jnp.dtype(config.dtype)
    overrides = dict(num_classes=num_classes, drop_path_rate=config.drop_path_rate, dtype=dtype,
                     remat=config.remat)
    if not config.init:
        try:
            effnetv2_jax.get_variant(config.variant)
        except ValueError as e:
            raise ConfigError(f'--variant: {e}') from None
        return effnetv2_jax.create_model(config.variant, **overrides), None, None
    variables, metadata = _read_init(config.init)
    model = build_model(metadata, **overrides)
    if metadata['num_classes'] != num_classes:
        fresh = _init_variables(model, config.seed)
        variables['params']['classifier'] = fresh['params']['classifier']
    return model, variables, metadata


def _init_variables(model, seed: int):
    variables = jax.jit(functools.partial(model.init, train=False))(
            jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32))
    return jax.device_get(variables)


def _average(sums: dict) -> dict:
    count = max(float(sums.pop('count')), 1.0)
    return {k: float(v) / count for k, v in sums.items()}


def evaluate(eval_fn, state, dataset, mesh) -> dict:
    """Loss, top-1 and top-5 (raw and EMA) over a whole eval dataset; padding is masked out."""
    totals, skipped = None, 0
    for batch in dataset:
        skipped += int(batch.pop('skipped').sum())
        sums = eval_fn(state, trainer.global_batch(mesh, batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    result = _average(jax.device_get(totals))
    result['skipped'] = skipped
    return result


def _install_sigterm_handler() -> dict:
    """Single process: SIGTERM sets a flag checked every step. Multi-process runs use JAX's
    preemption sync point instead, so that every process stops at the same step."""
    flag = {'stop': False}
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, lambda *_: flag.update(stop=True))
    return flag


def train_and_evaluate(config: TrainConfig) -> dict:
    """Trains per `config`; returns the summary {'best_top1', 'seconds', 'images_per_second',
    'weights', ...}. Raises `ConfigError` for a configuration this machine cannot run,
    `input_pipeline.DataError` for bad data, `Preempted` on SIGTERM."""
    started = time.time()
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_folder, val_folder = input_pipeline.find_splits(
            _data_dir(config), config.val_split, config.seed)
    num_classes = len(train_folder.class_names)
    model, variables, init_metadata = _model_and_variables(config, num_classes)
    spec = _eval_spec(config, model.variant, init_metadata)

    steps_per_epoch = max(1, len(train_folder) // config.batch_size)
    total_steps = max(1, int(config.epochs * steps_per_epoch))
    stages = make_stages(config, total_steps, config.image_size or model.variant.train_size)
    eval_every = max(1, int(config.eval_every * steps_per_epoch))
    schedule = trainer.learning_rate_schedule(config, steps_per_epoch)
    tx = trainer.make_optimizer(config, schedule)

    mesh = trainer.make_mesh()
    if config.batch_size % jax.device_count():
        raise ConfigError(f'--batch-size {config.batch_size} is not a multiple of the '
                          f'{jax.device_count()} devices')
    create = functools.partial(trainer.create_state, model, tx)
    abstract_variables = jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0),
            jnp.zeros((1, 32, 32, 3)))
    abstract_state = jax.eval_shape(create, abstract_variables)
    state_sharding = trainer.state_shardings(mesh, abstract_state)

    checkpoints = RunCheckpoints(workdir, config.keep_checkpoints)
    resume_step = checkpoints.latest_step()
    if resume_step is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sharding)
        state = checkpoints.restore_state(resume_step, abstract)
        progress = checkpoints.restore_progress(resume_step)
    else:
        if variables is None:
            variables = _init_variables(model, config.seed)
        state = jax.jit(create, out_shardings=state_sharding)(variables)
        progress = None
    step = int(state.step)

    base_key = jax.random.key(config.seed)
    reporter = Reporter(workdir, total_steps, step, config.tensorboard)
    reporter.print(
            f'{config.variant} on {config.data_dir or "digits"}: {len(train_folder)} train / '
            f'{len(val_folder) if val_folder else 0} val images, {num_classes} classes; '
            f'{jax.device_count()} {jax.devices()[0].platform} device(s) in '
            f'{jax.process_count()} process(es); {total_steps} steps of {config.batch_size}, '
            f'stages {[s.image_size for s in stages]} px; lr {config.lr:g}'
            + (f'; resumed at step {step}' if resume_step is not None else ''))
    eval_fn = trainer.jit_eval_step(mesh, state_sharding, model=model, spec=spec,
                                    with_ema=config.ema_decay > 0)
    eval_data = None if val_folder is None else input_pipeline.eval_dataset(
            val_folder, global_batch_size=config.batch_size, spec=spec,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_workers=config.num_workers)
    sigterm = _install_sigterm_handler()
    best = {'top1': 0.0, 'weights': 'raw', 'step': 0}
    skipped_train, images_seen, train_seconds = 0, 0, 0.0

    def run_eval(at_step):
        if eval_data is None:
            return None
        result = evaluate(eval_fn, state, eval_data, mesh)
        reporter.write(at_step, {f'eval/{k}': v for k, v in result.items()})
        for name in ('raw', 'ema') if config.ema_decay > 0 else ('raw',):
            if result[f'{name}/top1'] > best['top1']:
                best.update(top1=result[f'{name}/top1'], weights=name, step=at_step)
        reporter.print(
                f'step {at_step}: val top-1 {result["raw/top1"]:.2%} top-5 '
                f'{result["raw/top5"]:.2%} loss {result["raw/loss"]:.3f}'
                + (f' | EMA top-1 {result["ema/top1"]:.2%}' if config.ema_decay > 0 else ''))
        return result

    final_eval = None
    for stage in stages[stages.index(stage_at(stages, step)):]:
        if step >= stage.last_step:
            continue
        # The saved iterator position when it was saved by this stage with the same process
        # and worker layout; else the stream's position for `step` (a pure function of it).
        restore = progress is not None and progress == {
                'step': step, 'stage': stage.index, 'process_count': jax.process_count(),
                'num_workers': config.num_workers}
        data = iter(input_pipeline.train_dataset(
                train_folder, global_batch_size=config.batch_size, image_size=stage.image_size,
                randaug_layers=config.randaug_layers, randaug_magnitude=stage.randaug,
                seed=config.seed, stage=stage.index, process_index=jax.process_index(),
                process_count=jax.process_count(), num_workers=config.num_workers,
                min_scale=config.min_scale, flip=config.flip,
                start_step=stage.first_step if restore else step))
        if restore:
            checkpoints.restore_iterator(step, data)
        step_fn = trainer.jit_train_step(
                mesh, state_sharding, name=f'train step of stage {stage.index}',
                model=model.clone(dropout_rate=stage.dropout), tx=tx,
                schedule=schedule, spec=spec, base_key=base_key, config=config,
                mixup=stage.mixup)
        reporter.print(f'stage {stage.index + 1}/{len(stages)}: {stage.image_size} px, '
                       f'RandAugment {stage.randaug:.3g}, mixup {stage.mixup:.3g}, '
                       f'dropout {stage.dropout:.3g}, steps {stage.first_step}-{stage.last_step}')
        window, window_start, window_steps = [], time.time(), 0
        compiling = True  # the stage's first window includes compiling its step
        while step < stage.last_step:
            batch = next(data)
            skipped_train += int(batch.pop('skipped').sum())
            state, metrics = step_fn(state, trainer.global_batch(mesh, batch))
            step += 1
            window.append(metrics)
            window_steps += 1
            last_of_stage = step == stage.last_step
            if step % config.log_every == 0 or last_of_stage:
                metrics = {f'train/{k}': float(np.mean(v))
                           for k, v in jax.tree.map(lambda *xs: np.stack(xs),
                                                    *jax.device_get(window)).items()}
                seconds = time.time() - window_start
                rate = window_steps * config.batch_size / seconds
                if not compiling:
                    images_seen += window_steps * config.batch_size
                    train_seconds += seconds
                compiling = False
                reporter.write(step, {**metrics, 'train/images_per_second': rate,
                                      'stage': stage.index, 'image_size': stage.image_size,
                                      'epoch': step / steps_per_epoch})
                reporter.advance(window_steps, {
                        'loss': f'{metrics["train/loss"]:.3f}', 'lr': f'{metrics["train/lr"]:.2e}',
                        'img/s': f'{rate:.0f}'})
                window, window_start, window_steps = [], time.time(), 0
                if sigterm['stop'] or (jax.process_count() > 1
                                       and checkpoints.manager.reached_preemption(step)):
                    checkpoints.save(step, state, data, stage.index, config.num_workers)
                    checkpoints.wait()
                    reporter.close()
                    raise Preempted(f'SIGTERM: saved step {step} in {workdir}; run the same '
                                    'command to resume')
            if step % config.checkpoint_every == 0 or last_of_stage:
                checkpoints.save(step, state, data, stage.index, config.num_workers)
            if step % eval_every == 0 or step == total_steps:
                final_eval = run_eval(step)
                window_start = time.time()  # eval time is not training throughput
        data.close()  # stops its worker processes
    checkpoints.wait()
    checkpoints.close()
    reporter.close()
    if final_eval is None and eval_data is not None:
        final_eval = run_eval(step)

    saved = ('ema' if final_eval and config.ema_decay > 0
             and final_eval['ema/top1'] > final_eval['raw/top1'] else 'raw')
    weights = _save_weights(config, workdir, model, state, saved, spec, train_folder.class_names)
    plot = plot_curves(workdir) if jax.process_index() == 0 else None
    summary = {
            'best_top1': best['top1'], 'best_weights': best['weights'], 'best_step': best['step'],
            'final': final_eval, 'saved_weights': saved,
            'final_top1': final_eval[f'{saved}/top1'] if final_eval else None,
            'steps': step, 'seconds': time.time() - started,
            'images_per_second': images_seen / train_seconds if train_seconds else None,
            'skipped_images': skipped_train, 'weights': str(weights), 'plot': str(plot)}
    reporter.write(step, {'summary': summary})
    return summary


def _save_weights(config, workdir, model, state, which, spec, class_names) -> Path:
    """Writes the final raw or EMA weights (`which`) for `python -m convert`,
    `effnetv2_jax.load` and `--eval-only`."""
    params, batch_stats = ((state.ema_params, state.ema_batch_stats) if which == 'ema'
                           else (state.params, state.batch_stats))
    variables = jax.device_get({'params': params, 'batch_stats': batch_stats})
    path = workdir / WEIGHTS_FILE
    if jax.process_index() == 0:
        effnetv2_jax.save(path, variables, {
                'variant': model.variant.name, 'num_classes': model.num_classes,
                'padding': model.padding, 'bn_eps': model.bn_eps, 'source_layout': 'effnetv2-jax',
                'preprocessing': spec, 'class_names': list(class_names),
                'trained': {'weights': which, 'steps': int(state.step), 'init': config.init}})
    return path


def evaluate_checkpoint(config: TrainConfig) -> dict:
    """`--eval-only`: top-1/top-5/loss of `config.init` on `data_dir` (its val/ subfolder if it
    has one, else the whole class-folder tree)."""
    if not config.init:
        raise ConfigError('--eval-only needs --init WEIGHTS')
    data_dir = Path(_data_dir(config))
    folder = input_pipeline.scan_image_folder(
            data_dir / 'val' if (data_dir / 'val').is_dir() else data_dir)
    variables, metadata = _read_init(config.init)
    names = metadata.get('class_names') or [str(i) for i in range(metadata['num_classes'])]
    unknown = sorted(set(folder.class_names) - set(names))
    if unknown:
        raise input_pipeline.DataError(
                f'{folder.root}: classes {unknown[:5]} are not among the weights\' classes')
    folder = input_pipeline.ImageFolder(
            folder.root, folder.paths,
            np.array([names.index(folder.class_names[i]) for i in folder.labels], np.int32),
            tuple(names))
    model = build_model(metadata, dtype=jnp.dtype(config.dtype))
    spec = metadata.get('preprocessing') or _eval_spec(config, model.variant, None)
    if config.eval_image_size:
        spec = {**spec, 'size': config.eval_image_size}
    mesh = trainer.make_mesh()
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                               batch_stats=variables['batch_stats'], opt_state=(),
                               ema_params=variables['params'],
                               ema_batch_stats=variables['batch_stats'])
    state = jax.device_put(state, trainer.state_shardings(mesh, state))
    eval_fn = trainer.jit_eval_step(mesh, trainer.state_shardings(mesh, state), model=model,
                                    spec=spec, with_ema=False)
    dataset = input_pipeline.eval_dataset(
            folder, global_batch_size=config.batch_size, spec=spec,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_workers=config.num_workers)
    result = evaluate(eval_fn, state, dataset, mesh)
    return {'images': len(folder), 'top1': result['raw/top1'], 'top5': result['raw/top5'],
            'loss': result['raw/loss'], 'skipped_images': result['skipped']}
