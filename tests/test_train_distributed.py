"""The sharded step and whole runs across devices and processes (subprocesses: the device count
is fixed when JAX starts), and preemption: SIGTERM to one process or to each of several."""
from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from helpers import assert_close_per_tensor
from train.run_checkpoints import RunCheckpoints

ROOT = Path(__file__).resolve().parents[1]
# 8 steps of 64 digits, 4 at 28 px then 4 at 32 px, checkpoints every 2: long enough to be
# interrupted mid-run. SGD, because runs that sum in another order are compared: Adam would turn
# the rounding noise of exactly-zero gradients into full-size steps of random sign.
RUN = ['--epochs', '0.45', '--num-stages', '2', '--log-every', '1', '--eval-every', '100',
       '--checkpoint-every', '2', '--optimizer', 'sgd', '--base-lr', '0.01',
       '--weight-decay', '1e-4']
# Runs that sum in another order differ in fp32 rounding, which no relative bound can accept
# where the exact value is 0: a block that reaches the loss only through 1x1 convolutions into
# train-mode BN (which cancels a per-channel shift), such as the first of stages 3-5 (no
# residual, so no drop path scaling the shift per image), gives the BN bias of its projection an
# exact gradient of 0; that bias stays 0, as do the batch means of the convolutions reading it.
# Both sides hold noise there, measured at most 2e-8 (in all the comparisons below), while every
# other tensor's largest value is at least 2e-6: hence an absolute 1e-7 beside each bound
# relative to the tensor's own largest value. Zeroing the smallest other tensor (a BN bias of
# 3e-6) exceeds that bound 30-fold.
NOISE_ATOL = 1e-7


def environment(devices: int) -> dict:
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
           'PYTHONPATH': str(ROOT)}
    env.pop('JAX_PLATFORMS', None)
    return env


def command(workdir, *args) -> list[str]:
    return [sys.executable, '-m', 'train', '--workdir', str(workdir), *args]


def train(workdir, *args, devices=1, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(command(workdir, *args), cwd=ROOT, env=environment(devices),
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_state(workdir) -> dict:
    """The train state of the run's last checkpoint (params, BN statistics, optimizer, EMA,
    step), as numpy arrays, whatever device count wrote it."""
    step = RunCheckpoints(workdir, keep=2).latest_step()
    path = Path(workdir).absolute() / 'checkpoints' / str(step) / 'state'
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        tree = getattr(getattr(metadata, 'item_metadata', metadata), 'tree', metadata)
        device = SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        return jax.device_get(checkpointer.restore(path, abstract))


def saved_step(output: str) -> int:
    """The step a preempted run says it saved."""
    return int(re.search(r'SIGTERM: saved step (\d+)', output).group(1))


SHARDED_STEP_CHECK = textwrap.dedent('''
    import dataclasses, pickle, sys, grain, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    import effnetv2_jax
    from train import trainer
    from train.config import TrainConfig
    from train.run_checkpoints import RunCheckpoints

    config = dataclasses.replace(TrainConfig(), optimizer='sgd', momentum=0.0, weight_decay=0.0,
                                 label_smoothing=0.1, mixup=0.4, cutmix=1.0, ema_decay=0.9)
    model = effnetv2_jax.create_model('b0', num_classes=10, dropout_rate=0.3)
    schedule = lambda step: 1.0  # updates = -gradients
    tx = trainer.make_optimizer(config, schedule)
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (16, 33, 33, 3), np.uint8),
             'label': rng.integers(0, 10, 16).astype(np.int32)}
    variables = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 33, 33, 3))))
    spec = {'mean': (0.5,) * 3, 'std': (0.5,) * 3}
    results = {}
    for devices in (8, 1):
        mesh = Mesh(np.asarray(jax.devices()[:devices]), ('data',))
        state = trainer.create_state(tx, variables, ema=True)
        sharding = trainer.state_shardings(mesh, state)
        state = jax.device_put(state, sharding)
        step = trainer.jit_train_step(
                mesh, sharding, model=model, tx=tx, schedule=schedule, spec=spec,
                base_key=jax.random.key(1),
                step_config=trainer.StepConfig.of(config, mixup=config.mixup))
        state, metrics = step(state, trainer.global_batch(mesh, batch))
        results[devices] = jax.device_get((state, metrics))
        assert len(jax.tree.leaves(state)[0].sharding.device_set) == devices
        if devices == 8:  # a checkpoint written from 8 devices ...
            checkpoints = RunCheckpoints(sys.argv[1], keep=1)
            checkpoints.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()),
                             stage=0)
            checkpoints.wait()
        else:  # ... restores bitwise onto 1
            abstract = jax.tree.map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                    sharding)
            restored = RunCheckpoints(sys.argv[1], keep=1).restore_state(1, abstract)
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), results[8][0])
            assert len(jax.tree.leaves(restored)[0].sharding.device_set) == 1

    moved = lambda state: {  # what the step changed (the updates), and the BN statistics
            'updates': jax.tree.map(lambda a, b: a - b, variables['params'], state.params),
            'ema': jax.tree.map(lambda a, b: a - b, variables['params'], state.ema['params']),
            'batch_stats': state.batch_stats}
    with open(f'{sys.argv[1]}/results.pickle', 'wb') as f:
        pickle.dump({devices: (moved(state), float(metrics['loss']))
                     for devices, (state, metrics) in results.items()}, f)
''')


def test_sharded_step_on_8_devices_equals_the_single_device_step(tmp_path):
    """One step (mixup/cutmix, dropout, drop path, BN in train mode, EMA) with the batch sharded
    over 8 fake CPU devices vs on 1. Only summation order differs (BN statistics and gradients
    are all-reduced): per tensor, fp32 agreement within 1e-4 (updates of the parameters and of
    their EMA; measured at most 1.7e-5) or 1e-5 (BN statistics; measured 1.6e-6) of its largest
    value, plus NOISE_ATOL. (The smallest updates are ~1e-4, and are computed as params - new
    params, which rounds by ~3e-8, an ulp of the params.) The 8-device state, checkpointed,
    restores bitwise onto 1 device."""
    result = subprocess.run([sys.executable, '-c', SHARDED_STEP_CHECK, str(tmp_path)], cwd=ROOT,
                            env=environment(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'results.pickle', 'rb') as f:
        (moved8, loss8), (moved1, loss1) = (results := pickle.load(f))[8], results[1]
    assert abs(loss8 - loss1) <= 1e-5
    assert_close_per_tensor(moved8['updates'], moved1['updates'], 1e-4, NOISE_ATOL)
    assert_close_per_tensor(moved8['ema'], moved1['ema'], 1e-4, NOISE_ATOL)
    assert_close_per_tensor(moved8['batch_stats'], moved1['batch_stats'], 1e-5, NOISE_ATOL)


def start_processes(workdir, args, logs) -> list[subprocess.Popen]:
    """The 2 processes of one run, 2 devices each, joined by jax.distributed on loopback (gloo
    collectives); the output of process i goes to `logs`/process-i.log."""
    port = portpicker.pick_unused_port()
    Path(logs).mkdir(parents=True, exist_ok=True)
    processes = []
    for i in range(2):
        with open(Path(logs) / f'process-{i}.log', 'w') as log:
            processes.append(subprocess.Popen(
                    command(workdir, *args, '--coordinator-address', f'127.0.0.1:{port}',
                            '--num-processes', '2', '--process-id', str(i)),
                    cwd=ROOT, env=environment(2), stdout=log, stderr=subprocess.STDOUT))
    return processes


def finish(processes, logs) -> list[tuple[int, str]]:
    """(exit status, output) of each process, once all have exited."""
    statuses = [p.wait(timeout=600) for p in processes]
    return [(status, (Path(logs) / f'process-{i}.log').read_text())
            for i, status in enumerate(statuses)]


# 4 steps, 2 at 28 px then 2 at 32 px. Compiling each stage's step costs most of a 2-process run:
# JAX's persistent cache holds process 0's compilations only, so process 1 compiles every time.
TWO_PROCESS_RUN = [*RUN, '--epochs', '0.25']


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, digits):
    """The workdir of an uninterrupted 2-process run."""
    workdir = tmp_path_factory.mktemp('two_processes')
    results = finish(start_processes(workdir, ['--data-dir', digits, *TWO_PROCESS_RUN], workdir),
                     workdir)
    assert [status for status, _ in results] == [0, 0], '\n'.join(
            f'process {i}: {output[-3000:]}' for i, (_, output) in enumerate(results))
    assert '2 process(es)' in results[0][1]
    return workdir


def test_two_processes_end_with_the_parameters_of_one_process(tmp_path, digits, two_processes):
    """Two processes x 2 devices joined by jax.distributed (gloo on loopback), each loading its
    half of every global batch, vs one process with 4 devices and the same global batches."""
    train(tmp_path, '--data-dir', digits, *TWO_PROCESS_RUN, devices=4)
    # Only the all-reduce (gloo between processes vs in-process) sums in another order. Measured
    # per tensor after the 4 steps, of its largest value: 2.8e-5 (momentum), 4.5e-6 (BN
    # statistics), 2e-8 (params, which the warmup's small learning rate has barely moved).
    assert_close_per_tensor(final_state(two_processes), final_state(tmp_path), 1e-4, NOISE_ATOL)


def test_sigterm_to_both_processes_stops_them_at_the_same_step_and_the_rerun_ends_bitwise_equal(
        tmp_path, digits, two_processes):
    """SIGTERM to both processes as they start training: JAX's preemption sync point stops them
    after the same step, which each saves (exit 143); the same command resumes there and ends
    bitwise equal to the uninterrupted run. With --log-every 100 the only log steps are the ends
    of the stages (2 and 4): a check at log steps only would never meet the sync point, one step
    past the furthest process."""
    args = ['--data-dir', digits, *TWO_PROCESS_RUN, '--log-every', '100']
    processes = start_processes(tmp_path / 'run', args, tmp_path)
    started = tmp_path / 'process-0.log'  # announces the first stage once both have joined
    deadline = time.time() + 600
    while ('stage 1/2' not in started.read_text() and time.time() < deadline
           and all(process.poll() is None for process in processes)):
        time.sleep(0.05)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    stopped = finish(processes, tmp_path)
    assert [status for status, _ in stopped] == [143, 143], stopped[0][1][-3000:]
    steps = {saved_step(output) for _, output in stopped}
    assert len(steps) == 1 and 1 <= (step := steps.pop()) < 4  # one step, before the end (4)
    assert RunCheckpoints(tmp_path / 'run', keep=2).latest_step() == step
    resumed = finish(start_processes(tmp_path / 'run', args, tmp_path), tmp_path)
    assert [status for status, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    assert f'resumed at step {step}' in resumed[0][1]
    jax.tree.map(np.testing.assert_array_equal, final_state(tmp_path / 'run'),
                 final_state(two_processes))


COUNT_CHECK = textwrap.dedent('''
    import sys, jax
    from train.__main__ import init_distributed
    from train.config import parse_args
    init_distributed(parse_args(sys.argv[1:]))
    from train.evaluation import total_over_processes
    print(total_over_processes(jax.process_index() + 1))
''')


def test_counts_of_unreadable_images_are_summed_over_processes():
    """What each process counts of its own rows (unreadable images) is reported as the total."""
    port = portpicker.pick_unused_port()
    processes = [subprocess.Popen(
            [sys.executable, '-c', COUNT_CHECK, '--coordinator-address', f'127.0.0.1:{port}',
             '--num-processes', '2', '--process-id', str(i)], cwd=ROOT, env=environment(1),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    # 1 + 2 on both (the last line: gloo prints its connections to stdout first)
    assert [out.split()[-1:] for out, _ in outputs] == [['3'], ['3']], outputs


def test_batch_size_not_a_multiple_of_the_devices_is_a_one_line_error(tmp_path, digits):
    result = train(tmp_path, '--data-dir', digits, '--batch-size', '12', devices=8, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert errors == ['error: --batch-size 12 is not a multiple of the 8 devices']
    assert 'Traceback' not in result.stderr


def interrupt(workdir, args, devices, after_step) -> subprocess.CompletedProcess:
    """Starts a run and sends it SIGTERM once it has logged `after_step`."""
    process = subprocess.Popen(command(workdir, *args), cwd=ROOT, env=environment(devices),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(workdir) / 'metrics.jsonl'
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and any(f'"step": {after_step},' in line
                                    for line in metrics.read_text().splitlines()):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, digits):
    workdir = tmp_path_factory.mktemp('uninterrupted')
    train(workdir, '--data-dir', digits, *RUN)
    return workdir


def test_sigterm_between_log_steps_saves_the_next_step_and_the_rerun_ends_bitwise_equal(
        tmp_path, digits, uninterrupted):
    """--log-every 100: the run logs only the ends of its stages (steps 4 and 8). SIGTERM once
    step 4 is logged: the run saves the next step (5, or a later one should the signal come
    after step 5 began, never 8, where a check at log steps only would have looked) and exits
    143; the same command resumes there and ends bitwise equal to an uninterrupted run."""
    args = ['--data-dir', digits, *RUN, '--log-every', '100']
    stopped = interrupt(tmp_path, args, devices=1, after_step=4)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert 4 < saved_step(stopped.stderr) < 8
    resumed = train(tmp_path, *args)
    assert f'resumed at step {saved_step(stopped.stderr)}' in resumed.stderr + resumed.stdout
    jax.tree.map(np.testing.assert_array_equal, final_state(tmp_path), final_state(uninterrupted))


def test_run_saved_on_8_devices_resumes_on_1(tmp_path, digits, uninterrupted):
    args = ['--data-dir', digits, *RUN]
    stopped = interrupt(tmp_path, args, devices=8, after_step=2)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = train(tmp_path, *args, devices=1)
    assert 'resumed at step' in resumed.stderr + resumed.stdout
    # Not bitwise: 8 devices sum BN statistics and gradients in another order, and a randomly
    # initialised net early in training amplifies that rounding some 2x per step (measured in a
    # run of 16 steps on 8 vs 1 device throughout, params per tensor: 2e-5 of its largest value
    # after 2 steps, 3e-4 after 8, 4e-2 after 16), hence a run of 8 steps. Measured here per
    # tensor: 5.6e-4 (momentum), 1.3e-4 (BN statistics), 1e-4 (params), 8e-5 (EMA); a wrong
    # tensor differs by ~1 of its own scale.
    assert_close_per_tensor(final_state(tmp_path), final_state(uninterrupted), 3e-3, NOISE_ATOL)
