"""A training run from data and model to the final weights file (`train_and_evaluate`), and the
evaluation of a weights file (`evaluate_weights`, `--eval-only`).

Resumable at any step: state, optimizer, EMA and the data iterator's position come back from the
workdir's newest checkpoint; the randomness of step s is fold_in(seed, s), so a resumed run ends
with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import effnetv2_jax
from convert import hub
from effnetv2_jax import checkpoint, cli
from effnetv2_jax.files import check_output
from effnetv2_jax.transforms import HALF_NORMALISATION
from train import input_pipeline, trainer
from train.config import ConfigError, TrainConfig
from train.digits import materialize_digits
from train.evaluation import Validation, evaluate, total_over_processes
from train.progressive import ProgressiveStage, make_stages, stage_at
from train.report import WORKDIR_OUTPUTS, MetricsWindow, Reporter, Throughput, plot_curves
from train.run_checkpoints import RunCheckpoints

WEIGHTS_FILE = 'model.msgpack'  # the final weights, in `python -m convert`'s format


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written and the run can resume."""


class Preemption:
    """Whether the run is to stop and save, asked after every step. A single process sets a flag
    on SIGTERM. Several processes must all stop at the same step: JAX's preemption sync manager
    (started by `jax.distributed.initialize`, with its own SIGTERM handler) tells every process
    of a SIGTERM to any of them and picks the step after the furthest one; it answers yes only
    when asked about exactly that step, hence the question at every step (measured: under 0.1 ms
    a question)."""

    def __init__(self, run_checkpoints: RunCheckpoints):
        self.run_checkpoints = run_checkpoints
        self.sigterm = False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        else:  # the step the run starts at, as the manager assumes 0, which a resumed run never
            # asks about: a SIGTERM before the first step then stops the run after it
            run_checkpoints.reached_preemption(run_checkpoints.latest_step() or 0)

    def _on_sigterm(self, *_):
        self.sigterm = True

    def requested(self, step: int) -> bool:
        """Whether to save `step` (just trained) and stop; every process gets the same answer."""
        return self.sigterm or (jax.process_count() > 1
                                and self.run_checkpoints.reached_preemption(step))


def _check_outputs(workdir: Path):
    """`ConfigError` now, rather than after the training, if a file the run will write into
    `workdir` exists and is not of its kind (files.check_output)."""
    outputs = {**WORKDIR_OUTPUTS, WEIGHTS_FILE: checkpoint.OUTPUT_KINDS['msgpack']}
    try:
        for name, kind in outputs.items():
            check_output(workdir / name, kind)
    except OSError as e:
        raise ConfigError(cli.first_line(e)) from None


def _check_save_pretrained(config: TrainConfig):
    """`ConfigError` now, rather than after the training, unless `--save-pretrained` may be
    written: a folder outside the workdir (which the run fills), not the data or the --init
    weights, absent or written by `save_pretrained` (files.check_output)."""
    if not config.save_pretrained:
        return
    folder, workdir = Path(config.save_pretrained).resolve(), Path(config.workdir).resolve()
    if folder == workdir or workdir in folder.parents or folder in workdir.parents:
        raise ConfigError(f'--save-pretrained {config.save_pretrained} is, holds or is inside '
                          f'the workdir {config.workdir}; choose a folder outside it')
    init = (config.init or '').removeprefix('local-dir:')
    inputs = [p for p in (config.data_dir, init) if p and not p.startswith(
            checkpoint.PRETRAINED_SCHEMES)]
    try:
        check_output(config.save_pretrained, hub.PRETRAINED_KIND, inputs)
    except OSError as e:
        raise ConfigError(f'--save-pretrained: {cli.first_line(e)}') from None


def _data_dir(config: TrainConfig) -> str:
    if config.data_dir:
        return config.data_dir
    workdir = _make_workdir(config)
    root = str(workdir / 'digits')
    if jax.process_index() == 0:
        try:
            materialize_digits(root)
        except OSError as e:
            raise input_pipeline.DataError(f'cannot write the digits to {root}: '
                                           f'{cli.first_line(e)}') from None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('digits materialised')
    return root


def _make_workdir(config: TrainConfig) -> Path:
    """The workdir, created if missing; `ConfigError` when it cannot be a writable folder or holds
    a file in the place of one the run writes (`_check_outputs`)."""
    workdir = Path(config.workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f'--workdir {workdir} is a file, not a folder') from None
    except OSError as e:
        raise ConfigError(f'--workdir {workdir}: {cli.first_line(e)}') from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(f'--workdir {workdir} is not writable')
    _check_outputs(workdir)
    return workdir


def _eval_spec(config: TrainConfig, variant, init_metadata: dict | None) -> dict:
    """Eval transform: resize the short side and center-crop; normalisation of the init weights
    (their source's), else mean = std = 0.5 (WZMIAOMIAO's train.py, the TF-trained weights)."""
    normalisation = (init_metadata or {}).get('preprocessing') or HALF_NORMALISATION
    return {'size': config.eval_image_size or variant.eval_size, 'resize': 'shorter',
            'crop_pct': 1.0, 'interpolation': 'bicubic',
            'mean': list(normalisation['mean']), 'std': list(normalisation['std'])}


def _read_init(path: str) -> tuple[dict, dict]:
    try:
        return checkpoint.read(path)
    except (OSError, ValueError) as e:
        raise input_pipeline.DataError(f'cannot read --init {path}: {cli.first_line(e)}') from None


def _model_and_variables(config: TrainConfig, num_classes: int):
    """(model, numpy variables or None, init metadata or None); a checkpoint of another class
    count keeps everything but the classifier, which is initialised afresh."""
    dtype = jnp.dtype(config.dtype)
    overrides = dict(num_classes=num_classes, drop_path_rate=config.drop_path_rate, dtype=dtype,
                     remat=config.remat)
    if not config.init:
        try:
            return effnetv2_jax.create_model(config.variant, **overrides), None, None
        except ValueError as e:  # an unknown variant, or a name that leaves the BN eps open
            raise ConfigError(f'--variant: {e}') from None
    variables, metadata = _read_init(config.init)
    model = checkpoint.build_model(metadata, **overrides)
    if metadata['num_classes'] != num_classes:
        fresh = _init_variables(model, config.seed)
        variables['params']['classifier'] = fresh['params']['classifier']
    return model, variables, metadata


def _init_variables(model, seed: int):
    variables = jax.jit(functools.partial(model.init, train=False))(
            jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32))
    return jax.device_get(variables)


def _initial_state(config: TrainConfig, run_checkpoints: RunCheckpoints, mesh, model, tx,
                   variables) -> tuple[trainer.TrainState, trainer.TrainState, dict | None]:
    """(state, its shardings, the saved progress): the newest checkpoint's state placed on this
    mesh (whatever device count saved it), else a fresh one from `variables` (None: initialised
    from `config.seed`) with no progress."""
    abstract, state_sharding = trainer.abstract_state(mesh, tx, model, ema=config.ema_decay > 0)
    resume_step = run_checkpoints.latest_step()
    if resume_step is not None:
        return (run_checkpoints.restore_state(resume_step, abstract), state_sharding,
                run_checkpoints.restore_progress(resume_step))
    if variables is None:
        variables = _init_variables(model, config.seed)
    create = functools.partial(trainer.create_state, tx, ema=config.ema_decay > 0)
    return jax.jit(create, out_shardings=state_sharding)(variables), state_sharding, None


def _stage_batches(config: TrainConfig, folder, stage: ProgressiveStage, step: int,
                   saved_progress: dict | None, run_checkpoints: RunCheckpoints):
    """An iterator over the local batches of `stage` from `step`: at the saved iterator position
    when the resumed checkpoint was saved by this stage with the same process and worker layout,
    else at the stream's position for `step` (a pure function of it)."""
    restore = saved_progress == run_checkpoints.progress(step, stage.index)
    data = iter(input_pipeline.train_dataset(
            folder, global_batch_size=config.batch_size, image_size=stage.image_size,
            randaug_layers=config.randaug_layers, randaug_magnitude=stage.randaug,
            seed=config.seed, stage=stage.index, process_index=jax.process_index(),
            process_count=jax.process_count(), num_workers=config.num_workers,
            min_scale=config.min_scale, flip=config.flip,
            start_step=stage.first_step if restore else step))
    if restore:
        run_checkpoints.restore_iterator(step, data)
    return data


def _log_window(reporter: Reporter, step: int, window: MetricsWindow, throughput: Throughput,
                stage: ProgressiveStage, steps_per_epoch: int):
    """Writes the window's averaged metrics and throughput, and advances the progress bar."""
    steps = len(window)
    metrics = window.pop_average()  # waits for the window's steps ...
    rate, data_wait = throughput.end_window(steps)  # ... before they are timed
    reporter.write(step, {**metrics, 'train/images_per_second': rate, 'data_wait': data_wait,
                          'stage': stage.index, 'image_size': stage.image_size,
                          'epoch': step / steps_per_epoch})
    reporter.advance(steps, {'loss': f'{metrics["train/loss"]:.3f}',
                             'lr': f'{metrics["train/lr"]:.2e}', 'img/s': f'{rate:.0f}',
                             'wait': f'{data_wait:.0%}'})


def train_and_evaluate(config: TrainConfig) -> dict:
    """Trains per `config`; returns the summary {'best_top1', 'seconds', 'images_per_second',
    'weights', ...}. Raises `ConfigError` for a configuration this machine cannot run,
    `input_pipeline.DataError` for bad data, `Preempted` on SIGTERM."""
    started = time.time()
    _check_save_pretrained(config)
    train_folder, val_folder = input_pipeline.find_splits(
            _data_dir(config), config.val_split, config.seed)
    for folder in (train_folder, val_folder):
        if folder is not None:
            input_pipeline.require_readable(folder)
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
    workdir = _make_workdir(config)  # once the data and --init are known to be usable
    run_checkpoints = RunCheckpoints(workdir, config.keep_checkpoints, config.num_workers)
    preemption = Preemption(run_checkpoints)
    state, state_sharding, saved_progress = _initial_state(
            config, run_checkpoints, mesh, model, tx, variables)
    step = int(state.step)

    reporter = Reporter(workdir, total_steps, step, config.tensorboard)
    reporter.print(
            f'{config.variant} on {config.data_dir or "digits"}: {len(train_folder)} train / '
            f'{len(val_folder) if val_folder else 0} val images, {num_classes} classes; '
            f'{jax.device_count()} {jax.devices()[0].platform} device(s) in '
            f'{jax.process_count()} process(es); {total_steps} steps of {config.batch_size}, '
            f'stages {[s.image_size for s in stages]} px; lr {config.lr:g}'
            + (f'; resumed at step {step}' if saved_progress is not None else ''))
    validation = Validation(
            trainer.jit_eval_step(mesh, state_sharding.weights(), model=model, spec=spec),
            None if val_folder is None else input_pipeline.eval_dataset(
                    val_folder, global_batch_size=config.batch_size, spec=spec,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    num_workers=config.num_workers),
            mesh, reporter)
    throughput = Throughput(config.batch_size)
    skipped_images, last_eval = 0, None

    for stage in stages[stages.index(stage_at(stages, step)):]:
        if step >= stage.last_step:
            continue
        data = _stage_batches(config, train_folder, stage, step, saved_progress, run_checkpoints)
        step_fn = trainer.jit_train_step(
                mesh, state_sharding, model=model.clone(dropout_rate=stage.dropout), tx=tx,
                schedule=schedule, spec=spec, base_key=jax.random.key(config.seed),
                step_config=trainer.StepConfig.of(config, mixup=stage.mixup),
                name=f'train step of stage {stage.index}')
        reporter.print(f'stage {stage.index + 1}/{len(stages)}: {stage.image_size} px, '
                       f'RandAugment {stage.randaug:.3g}, mixup {stage.mixup:.3g}, '
                       f'dropout {stage.dropout:.3g}, steps {stage.first_step}-{stage.last_step}')
        window = MetricsWindow()
        throughput.start_stage()  # its first window includes compiling the stage's step
        in_flight = previous = None  # outputs of the last two steps dispatched
        while step < stage.last_step:
            with throughput.waiting_for_data(previous):
                batch = next(data)
            skipped_images += int(batch.pop('skipped').sum())
            state, metrics = step_fn(state, trainer.global_batch(mesh, batch))
            step += 1
            window.add(metrics)
            previous, in_flight = in_flight, metrics
            last_of_stage = step == stage.last_step
            preempted = preemption.requested(step)
            if step % config.log_every == 0 or last_of_stage or preempted:
                _log_window(reporter, step, window, throughput, stage, steps_per_epoch)
            if preempted:
                run_checkpoints.save(step, state, data, stage.index)
                run_checkpoints.wait()
                reporter.close()
                raise Preempted(f'SIGTERM: saved step {step} in {workdir}; run the same '
                                'command to resume')
            if step % config.checkpoint_every == 0 or last_of_stage:
                run_checkpoints.save(step, state, data, stage.index)
            if step % eval_every == 0 or step == total_steps:
                with throughput.paused():
                    last_eval = validation(state, step)
        data.close()  # stops its worker processes
    run_checkpoints.wait()
    run_checkpoints.close()
    reporter.close()
    if last_eval is None:  # nothing left to train: the resumed run had finished
        last_eval = validation(state, step)

    saved = ('ema' if last_eval and 'ema/top1' in last_eval
             and last_eval['ema/top1'] > last_eval['raw/top1'] else 'raw')
    weights = _save_weights(config, model, state, saved, spec, train_folder.class_names)
    plot = plot_curves(workdir) if jax.process_index() == 0 else None
    best = validation.best
    summary = {
            'best_top1': best['top1'], 'best_weights': best['weights'], 'best_step': best['step'],
            'final': last_eval, 'saved_weights': saved,
            'final_top1': last_eval[f'{saved}/top1'] if last_eval else None,
            'steps': step, 'seconds': time.time() - started,
            'images_per_second': throughput.images_per_second,
            'data_wait': throughput.data_wait,
            'skipped_images': total_over_processes(skipped_images), 'weights': str(weights),
            'plot': str(plot)}
    reporter.write(step, {'summary': summary})
    return summary


def _save_weights(config, model, state, which: str, spec, class_names) -> Path:
    """Writes the final raw or EMA weights (`which`) into the workdir, for `python -m convert`,
    `effnetv2_jax.load` and `--eval-only`, and the same to `--save-pretrained` for timm and the
    Hub."""
    variables = jax.device_get(state.weights()[which])
    metadata = {'variant': model.variant.name, 'num_classes': model.num_classes,
                'padding': model.padding, 'bn_eps': model.bn_eps, 'source_layout': 'effnetv2-jax',
                'preprocessing': spec, 'class_names': list(class_names),
                'trained': {'weights': which, 'steps': int(state.step), 'init': config.init}}
    path = Path(config.workdir) / WEIGHTS_FILE
    if jax.process_index() == 0:
        effnetv2_jax.save(path, variables, metadata)
        if config.save_pretrained:
            try:
                hub.save_pretrained(variables, metadata, config.save_pretrained)
            except OSError as e:  # changed since the run's start (_check_save_pretrained)
                raise ConfigError(f'--save-pretrained: {cli.first_line(e)} (the weights are '
                                  f'in {path})') from None
    return path


def evaluate_weights(config: TrainConfig) -> dict:
    """`--eval-only`: {'top1', 'top5', 'loss', 'images', 'skipped_images'} of `config.init` on
    `data_dir` (its val/ subfolder if it has one, else the whole class-folder tree); the metrics
    are over the 'images' that could be read, 'skipped_images' counts the others."""
    if not config.init:
        raise ConfigError('--eval-only needs --init WEIGHTS')
    folder = input_pipeline.eval_split(_data_dir(config))
    input_pipeline.require_readable(folder)
    variables, metadata = _read_init(config.init)
    names = metadata.get('class_names') or [str(i) for i in range(metadata['num_classes'])]
    unknown = sorted(set(folder.class_names) - set(names))
    if unknown:
        raise input_pipeline.DataError(
                f'{folder.root}: classes {unknown[:5]} are not among the weights\' classes')
    folder = dataclasses.replace(
            folder, class_names=tuple(names),
            labels=np.array([names.index(folder.class_names[i]) for i in folder.labels], np.int32))
    model = checkpoint.build_model(metadata, dtype=jnp.dtype(config.dtype))
    spec = metadata.get('preprocessing') or _eval_spec(config, model.variant, None)
    if config.eval_image_size:
        spec = {**spec, 'size': config.eval_image_size}
    mesh = trainer.make_mesh()
    weights = {'raw': variables}
    weights_sharding = trainer.state_shardings(mesh, weights)
    eval_fn = trainer.jit_eval_step(mesh, weights_sharding, model=model, spec=spec)
    dataset = input_pipeline.eval_dataset(
            folder, global_batch_size=config.batch_size, spec=spec,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_workers=config.num_workers)
    result = evaluate(eval_fn, jax.device_put(weights, weights_sharding), dataset, mesh)
    return {'top1': result['raw/top1'], 'top5': result['raw/top5'], 'loss': result['raw/loss'],
            'images': result['images'], 'skipped_images': result['skipped_images']}
