"""`python -m train` in this process (one CPU device): schedule, configuration, the train state and
its EMA, convergence, fine-tuning, evaluation of a weights file, configuration and data errors.
Multi-device and multi-process behaviour: test_train_distributed.py."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import effnetv2_jax
from convert import torch_reference
from helpers import convert
from train import trainer
from train.__main__ import main as train_main
from train.config import PRESETS, TrainConfig, parse_args
from train.progressive import make_stages
from train.report import Throughput
from train.trainer import StepConfig, make_optimizer

# A few steps at one image size: enough to exercise a code path, cheap to compile.
SHORT = ['--epochs', '0.2', '--num-stages', '1', '--log-every', '1', '--eval-every', '100']


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


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


@pytest.mark.parametrize('args, message', [
        (['--flip', 'maybe'], "argument --flip: 'maybe' is not a boolean"),
        (['--batch-size', 'many'], "argument --batch-size: invalid int value: 'many'"),
        (['--batch-size', '0'], '--batch-size must be at least 1, got 0'),
        (['--optimizer', 'adam'], '--optimizer must be one of rmsprop, sgd, adamw'),
        (['--eval-only'], '--eval-only needs --init WEIGHTS'),
        (['--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
])
def test_configuration_mistake_is_a_one_line_error(capsys, args, message):
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and message in err and '\n' not in err, err


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
    assert throughput.end_window(steps=10) == 10 * 8 / 4
    assert throughput.images_per_second == 10 * 8 / 4


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
        (data / label).mkdir(parents=True)
        for png in sorted((Path(digits) / 'test' / label).glob('*.png'))[:4]:
            (data / label / png.name).write_bytes(png.read_bytes())
    assert train_main(['--eval-only', '--init', str(converted_b0), '--data-dir', str(data),
                       '--eval-image-size', '32', '--batch-size', '8']) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result['images'] == 8 and 0 <= result['top1'] <= result['top5'] <= 1, result
    assert np.isfinite(result['loss'])


def test_corrupt_image_is_skipped_and_counted(tmp_path, digits, capsys):
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        for label in ('3', '7'):
            (data / split / label).mkdir(parents=True)
            for png in sorted((Path(digits) / split / label).glob('*.png'))[:40]:
                (data / split / label / png.name).write_bytes(png.read_bytes())
    (data / 'train' / '3' / 'broken.png').write_bytes(b'not an image')
    (data / 'val' / '7' / 'broken.jpg').write_bytes(b'\xff\xd8\xff garbage')
    workdir = tmp_path / 'run'
    assert train_main(['--data-dir', str(data), '--workdir', str(workdir), '--batch-size', '16',
                       '--epochs', '1', '--num-stages', '1', '--eval-every', '1']) == 0
    out = capsys.readouterr().out
    summary = read_metrics(workdir)[-1]['summary']
    assert summary['skipped_images'] >= 1
    assert 'unreadable images skipped' in out
    assert summary['final']['skipped'] == 1  # the broken val image, masked out of the metrics


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
        (lambda d: (d / 'empty').mkdir() or d / 'empty', 'no class subfolders'),
])
def test_bad_data_folder_is_a_one_line_error(tmp_path, capsys, make, message):
    assert train_main(['--data-dir', str(make(tmp_path)), '--workdir',
                       str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and message in err and '\n' not in err
