"""A training run from data and model to the final weights file (`train_and_evaluate`), and the
evaluation of a weights file (`evaluate_weights`, `--eval-only`).

Resumable at any step: state, optimizer, EMA and the data iterator's position come back from the
workdir's newest checkpoint; the randomness of step s is fold_in(seed, s), so a resumed run ends
with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import effnetv2_jax
from effnetv2_jax import checkpoint, hub
from effnetv2_jax.files import check_apart, check_output
from effnetv2_jax.messages import first_few, first_line, write_failure
from effnetv2_jax.transforms import HALF_NORMALISATION
from train import input_pipeline, trainer
from train.config import ConfigError, TrainConfig, flag
from train.digits import materialize_digits
from train.evaluation import Validation, evaluate, total_over_processes
from train.progressive import ProgressiveStage, make_stages, stage_at
from train.report import WORKDIR_OUTPUTS, MetricsWindow, Reporter, Throughput, plot_curves
from train.run_checkpoints import DamagedCheckpoint, RunCheckpoints
from train.workdir import Workdir
from train.workdir import make as make_workdir

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

    def __init__(self, run_checkpoints: RunCheckpoints, first_step: int):
        self.run_checkpoints = run_checkpoints
        self.sigterm = False
        self.previous_handler = None
        if jax.process_count() == 1:
            self.previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        else:  # the step the run starts at, as the manager assumes 0, which a resumed run never
            # asks about: a SIGTERM before the first step then stops the run after it
            run_checkpoints.reached_preemption(first_step)

    def close(self):
        """SIGTERM is handled as before the run again."""
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
            self.previous_handler = None

    def _on_sigterm(self, *_):
        self.sigterm = True

    def requested(self, step: int) -> bool:
        """Whether to save `step` (just trained) and stop; every process gets the same answer."""
        return self.sigterm or (jax.process_count() > 1
                                and self.run_checkpoints.reached_preemption(step))


# What a run writes into its workdir besides checkpoints, and how a rerun recognises its own.
OUTPUTS = {**WORKDIR_OUTPUTS, WEIGHTS_FILE: checkpoint.OUTPUT_KINDS['msgpack']}

# Flags a resumed run keeps, with what of their value decides what the train state holds (the
# model, the optimizer's state, the EMA copy): a checkpoint saved with another one cannot be
# restored into this run, or would be restored into something else.
KEPT_ON_RESUME = {'variant': str, 'optimizer': str, 'ema_decay': lambda v: v > 0,
                  'freeze_backbone': bool, 'grad_clip': lambda v: v > 0}


def _check_workdir_apart(config: TrainConfig):
    """`OutputError` if the workdir is, contains or lies inside --data-dir or --init: the run
    writes its checkpoints and weights there (the digits it writes itself are no input)."""
    check_apart(config.workdir, [p for p in (config.data_dir, config.init) if p],
                what='--workdir')


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
        raise ConfigError(f'--save-pretrained: {first_line(e)}') from None


def _data_dir(config: TrainConfig, make_workdir: Callable[[], Path]) -> str:
    """--data-dir, else the digits, written under the workdir (`make_workdir()` makes it)."""
    if config.data_dir:
        return config.data_dir
    root = str(make_workdir() / 'digits')
    if jax.process_index() == 0:
        try:
            materialize_digits(root)
        except OSError as e:
            raise input_pipeline.DataError(f'cannot write the digits to {root}: '
                                           f'{write_failure(e)}') from None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('digits materialised')
    return root


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
        raise input_pipeline.DataError(f'cannot read --init {path}: {first_line(e)}') from None


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
    variables = checkpoint.fit_classifier(model, variables, jax.random.key(config.seed))
    return model, variables, metadata


def _init_variables(model, seed: int):
    variables = jax.jit(functools.partial(model.init, train=False))(
            jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32))
    return jax.device_get(variables)


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'{value:g}' if isinstance(value, float) else str(value)


def _check_same_run(config: TrainConfig, class_names, saved: dict | None):
    """`ConfigError` unless a checkpoint's `saved` run (None: saved before runs saved theirs)
    had this run's `KEPT_ON_RESUME` flags and classes."""
    if not saved:
        return
    advice = 'choose a new --workdir'
    for name, decisive in KEPT_ON_RESUME.items():
        now = getattr(config, name)
        before = saved['config'].get(name, now)
        if decisive(before) != decisive(now):
            before, now = _flag_value(before), _flag_value(now)
            raise ConfigError(f'workdir {config.workdir} was trained with {flag(name)} {before}; '
                              f'asked for {flag(name)} {now}: rerun with {flag(name)} {before} '
                              f'or {advice}')
    if saved['class_names'] != list(class_names):
        raise ConfigError(f'workdir {config.workdir} was trained on the classes '
                          f'{first_few(saved["class_names"], 5)}; the data has '
                          f'{first_few(class_names, 5)}: rerun with the data it was trained '
                          f'on or {advice}')


def _initial_state(config: TrainConfig, run_checkpoints: RunCheckpoints, mesh, model, tx,
                   variables, class_names
                   ) -> tuple[trainer.TrainState, trainer.TrainState, dict | None]:
    """(state, its shardings, the saved progress): the newest readable checkpoint's state placed
    on this mesh (whatever device count saved it), else a fresh one from `variables` (None:
    initialised from `config.seed`) with no progress. `ConfigError` for a checkpoint of another
    run (`_check_same_run`)."""
    abstract, state_sharding = trainer.abstract_state(mesh, tx, model, ema=config.ema_decay > 0)
    resumed = run_checkpoints.restore_latest(
            abstract, functools.partial(_check_same_run, config, class_names))
    if resumed is not None:
        state, progress = resumed
        return state, state_sharding, progress
    if variables is None:
        variables = _init_variables(model, config.seed)
    create = functools.partial(trainer.create_state, tx, ema=config.ema_decay > 0)
    return jax.jit(create, out_shardings=state_sharding)(variables), state_sharding, None


def _stage_batches(config: TrainConfig, folder, stage: ProgressiveStage, step: int,
                   saved_progress: dict | None, run_checkpoints: RunCheckpoints,
                   reporter: Reporter):
    """An iterator over the local batches of `stage` from `step`: at the saved iterator position
    when the resumed checkpoint was saved by this stage with the same process and worker layout
    (and that position can be read), else at the stream's position for `step` (a pure function
    of it)."""
    def batches(start_step: int):
        return iter(input_pipeline.train_dataset(
                folder, global_batch_size=config.batch_size, image_size=stage.image_size,
                randaug_layers=config.randaug_layers, randaug_magnitude=stage.randaug,
                seed=config.seed, stage=stage.index, process_index=jax.process_index(),
                process_count=jax.process_count(), num_workers=config.num_workers,
                min_scale=config.min_scale, flip=config.flip, start_step=start_step))

    if saved_progress == run_checkpoints.progress(step, stage.index):
        data = batches(stage.first_step)
        try:
            run_checkpoints.restore_iterator(step, data)
            return data
        except DamagedCheckpoint as e:
            data.close()
            reporter.warn(f'warning: the data position in checkpoint {step} of {config.workdir} '
                          f'cannot be read ({e}); the data stream goes on from the position of '
                          f'step {step}')
    return batches(step)


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
    'weights', ...}. Raises `ConfigError` for a configuration this machine cannot run or a
    workdir it may not use, `input_pipeline.DataError` for bad data, `files.OutputError` for an
    output that cannot be written, `Preempted` on SIGTERM."""
    _check_workdir_apart(config)
    _check_save_pretrained(config)
    with Workdir(config.workdir, OUTPUTS) as workdir, contextlib.ExitStack() as run:
        return _train(config, workdir, run)  # `run` ends before the workdir is released


def _train(config: TrainConfig, claimed: Workdir, run: contextlib.ExitStack) -> dict:
    """`train_and_evaluate` in `claimed`, whose resources `run` releases."""
    started = time.time()
    train_folder, val_folder = input_pipeline.find_splits(
            _data_dir(config, claimed.claim), config.val_split, config.seed)
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
    workdir = claimed.claim()  # once the data and --init are known to be usable
    run_checkpoints = run.enter_context(RunCheckpoints(
            workdir, config.keep_checkpoints, config.num_workers,
            run={'config': dataclasses.asdict(config),
                 'class_names': list(train_folder.class_names)}))
    state, state_sharding, saved_progress = _initial_state(
            config, run_checkpoints, mesh, model, tx, variables, train_folder.class_names)
    step = int(state.step)
    preemption = Preemption(run_checkpoints, step)
    run.callback(preemption.close)

    reporter = Reporter(workdir, total_steps, step, config.tensorboard)
    run.callback(reporter.close)  # before an error's line, which then starts a line of its own
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
        data = _stage_batches(config, train_folder, stage, step, saved_progress, run_checkpoints,
                              reporter)
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
    metadata = checkpoint.model_metadata(
            model, source_layout='effnetv2-jax', preprocessing=spec, class_names=list(class_names),
            trained={'weights': which, 'steps': int(state.step), 'init': config.init})
    path = Path(config.workdir) / WEIGHTS_FILE
    if jax.process_index() == 0:
        effnetv2_jax.save(path, variables, metadata)
        if config.save_pretrained:
            try:
                hub.save_pretrained(config.save_pretrained, variables, metadata)
            except OSError as e:  # changed since the run's start (_check_save_pretrained)
                raise ConfigError(f'--save-pretrained: {first_line(e)} (the weights are '
                                  f'in {path})') from None
    return path


def evaluate_weights(config: TrainConfig) -> dict:
    """`--eval-only`: {'top1', 'top5', 'loss', 'images', 'skipped_images'} of `config.init` on
    `data_dir` (its val/ subfolder if it has one, else the whole class-folder tree); the metrics
    are over the 'images' that could be read, 'skipped_images' counts the others."""
    if not config.init:
        raise ConfigError('--eval-only needs --init WEIGHTS')
    folder = input_pipeline.eval_split(_data_dir(config, lambda: make_workdir(config.workdir)))
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
