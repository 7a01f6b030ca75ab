"""Specification of the ONNX export, `effnetv2_jax.export.export_onnx` and
`python -m effnetv2_jax.export WEIGHTS --format onnx`.

Contract: the ONNX model maps input `images` float32 [B, S, S, 3] (normalised NHWC) to output
`logits` float32 [B, num_classes] (`features` [B, head channels] without a classifier) like
`model.apply(variables, images, train=False)`, for any B (a dynamic dimension) unless a batch size
was fixed, with the weights inside and the weights' metadata (eval transform, class names, input
spec) as metadata_props, each value JSON. onnxruntime runs it here on real photos, preprocessed
by the transform read from the file's own metadata.

The model is B0 with 10 classes and random variables, BatchNorm statistics included, so that the
logits depend on every variable (helpers.random_variables).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('jax2onnx')

import effnetv2_jax  # noqa: E402
from effnetv2_jax.export import ONNX_KIND, export_onnx, main  # noqa: E402
from effnetv2_jax.files import check_output  # noqa: E402
from effnetv2_jax.transforms import IMAGENET_NORMALISATION, preprocess  # noqa: E402
from helpers import (assert_logits_close, assert_one_line_error, jitted_apply, photos,  # noqa: E402
                     random_variables)

NUM_CLASSES = 10
METADATA = {'variant': 'b0', 'num_classes': NUM_CLASSES, 'padding': 'symmetric', 'bn_eps': 1e-3,
            'class_names': [f'class {i}' for i in range(NUM_CLASSES)]}
# onnxruntime's convolutions (MLAS, NCHW between transposes) and sigmoid sum and round in other
# orders than XLA:CPU's (and than this package's CPU paths for depthwise convs), so the logits
# differ in the last bits of float32. Measured max |Δ logit| / max |logit| on the four photos:
# <= 1.3e-6 at 64 and 63 px, batch 1 and 3, 3 seeds; helpers.LOGIT_RTOL (1e-5, ~8x that) bounds
# it, and top-1 must be equal.


def metadata_at(size: int) -> dict:
    spec = {'size': size, 'resize': 'shorter', 'crop_pct': 0.875, 'interpolation': 'bicubic',
            **IMAGENET_NORMALISATION}
    return {**METADATA, 'preprocessing': spec}


@pytest.fixture(scope='module')
def model():
    return effnetv2_jax.checkpoint.build_model(METADATA)


@pytest.fixture(scope='module')
def variables(model):
    return random_variables(model, jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope='module')
def expected(model, variables):
    """images -> the logits of `jax.jit(model.apply)`."""
    return lambda x: np.asarray(jitted_apply(model)(variables, x))


def session(model_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model_bytes, providers=['CPUExecutionProvider'])


def file_metadata(s: ort.InferenceSession) -> dict:
    return {k: json.loads(v) for k, v in s.get_modelmeta().custom_metadata_map.items()}


def run_cli(capsys, *argv):
    """`main(argv)` in process: returns (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope='module')
def cli_export(tmp_path_factory, variables):
    """`python -m effnetv2_jax.export b0.msgpack --format onnx` (in process, once; several tests
    read its output) on B0 weights whose eval transform crops 64 px: (folder, weights, model
    file, exit status, stdout, stderr)."""
    folder = tmp_path_factory.mktemp('cli')
    weights = folder / 'b0.msgpack'
    effnetv2_jax.save(weights, variables, metadata_at(64))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(weights), '--format', 'onnx'])
    return folder, weights, folder / 'b0.onnx', status, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def odd_size_model(model, variables):
    """export_onnx at 63 px (odd: every stride-2 conv pads asymmetrically) as bytes."""
    return export_onnx(model, variables, 63, metadata=metadata_at(63)).SerializeToString()


# --------------------------------------------------------------------------------------------
# onnxruntime against jax.jit(model.apply)


@pytest.mark.parametrize('source', ['cli-64px', 'export_onnx-63px'])
def test_onnx_model_reproduces_model_apply_on_photos_for_batch_1_and_3(
        request, source, expected):
    if source == 'cli-64px':
        model_bytes = request.getfixturevalue('cli_export')[2].read_bytes()
    else:
        model_bytes = request.getfixturevalue('odd_size_model')
    s = session(model_bytes)
    images = preprocess(photos(), file_metadata(s)['preprocessing'])
    for batch in (images[:1], images[1:]):  # one file, batch 1 then 3
        logits, = s.run(None, {'images': batch})
        assert logits.shape == (len(batch), NUM_CLASSES) and logits.dtype == np.float32
        assert_logits_close(logits, expected(batch))


def test_onnx_model_without_classifier_outputs_pooled_features(variables):
    backbone = effnetv2_jax.checkpoint.build_model({**METADATA, 'num_classes': 0})
    s = session(export_onnx(backbone, variables, 32).SerializeToString())
    assert [o.name for o in s.get_outputs()] == ['features']
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32)
    features, = s.run(None, {'images': images})
    assert features.shape == (2, backbone.variant.head_channels)
    assert_logits_close(features, np.asarray(jitted_apply(backbone)(variables, images)))


# --------------------------------------------------------------------------------------------
# the file: signature, metadata, producer


def test_signature_is_dynamic_batch_float32_images_to_float32_logits(cli_export):
    graph = onnx.load_model(cli_export[2]).graph

    def signature(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values]

    float32 = onnx.TensorProto.FLOAT
    assert signature(graph.input) == [('images', float32, ['B', 64, 64, 3])]
    assert signature(graph.output) == [('logits', float32, ['B', NUM_CLASSES])]
    assert not [i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]


def test_fixed_batch_size_is_a_static_dimension(model, variables):
    proto = export_onnx(model, variables, 32, batch_size=2)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 32, 32, 3]


def test_file_metadata_holds_the_weights_metadata_and_input_spec(cli_export):
    s = session(cli_export[2].read_bytes())
    info = file_metadata(s)
    assert {k: info[k] for k in metadata_at(64)} == metadata_at(64)
    assert (info['input_shape'], info['input_dtype'], info['output']) == (
        [None, 64, 64, 3], 'float32', 'logits')
    assert s.get_modelmeta().producer_name == 'effnetv2-jax'


# --------------------------------------------------------------------------------------------
# the command line


def test_cli_writes_only_the_onnx_file_and_says_so(cli_export):
    folder, weights, output, status, out, err = cli_export
    assert (status, err) == (0, '')
    assert sorted(p.name for p in folder.iterdir()) == ['b0.msgpack', 'b0.onnx']  # no sidecar
    assert f'{weights} -> {output}' in out and 'MB' in out and 'metadata_props' in out


def test_cli_on_garbage_weights_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path):
    weights = tmp_path / 'b0.msgpack'
    weights.write_bytes(b'\x93not a weights file' * 10)
    status, out, err = run_cli(capsys, weights, '--format', 'onnx')
    assert status == 2 and out == ''
    assert_one_line_error(err)
    assert [p.name for p in tmp_path.iterdir()] == ['b0.msgpack']


def test_cli_refuses_to_replace_a_file_that_is_not_its_onnx_model(capsys, cli_export, tmp_path):
    weights = cli_export[1]
    foreign = onnx.helper.make_model(onnx.helper.make_graph([], 'other', [], []),
                                     producer_name='someone else')
    for content in (b'my notes', foreign.SerializeToString()):
        output = tmp_path / 'model.onnx'
        output.write_bytes(content)
        status, out, err = run_cli(capsys, weights, '--format', 'onnx', '-o', output)
        assert status == 2 and 'not replacing it' in assert_one_line_error(err)
        assert output.read_bytes() == content


def test_its_own_onnx_model_is_replaceable(cli_export):
    check_output(cli_export[2], ONNX_KIND)  # no OutputError


def test_cli_without_jax2onnx_exits_2_naming_the_pip_command(capsys, monkeypatch, cli_export):
    monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # import jax2onnx raises ImportError
    status, out, err = run_cli(capsys, cli_export[1], '--format', 'onnx', '-o',
                               cli_export[0] / 'new.onnx')
    assert status == 2
    assert "pip install 'effnetv2-jax[onnx]'" in assert_one_line_error(err)
    assert not (cli_export[0] / 'new.onnx').exists()


def test_cli_platforms_flag_with_onnx_exits_2(capsys, cli_export):
    status, out, err = run_cli(capsys, cli_export[1], '--format', 'onnx', '--platforms', 'cpu')
    assert status == 2
    assert_one_line_error(err)
