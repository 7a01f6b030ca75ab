"""Specification of the serving export, `effnetv2_jax.export` and `python -m effnetv2_jax.export`.

Contract: the serialized artifact maps float32 [B, S, S, 3] normalised NHWC images to float32
[B, num_classes] logits like `model.apply(variables, images, train=False)`, for any B unless a
batch size was fixed, with the weights inside (nothing else to ship, no Flax needed to run it).
The CLI exits 0 having written OUT and OUT.json; 2 on bad input, with exactly one line
`error: ...` on stderr and nothing written (checked by listing tmp_path before and after).

The model is B0 at 64 px with 10 classes and random variables filled in from
`jax.eval_shape(model.init)` shapes (running the real initialisers compiles for ~10 s on CPU);
BatchNorm statistics are random too, so that the logits depend on every variable.
"""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effnetv2_jax
from helpers import random_variables, write_unchecked_weights
from effnetv2_jax.export import export, main

SIZE, NUM_CLASSES = 64, 10
METADATA = {'variant': 'b0', 'num_classes': NUM_CLASSES, 'padding': 'symmetric', 'bn_eps': 1e-3,
            'preprocessing': {'size': SIZE, 'mean': [0.5] * 3, 'std': [0.5] * 3}}
# The artifact is not bitwise equal to `jax.jit(model.apply)(variables, x)`: with the weights as
# constants XLA folds parts of the computation (e.g. BatchNorm's scale * rsqrt(var + eps)) at
# compile time and fuses differently. Measured max |Δ logit| / max |logit|: 3.2e-7 .. 5.8e-7
# (3 seeds x batch 1, 3, 8; ~3 ulp of the largest logit); the tolerance is ~10x that. (Against
# `jax.jit` of the same closure, i.e. weights as constants too, the artifact was bitwise equal.)
LOGIT_RTOL = 5e-6


def assert_logits_close(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape and got.dtype == np.float32
    error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    assert error <= LOGIT_RTOL, f'max |Δ logit| = {error:.2e} of max |logit|'


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, SIZE, SIZE, 3), np.float32)


@pytest.fixture(scope='module')
def model():
    return effnetv2_jax.checkpoint.build_model(METADATA)


@pytest.fixture(scope='module')
def variables(model):
    return random_variables(model, jnp.zeros((1, SIZE, SIZE, 3)))


@pytest.fixture(scope='module')
def expected(model, variables):
    """images -> the logits of `jax.jit(model.apply)` (one compiled function per batch size)."""
    apply = jax.jit(model.apply)
    return lambda x: apply(variables, x)


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory, variables):
    path = tmp_path_factory.mktemp('weights') / 'b0.msgpack'
    effnetv2_jax.save(path, variables, METADATA)
    return path


def run_cli(capsys, *argv):
    """`main(argv)` in process: returns (exit status, stdout, stderr lines)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


# --------------------------------------------------------------------------------------------
# export()


def test_symbolic_batch_artifact_reproduces_model_apply_for_two_batch_sizes(
        model, variables, expected):
    exported = jax.export.deserialize(export(model, variables, SIZE).serialize())
    (batch, *rest), = [a.shape for a in exported.in_avals]
    assert jax.export.is_symbolic_dim(batch) and rest == [SIZE, SIZE, 3]
    for b in (1, 3):
        assert_logits_close(exported.call(images(b, seed=b)), expected(images(b, seed=b)))


def test_signature_is_float32_images_to_float32_logits(model, variables):
    exported = export(model, variables, SIZE, batch_size=2)
    assert [(a.shape, a.dtype) for a in exported.in_avals] == [((2, SIZE, SIZE, 3), jnp.float32)]
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [((2, NUM_CLASSES), jnp.float32)]
    assert exported.platforms == (jax.export.default_export_platform(),)


def test_fixed_batch_size_artifact_rejects_another_batch_size(model, variables):
    exported = jax.export.deserialize(
        export(model, variables, SIZE, batch_size=2).serialize())
    with pytest.raises(ValueError, match='Shape mismatch'):
        exported.call(images(3))


def test_weights_are_constants_inside_the_module(model, variables):
    exported = export(model, variables, SIZE, batch_size=1)
    assert len(exported.in_avals) == 1  # the images only
    kernel = np.asarray(variables['params']['classifier']['kernel'])
    assert f'tensor<{"x".join(map(str, kernel.shape))}xf32>' in exported.mlir_module()


def test_artifact_for_cpu_cuda_and_tpu_lowers_here_and_runs_on_cpu(model, variables, expected):
    exported = jax.export.deserialize(
        export(model, variables, SIZE, platforms=('cpu', 'cuda', 'tpu')).serialize())
    assert exported.platforms == ('cpu', 'cuda', 'tpu')
    assert_logits_close(exported.call(images(3, seed=3)), expected(images(3, seed=3)))


@pytest.mark.parametrize('kwargs', [{'platforms': ('gpu',)}, {'platforms': ('cpu', 'cpu')},
                                    {'platforms': ()}, {'batch_size': 0}],
                         ids=['gpu-is-not-a-lowering-platform', 'duplicate', 'none', 'batch-0'])
def test_invalid_platforms_or_batch_size_raise_value_error(model, variables, kwargs):
    with pytest.raises(ValueError):
        export(model, variables, SIZE, **kwargs)


def test_artifact_runs_without_flax_or_this_package(tmp_path, model, variables, expected):
    artifact = tmp_path / 'b0.jaxexport'
    artifact.write_bytes(export(model, variables, SIZE).serialize())
    np.save(tmp_path / 'images.npy', images(2))
    script = ("import sys; sys.modules.update(flax=None, effnetv2_jax=None)\n"
              "import jax, numpy as np\n"
              f"exported = jax.export.deserialize(open({str(artifact)!r}, 'rb').read())\n"
              f"x = np.load({str(tmp_path / 'images.npy')!r})\n"
              f"np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(exported.call(x)))\n")
    subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path)
    assert_logits_close(np.load(tmp_path / 'logits.npy'), expected(images(2)))


# --------------------------------------------------------------------------------------------
# the command line


def test_cli_writes_artifact_and_sidecar_that_round_trip(capsys, tmp_path, variables, expected):
    weights = tmp_path / 'b0.msgpack'
    effnetv2_jax.save(weights, variables, METADATA)
    status, out, err = run_cli(capsys, weights)
    assert (status, err) == (0, [])
    artifact, sidecar = tmp_path / 'b0.jaxexport', tmp_path / 'b0.jaxexport.json'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (weights, artifact, sidecar))  # and no leftover temporary file
    assert str(artifact) in out and 'MB' in out
    info = json.loads(sidecar.read_text())
    assert info['input_shape'] == [None, SIZE, SIZE, 3]
    assert (info['input_dtype'], info['output'], info['platforms']) == ('float32', 'logits',
                                                                        ['cpu'])
    assert {k: info[k] for k in METADATA} == METADATA
    exported = jax.export.deserialize(artifact.read_bytes())
    assert_logits_close(exported.call(images(3, seed=3)), expected(images(3, seed=3)))


def test_cli_flags_set_output_batch_size_image_size_and_platforms(capsys, tmp_path, weights_file):
    output = tmp_path / 'model.bin'
    status, out, err = run_cli(capsys, weights_file, '-o', output, '--batch-size', 4,
                               '--image-size', 96, '--platforms', 'cpu,tpu')
    assert (status, err) == (0, [])
    info = json.loads((tmp_path / 'model.bin.json').read_text())
    assert (info['input_shape'], info['platforms']) == ([4, 96, 96, 3], ['cpu', 'tpu'])
    exported = jax.export.deserialize(output.read_bytes())
    assert exported.in_avals[0].shape == (4, 96, 96, 3) and exported.platforms == ('cpu', 'tpu')


def test_cli_image_size_defaults_to_variant_eval_size_without_preprocessing(
        capsys, tmp_path, variables):
    weights = tmp_path / 'b0.msgpack'
    effnetv2_jax.save(weights, variables, {k: v for k, v in METADATA.items()
                                           if k != 'preprocessing'})
    assert run_cli(capsys, weights)[0] == 0
    eval_size = effnetv2_jax.get_variant('b0').eval_size
    info = json.loads((tmp_path / 'b0.jaxexport.json').read_text())
    assert info['input_shape'] == [None, eval_size, eval_size, 3]


def test_cli_reads_orbax_weights(capsys, tmp_path, variables):
    weights = tmp_path / 'b0.orbax'
    effnetv2_jax.save(weights, variables, METADATA, fmt='orbax')
    assert run_cli(capsys, weights, '--batch-size', 1)[0] == 0
    exported = jax.export.deserialize((tmp_path / 'b0.jaxexport').read_bytes())
    assert exported.in_avals[0].shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize('content', [b'\x93not a weights file' * 10, None],
                         ids=['garbage', 'missing'])
def test_cli_on_garbage_or_missing_file_exits_2_with_one_line_and_writes_nothing(
        capsys, tmp_path, content):
    weights = tmp_path / 'b0.msgpack'
    if content is not None:
        weights.write_bytes(content)
    before = sorted(tmp_path.iterdir())
    status, out, err = run_cli(capsys, weights)
    assert status == 2 and len(err) == 1 and err[0].startswith('error: '), err
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize('flags', [
    ('--batch-size', '0'), ('--image-size', '0'), ('--platforms', 'gpu'),
    ('--platforms', 'cpu,,tpu'), ('-o', '{weights}')],
    ids=['batch-0', 'size-0', 'platform-gpu', 'empty-platform', 'output-is-input'])
def test_cli_bad_flags_exit_2_with_one_line_and_write_nothing(capsys, tmp_path, variables, flags):
    weights = tmp_path / 'b0.msgpack'
    effnetv2_jax.save(weights, variables, METADATA)
    status, out, err = run_cli(capsys, weights, *(f.format(weights=weights) for f in flags))
    assert status == 2 and len(err) == 1 and err[0].startswith('error: '), err
    assert [p.name for p in tmp_path.iterdir()] == ['b0.msgpack']


def test_cli_on_weights_that_do_not_fit_their_metadata_exits_2(capsys, tmp_path, variables):
    weights = tmp_path / 'b0.msgpack'
    write_unchecked_weights(weights, variables, {**METADATA, 'variant': 'b1'})  # b0 shapes
    status, out, err = run_cli(capsys, weights)
    assert status == 2 and len(err) == 1 and 'not a valid effnetv2-jax weights file' in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ['b0.msgpack']
