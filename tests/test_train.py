"""`python -m train` in this process (one CPU device): schedule, configuration, the train state and
its EMA, convergence, fine-tuning, evaluation of a weights file, configuration and data errors.
Multi-device and multi-process behaviour: test_train_distributed.py."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import effnetv2_jax
from convert import torch_reference
from effnetv2_jax.model import abstract_variables
from helpers import assert_one_line_error, convert, snapshot
from train import input_pipeline, trainer
from train.__main__ import main as train_main
from train.config import PRESETS, TrainConfig, parse_args
from train.evaluation import evaluate
from train.progressive import make_stages
from train.report import Throughput, data_wait_warning
from train.trainer import StepConfig, make_optimizer

# A few steps at one image size: enough to exercise a code path, cheap to compile.
SHORT = ['--epochs', '0.2', '--num-stages', '1', '--log-every', '1', '--eval-every', '100']


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def assert_fails_with(capsys, message: str):
    """stderr is one line `error: ...` holding `message`, and nothing went to stdout."""
    captured = capsys.readouterr()
    assert message in assert_one_line_error(captured.err)
    assert captured.out == ''


def copy_digits(digits: str, split: str, digit: str, folder: Path, count: int):
    """The first `count` PNGs of `digits/<split>/<digit>` copied into `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for png in sorted((Path(digits) / split / digit).glob('*.png'))[:count]:
        (folder / png.name).write_bytes(png.read_bytes())


@pytest.mark.parametrize('preset, sizes, randaug, mixup', [
        ('imagenet-s', [171, 214, 257, 300], [6.25, 7.5, 8.75, 10], [0, 0, 0, 0]),
        ('imagenet-l', [192, 256, 320, 384], [8.75, 12.5, 16.25, 20], [0.125, 0.25, 0.375, 0.5]),
])
def test_progressive_stages_raise_size_and_regularisation_together(preset, sizes, randaug, mixup):
    config = parse_args(['--preset', preset])
    variant = effnetv2_jax.get_variant(config.variant)
    stages = make_stages(config, 1000, variant.train_size)
    assert [s.image_size for s in stages] == sizes
    assert [s.randaug for s in stages] == pytest.approx(randaug)
    assert [s.mixup for s in stages] == pytest.approx(mixup)
    assert stages[0].dropout < stages[-1].dropout == config.dropout
    assert [(s.first_step, s.last_step) for s in stages] == [
            (0, 250), (250, 500), (500, 750), (750, 1000)]


def test_command_line_flags_override_the_preset():
    config = parse_args(['--preset', 'imagenet-s', '--batch-size', '512', '--flip', 'false'])
    assert (config.variant, config.batch_size, config.flip) == ('s', 512, False)
    assert config.lr == pytest.approx(0.016 * 512 / 256)
    assert set(PRESETS['imagenet-s']) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_a_presets_workers_are_capped_at_the_cores_the_process_may_use(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    config = parse_args(['--preset', 'finetune', '--init', 'w.msgpack'])
    assert (PRESETS['finetune']['num_workers'], config.num_workers) == (4, 2)


def test_explicit_workers_are_honoured_beyond_the_cores(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    config = parse_args(['--preset', 'imagenet-s', '--num-workers', '8'])
    assert config.num_workers == 8


@pytest.mark.parametrize('args, message', [
        (['--flip', 'maybe'], "argument --flip: 'maybe' is not a boolean"),
        (['--batch-size', 'many'], "argument --batch-size: invalid int value: 'many'"),
        (['--batch-size', '0'], '--batch-size must be at least 1, got 0'),
        (['--optimizer', 'adam'], '--optimizer must be one of rmsprop, sgd, adamw'),
        (['--eval-only'], '--eval-only needs --init WEIGHTS'),
        (['--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
        (['--image-size', '-1'], '--image-size must be at least 0, got -1'),
        (['--num-stages', '0'], '--num-stages must be at least 1, got 0'),
        (['--epochs', '0'], '--epochs must be positive, got 0.0'),
        (['--min-scale', '2'], '--min-scale must be in (0, 1], got 2.0'),
        (['--ema-decay', '2'], '--ema-decay must be in [0, 1), got 2.0'),
        (['--base-lr', 'nan'], '--base-lr must be positive, got nan'),
        (['--warmup-epochs', '-1'], '--warmup-epochs must be at least 0, got -1.0'),
        (['--mixup', 'nan'], '--mixup must be at least 0, got nan'),
])
def test_configuration_mistake_is_a_one_line_error(capsys, args, message):
    assert train_main(args) == 2
    assert_fails_with(capsys, message)


def test_step_config_holds_what_the_step_reads_of_the_config_and_stage():
    config = dataclasses.replace(TrainConfig(), label_smoothing=0.2, cutmix=1.0, mixup=0.5,
                                 ema_decay=0.9, freeze_backbone=True)
    step_config = StepConfig.of(config, mixup=0.25)  # the stage's mixup, not the final one
    assert step_config == StepConfig(label_smoothing=0.2, mixup=0.25, cutmix=1.0,
                                     ema_decay=0.9, freeze_backbone=True)
    assert hash(step_config) == hash(StepConfig.of(config, mixup=0.25))  # jit can key on it


class TinyClassifier(nn.Module):
    """Global pooling, BatchNorm and a dense head: a model with params and BN statistics that
    compiles in a moment."""
    num_classes: int = 3

    @nn.compact
    def __call__(self, images, train: bool = False):
        features = nn.BatchNorm(use_running_average=not train)(images.mean((1, 2)))
        return nn.Dense(self.num_classes)(features)


def one_train_step(ema_decay: float):
    """(state before, state after) one `train_step` of `TinyClassifier` with this EMA decay."""
    model = TinyClassifier()
    variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    tx = optax.sgd(0.1)
    mesh = trainer.make_mesh()
    state = trainer.create_state(tx, variables, ema=ema_decay > 0)
    sharding = trainer.state_shardings(mesh, state)
    state = jax.device_put(state, sharding)
    before = jax.device_get(state)
    step = trainer.jit_train_step(
            mesh, sharding, model=model, tx=tx, schedule=optax.constant_schedule(0.1),
            spec={'mean': [0.5] * 3, 'std': [0.5] * 3}, base_key=jax.random.key(1),
            step_config=StepConfig(label_smoothing=0.1, mixup=0.0, cutmix=0.0,
                                   ema_decay=ema_decay, freeze_backbone=False))
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (4, 8, 8, 3), np.uint8),
             'label': rng.integers(0, 3, 4).astype(np.int32)}
    state, _ = step(state, trainer.global_batch(mesh, batch))
    return before, jax.device_get(state)


def test_state_without_ema_holds_no_second_copy_of_the_variables():
    before, after = one_train_step(ema_decay=0)
    for state in (before, after):
        assert state.ema is None
        assert list(state.weights()) == ['raw']
        assert len(jax.tree.leaves(state)) == 1 + sum(
                len(jax.tree.leaves(tree))
                for tree in (state.params, state.batch_stats, state.opt_state))


def test_ema_averages_params_and_statistics_with_tf_warm_up_of_the_decay():
    before, after = one_train_step(ema_decay=0.99)
    assert list(after.weights()) == ['raw', 'ema']
    decay = min(0.99, (1 + 0) / (10 + 0))  # step 0: TF's num_updates warm-up
    new = after.weights()['raw']
    jax.tree.map(lambda ema, old, x: np.testing.assert_allclose(
            ema, decay * old + (1 - decay) * x, rtol=1e-6), after.ema, before.ema, new)


@pytest.mark.parametrize('optimizer', ['rmsprop', 'sgd', 'adamw'])
def test_weight_decay_skips_batchnorm_and_biases(optimizer):
    config = dataclasses.replace(TrainConfig(), optimizer=optimizer, weight_decay=0.5)
    tx = make_optimizer(config, optax.constant_schedule(1.0))
    params = {'conv': {'kernel': np.ones((3, 3, 2, 2), np.float32)},
              'bn': {'scale': np.ones(2, np.float32), 'bias': np.ones(2, np.float32)}}
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert np.all(np.asarray(updates['conv']['kernel']) < 0)
    assert np.all(np.asarray(updates['bn']['scale']) == 0)
    assert np.all(np.asarray(updates['bn']['bias']) == 0)


def test_throughput_leaves_out_evaluation_time_and_the_compiling_window(monkeypatch):
    clock = iter([0.0,  # start of the stage
                  10.0,  # end of the first window (compiles): left out of the average
                  12.0, 20.0,  # an evaluation of 8 s inside the second window
                  22.0])  # end of the second window: 12 s, of which 4 s of training
    monkeypatch.setattr('train.report.time.time', lambda: next(clock))
    throughput = Throughput(batch_size=8)
    throughput.end_window(steps=1)
    with throughput.paused():
        pass
    assert throughput.end_window(steps=10)[0] == 10 * 8 / 4
    assert throughput.images_per_second == 10 * 8 / 4


def test_data_wait_is_the_fraction_of_window_time_spent_getting_batches(monkeypatch):
    clock = iter([0.0,  # start of the stage
                  1.0, 3.0,  # 2 s getting the first batch (the input pipeline starts) ...
                  10.0,  # ... of the first window's 10 s: left out of the run's fraction
                  11.0, 12.0, 14.0, 15.0,  # 1 s + 1 s getting batches ...
                  18.0])  # ... of the second window's 8 s
    monkeypatch.setattr('train.report.time.time', lambda: next(clock))
    throughput = Throughput(batch_size=8)
    with throughput.waiting_for_data():
        pass
    assert throughput.end_window(steps=1)[1] == 0.2
    for _ in range(2):
        with throughput.waiting_for_data():
            pass
    assert throughput.end_window(steps=2)[1] == 0.25
    assert throughput.data_wait == 0.25


def test_data_wait_over_ten_percent_warns_to_raise_the_number_of_workers():
    assert data_wait_warning(0.25, num_workers=2) == (
        'warning: the training loop waited for data 25% of the time (over 10%): the input '
        'pipeline is the bottleneck; raise --num-workers (now 2) to decode in more processes')
    assert data_wait_warning(0.10, num_workers=2) is None
    assert data_wait_warning(None, num_workers=0) is None  # no measured window


def test_metrics_log_the_fraction_of_each_window_spent_waiting_for_data(tmp_path, digits):
    workdir = tmp_path / 'run'
    assert train_main(['--data-dir', digits, '--workdir', str(workdir), *SHORT]) == 0
    rows = read_metrics(workdir)
    waits = [r['data_wait'] for r in rows if 'train/loss' in r]
    assert len(waits) == 3 and all(0 <= w <= 1 for w in waits)  # 0.2 epoch of 19 steps
    assert 0 <= rows[-1]['summary']['data_wait'] <= 1


def test_digits_default_reaches_90_percent(tmp_path, digits, capsys):
    """The README's main job: the default run, only its data and workdir placed for the test."""
    workdir = tmp_path / 'run'
    assert train_main(['--data-dir', digits, '--workdir', str(workdir)]) == 0
    summary = read_metrics(workdir)[-1]['summary']
    assert summary['final_top1'] >= 0.90, summary  # of the weights written to model.msgpack
    assert (workdir / 'curves.png').stat().st_size > 10_000
    assert 'done: 228 steps' in capsys.readouterr().out
    sizes = sorted({r['image_size'] for r in read_metrics(workdir) if 'image_size' in r})
    assert sizes == [26, 29, 32]
    result_args = ['--eval-only', '--init', str(workdir / 'model.msgpack'),
                   '--data-dir', f'{digits}/test']
    assert train_main(result_args) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result['images'] == 269 and result['top1'] >= 0.85, result


@pytest.fixture(scope='module')
def converted_b0(tmp_path_factory):
    """A 1000-class B0 converted from a randomized PyTorch B0 of WZMIAOMIAO's `model.py`."""
    directory = tmp_path_factory.mktemp('converted')
    torch_model = torch_reference.randomize_(torch_reference.create('b0', 1000), seed=3)
    convert(torch_model, directory, name='b0')
    return directory / 'b0.msgpack'


def final_variables(workdir):
    variables, metadata = effnetv2_jax.checkpoint.read(workdir / 'model.msgpack')
    return variables, metadata


def test_fine_tuning_starts_from_converted_weights_with_a_new_classifier(
        tmp_path, digits, converted_b0):
    workdir = tmp_path / 'run'
    assert train_main(['--data-dir', digits, '--workdir', str(workdir), '--init',
                       str(converted_b0), '--ema-decay', '0', '--base-lr', '1e-4', *SHORT]) == 0
    start, _ = effnetv2_jax.checkpoint.read(converted_b0)
    end, metadata = final_variables(workdir)
    assert metadata['num_classes'] == 10
    assert end['params']['classifier']['kernel'].shape == (1280, 10)
    stem_start, stem_end = start['params']['stem']['conv']['kernel'], end['params']['stem'][
            'conv']['kernel']
    assert not np.array_equal(stem_start, stem_end)  # trained ...
    np.testing.assert_allclose(stem_end, stem_start, atol=1e-2)  # ... from the converted weights


def test_frozen_backbone_changes_only_the_classifier(tmp_path, digits, converted_b0):
    workdir = tmp_path / 'run'
    assert train_main(['--data-dir', digits, '--workdir', str(workdir), '--init',
                       str(converted_b0), '--freeze-backbone', '--ema-decay', '0',
                       *SHORT]) == 0
    start, _ = effnetv2_jax.checkpoint.read(converted_b0)
    end, _ = final_variables(workdir)
    head = end['params'].pop('classifier')
    start['params'].pop('classifier')
    assert head['kernel'].shape == (1280, 10)
    jax.tree.map(np.testing.assert_array_equal, end['params'], start['params'])
    jax.tree.map(np.testing.assert_array_equal, end['batch_stats'], start['batch_stats'])


def test_eval_only_evaluates_the_weights_file_without_a_train_state(
        tmp_path, digits, converted_b0, capsys, monkeypatch):
    """`--eval-only` hands the file's variables to the eval step as they are: no train state
    (no optimizer state, no EMA copy) is built."""
    def no_train_state(*args, **kwargs):
        raise AssertionError('--eval-only built a TrainState')
    monkeypatch.setattr(trainer, 'TrainState', no_train_state)
    data = tmp_path / 'data'
    for label in ('3', '7'):
        copy_digits(digits, 'test', label, data / label, 4)
    assert train_main(['--eval-only', '--init', str(converted_b0), '--data-dir', str(data),
                       '--eval-image-size', '32', '--batch-size', '8']) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result['images'] == 8 and 0 <= result['top1'] <= result['top5'] <= 1, result
    assert np.isfinite(result['loss'])


def test_unreadable_images_are_counted_per_draw_and_left_out_of_validation(
        tmp_path, digits, capsys):
    data = tmp_path / 'data'
    copy_digits(digits, 'train', '3', data / 'train' / '3', 8)
    copy_digits(digits, 'train', '7', data / 'train' / '7', 7)
    (data / 'train' / '7' / 'broken.png').write_bytes(b'not an image')  # 16 training images
    for label in ('3', '7'):
        copy_digits(digits, 'val', label, data / 'val' / label, 3)
    (data / 'val' / '7' / 'broken.jpg').write_bytes(b'\xff\xd8\xff garbage')
    (data / 'val' / '3' / 'empty.png').write_bytes(b'')
    workdir = tmp_path / 'run'
    # 2 epochs of 16 images in 4 steps of 8, one validation at the end
    assert train_main(['--data-dir', str(data), '--workdir', str(workdir), '--batch-size', '8',
                       '--epochs', '2', '--num-stages', '1', '--eval-every', '2',
                       '--ema-decay', '0']) == 0
    out = capsys.readouterr().out
    summary = read_metrics(workdir)[-1]['summary']
    assert summary['steps'] == 4
    assert summary['skipped_images'] == 2  # the broken training image, drawn once per epoch
    assert '2 unreadable images skipped (each file once per epoch that drew it)' in out
    assert (summary['final']['images'], summary['final']['skipped_images']) == (6, 2)
    assert 'val top-1' in out and '(2 unreadable images skipped)' in out


@pytest.fixture(scope='module')
def answers_a(tmp_path_factory):
    """A B0 weights file for the classes ('a', 'b') at 32 px whose variables are all zero but the
    classifier's bias (1, 0): its logits are (1, 0) for any image, so it answers 'a' with a loss
    known in closed form."""
    model = effnetv2_jax.create_model('b0', num_classes=2)
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_variables(model))
    variables['params']['classifier']['bias'] = np.array([1.0, 0.0], np.float32)
    path = tmp_path_factory.mktemp('weights') / 'answers_a.msgpack'
    effnetv2_jax.save(path, variables, {
            'variant': 'b0', 'num_classes': 2, 'padding': model.padding, 'bn_eps': model.bn_eps,
            'source_layout': 'effnetv2-jax', 'class_names': ['a', 'b'],
            'preprocessing': {'size': 32, 'resize': 'shorter', 'crop_pct': 1.0,
                              'interpolation': 'bicubic', 'mean': [0.5] * 3, 'std': [0.5] * 3}})
    return path


def test_eval_only_denominators_leave_unreadable_images_out(tmp_path, digits, answers_a, capsys):
    data = tmp_path / 'data'
    copy_digits(digits, 'test', '3', data / 'a', 3)
    copy_digits(digits, 'test', '7', data / 'b', 5)
    (data / 'a' / 'broken.png').write_bytes(b'not an image')
    (data / 'a' / 'truncated.jpg').write_bytes(b'\xff\xd8\xff garbage')
    assert train_main(['--eval-only', '--init', str(answers_a), '--data-dir', str(data),
                       '--batch-size', '4']) == 0
    first, last = capsys.readouterr().out.splitlines()
    result = json.loads(last)
    assert (result['images'], result['skipped_images']) == (8, 2)
    # Counting the 2 unreadable 'a' images would give 5/10 (as answered) or 3/10.
    assert result['top1'] == 3 / 8 and result['top5'] == 1
    # Cross-entropy of logits (1, 0): log(1 + e^-1) for 'a', log(1 + e^1) for 'b'. rel 1e-6:
    # float32 losses summed over 8 images.
    loss = (3 * math.log1p(math.exp(-1)) + 5 * math.log1p(math.exp(1))) / 8
    assert result['loss'] == pytest.approx(loss, rel=1e-6)
    assert first.endswith('on 8 images (2 unreadable images skipped)'), first


def test_eval_only_without_a_readable_image_is_a_one_line_error(tmp_path, answers_a, capsys):
    data = tmp_path / 'data'
    (data / 'a').mkdir(parents=True)
    (data / 'a' / 'broken.png').write_bytes(b'not an image')
    (data / 'a' / 'empty.jpg').write_bytes(b'')
    assert train_main(['--eval-only', '--init', str(answers_a), '--data-dir', str(data)]) == 2
    assert_fails_with(capsys, f'none of the 2 images in {data} can be read')


@pytest.mark.parametrize('split', ['train', 'val'])
def test_training_without_a_readable_image_in_a_split_writes_nothing(
        tmp_path, digits, capsys, split):
    data = tmp_path / 'data'
    for part in ('train', 'val'):
        copy_digits(digits, part, '3', data / part / '3', 2)
    for png in (data / split / '3').iterdir():
        png.write_bytes(b'')
    workdir = tmp_path / 'run'
    assert train_main(['--data-dir', str(data), '--workdir', str(workdir)]) == 2
    assert_fails_with(capsys, f'none of the 2 images in {data / split} can be read')
    assert not workdir.exists()


def test_evaluation_without_a_readable_image_is_a_data_error(tmp_path):
    """Images that became unreadable after the run's first check still leave no 0 % result."""
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'gone.png').write_bytes(b'')
    folder = input_pipeline.scan_image_folder(str(tmp_path))
    model = TinyClassifier()
    weights = {'raw': jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))}
    mesh = trainer.make_mesh()
    spec = {'size': 8, 'resize': 'shorter', 'crop_pct': 1.0, 'interpolation': 'bilinear',
            'mean': [0.5] * 3, 'std': [0.5] * 3}
    eval_fn = trainer.jit_eval_step(mesh, trainer.state_shardings(mesh, weights), model=model,
                                    spec=spec)
    dataset = input_pipeline.eval_dataset(folder, global_batch_size=2, spec=spec)
    with pytest.raises(input_pipeline.DataError, match=r'no readable image to evaluate \(1 '):
        evaluate(eval_fn, weights, dataset, mesh)


def test_bfloat16_training_keeps_float32_parameters_and_statistics(tmp_path, digits):
    workdir = tmp_path / 'run'
    assert train_main(['--data-dir', digits, '--workdir', str(workdir), '--dtype', 'bfloat16',
                       *SHORT]) == 0
    variables, _ = final_variables(workdir)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
    assert dtypes == {np.dtype('float32')}
    losses = [r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r]
    assert np.all(np.isfinite(losses)) and len(losses) == 3  # 0.2 epoch of 19 steps


@pytest.mark.parametrize('make, message', [
        (lambda d: d / 'nowhere', 'not found'),
        (lambda d: (d / 'file').touch() or d / 'file', 'is a file, not a folder'),
        (lambda d: (d / 'empty').mkdir() or d / 'empty', 'no class subfolders'),
])
def test_bad_data_folder_is_a_one_line_error(tmp_path, capsys, make, message):
    assert train_main(['--data-dir', str(make(tmp_path)), '--workdir',
                       str(tmp_path / 'run')]) == 2
    assert_fails_with(capsys, message)


def workdir_is_a_file(tmp_path, digits, weights):
    (tmp_path / 'run').write_text('not a folder')
    return ['--data-dir', digits, '--workdir', str(tmp_path / 'run')]


def workdir_below_a_file(tmp_path, digits, weights):
    (tmp_path / 'file').write_text('not a folder')
    return ['--data-dir', digits, '--workdir', str(tmp_path / 'file' / 'run')]


def init_missing(tmp_path, digits, weights):
    return ['--data-dir', digits, '--workdir', str(tmp_path / 'run'), '--init',
            str(tmp_path / 'missing.msgpack')]


def init_corrupt(tmp_path, digits, weights):
    (tmp_path / 'corrupt.msgpack').write_bytes(weights.read_bytes()[:1000])
    return ['--data-dir', digits, '--workdir', str(tmp_path / 'run'), '--init',
            str(tmp_path / 'corrupt.msgpack')]


def eval_only_init_missing(tmp_path, digits, weights):
    return ['--eval-only', '--data-dir', f'{digits}/test', '--init', str(tmp_path / 'missing')]


def eval_only_other_classes(tmp_path, digits, weights):
    copy_digits(digits, 'test', '3', tmp_path / 'data' / '3', 1)
    return ['--eval-only', '--data-dir', str(tmp_path / 'data'), '--init', str(weights)]


@pytest.mark.parametrize('mistake, message', [
        (workdir_is_a_file, 'is a file, not a folder'),
        (workdir_below_a_file, 'Not a directory'),
        (init_missing, 'cannot read --init'),
        (init_corrupt, 'cannot read --init'),
        (eval_only_init_missing, 'cannot read --init'),
        (eval_only_other_classes, "classes ['3'] are not among the weights' classes"),
])
def test_user_mistake_is_a_one_line_error_and_writes_nothing(
        tmp_path, digits, answers_a, capsys, mistake, message):
    args = mistake(tmp_path, digits, answers_a)
    before = snapshot(tmp_path)
    assert train_main(args) == 2
    assert_fails_with(capsys, message)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(importlib.util.find_spec('tensorboardX') is not None,
                    reason='tensorboardX is installed')
def test_tensorboard_without_tensorboardx_is_a_one_line_error(tmp_path, digits, capsys):
    assert train_main(['--data-dir', digits, '--workdir', str(tmp_path / 'run'),
                       '--tensorboard']) == 2
    assert_fails_with(capsys, '--tensorboard needs `pip install tensorboardX`')


def test_read_only_workdir_is_a_one_line_error(tmp_path, digits, capsys, monkeypatch):
    workdir = tmp_path / 'run'
    workdir.mkdir(mode=0o555)
    real_access = os.access  # root may write into a read-only folder: answer as for a user
    monkeypatch.setattr(os, 'access', lambda path, mode: False if Path(path) == workdir
                        else real_access(path, mode))
    assert train_main(['--data-dir', digits, '--workdir', str(workdir)]) == 2
    assert_fails_with(capsys, 'is not writable')
    assert list(workdir.iterdir()) == []
