"""Specification of inference for people: the eval transform each source expects, `Predictor`, and
`python -m effnetv2_jax.predict`.

The transform the converter stores is checked against the libraries' own declarations (torchvision's
`Weights.transforms()`, timm's pretrained config) and, on real photos, against their transforms'
tensors. Tolerance 1e-6 absolute on normalised pixels (|x| <= 2.7, where a float32 ulp is 2.4e-7):
a single pixel off by one intensity level differs by >= 1/255/0.229 = 0.017. Measured: 0.0.

Predictor and CLI tests use timm's tf_efficientnetv2_b0 with random weights, converted, and run at
64 px to stay fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torchvision
from PIL import Image

import effnetv2_jax
from helpers import (convert, photos, wzmiaomiao_transform, timm_transform, torch_preprocess,
                      torchvision_transform)
from effnetv2_jax import layouts
from convert.torch_reference import randomize_
from effnetv2_jax import Predictor, checkpoint
from effnetv2_jax.configs import OFFICIAL_VARIANTS, get_variant
from effnetv2_jax.predict import main
from effnetv2_jax.predictor import imagenet_class_names, read_labels
from effnetv2_jax.transforms import as_image_list, open_image

PIXEL_ATOL = 1e-6
SMALL = {'size': 64}  # the Predictor tests' crop size

TIMM_CROP_MODE = {'center': 'shorter', 'squash': 'squash'}


# --- the transform each source expects ---------------------------------------------------------

@pytest.mark.parametrize('variant', ['s', 'm', 'l'])
def test_torchvision_metadata_is_torchvisions_eval_transform(variant):
    transform = torchvision_transform(variant)
    spec = layouts.TORCHVISION.preprocessing(get_variant(variant), 'symmetric')
    assert spec['size'] == transform.crop_size[0]
    assert spec['resize'] == 'shorter'
    assert int(spec['size'] / spec['crop_pct']) == transform.resize_size[0]
    assert spec['interpolation'] == transform.interpolation.value
    assert (spec['mean'], spec['std']) == (list(transform.mean), list(transform.std))


TIMM_MODELS = ([(f'tf_efficientnetv2_{v}', v, 'same', 1000) for v in OFFICIAL_VARIANTS]
               + [(f'efficientnetv2_{v}', v, 'symmetric', 1000)
                  for v in ('s', 'm', 'l', 'xl', 'rw_t', 'rw_s', 'rw_m')]
               + [('tf_efficientnetv2_b3.in21k', 'b3', 'same', 21843)])


@pytest.mark.parametrize('name, variant, padding, num_classes', TIMM_MODELS,
                         ids=[m[0] for m in TIMM_MODELS])
def test_timm_metadata_is_timms_pretrained_config(name, variant, padding, num_classes):
    model = timm.create_model(name, pretrained=False)
    config = timm.data.resolve_data_config({}, model=model, use_test_size=True)
    spec = layouts.TIMM.preprocessing(get_variant(variant), padding, num_classes)
    assert spec['size'] == config['input_size'][1]
    assert spec['resize'] == TIMM_CROP_MODE[config['crop_mode']]
    assert spec['crop_pct'] == pytest.approx(config['crop_pct'])
    assert spec['interpolation'] == config['interpolation']
    assert (spec['mean'], spec['std']) == (list(config['mean']), list(config['std']))


PARITY = {  # source -> (the converter's spec, the library's own transform)
    'wzmiaomiao-s': (('wzmiaomiao', 's', 'symmetric'), lambda: wzmiaomiao_transform(384)),
    'torchvision-s': (('torchvision', 's', 'symmetric'), lambda: torchvision_transform('s')),
    'torchvision-l': (('torchvision', 'l', 'symmetric'), lambda: torchvision_transform('l')),
    'timm-tf-s': (('timm', 's', 'same'), lambda: timm_transform('tf_efficientnetv2_s')),
    'timm-tf-m': (('timm', 'm', 'same'), lambda: timm_transform('tf_efficientnetv2_m')),
    'timm-tf-b0': (('timm', 'b0', 'same'), lambda: timm_transform('tf_efficientnetv2_b0')),
    'timm-tf-b3': (('timm', 'b3', 'same'), lambda: timm_transform('tf_efficientnetv2_b3')),
    'timm-m': (('timm', 'm', 'symmetric'), lambda: timm_transform('efficientnetv2_m')),
}


@pytest.mark.parametrize('source', list(PARITY))
def test_preprocess_equals_the_sources_own_transform_on_real_photos(source, record_property):
    (layout, variant, padding), transform = PARITY[source]
    spec = layouts.get_layout(layout).preprocessing(get_variant(variant), padding)
    expected = torch_preprocess(transform(), photos())
    got = effnetv2_jax.preprocess(photos(), spec)
    assert got.shape == expected.shape == (4, spec['size'], spec['size'], 3)
    assert got.dtype == np.float32
    error = float(np.max(np.abs(got - expected)))
    record_property('pixel_error', error)
    assert error <= PIXEL_ATOL


def test_a_uint8_batch_is_a_list_of_images():
    batch = np.zeros((3, 8, 9, 3), np.uint8)
    assert len(as_image_list(batch)) == 3
    assert len(as_image_list(batch[0])) == 1


@pytest.mark.parametrize('array', [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8)])
def test_images_that_are_not_uint8_rgb_arrays_are_refused(array):
    with pytest.raises(ValueError, match='uint8'):
        open_image(array)


# --- Predictor ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """tf_efficientnetv2_b0, 1000 classes, random weights and BN statistics, converted."""
    directory = tmp_path_factory.mktemp('weights')
    module = randomize_(timm.create_model('tf_efficientnetv2_b0'), seed=3, calibration_size=64)
    convert(module, directory)
    return directory / 'ckpt.msgpack'


@pytest.fixture(scope='module')
def predictor(weights):
    return Predictor(weights, preprocessing=SMALL, compilation_cache=False)


@pytest.fixture(scope='module')
def photo_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp('photos')
    paths = [directory / f'{i}.png' for i in range(4)]
    for path, photo in zip(paths, photos()):
        Image.fromarray(photo).save(path)
    return paths


def test_predictor_takes_paths_pil_images_and_arrays_alike(predictor, photo_files):
    expected = predictor.logits(photos())
    np.testing.assert_array_equal(predictor.logits(photo_files), expected)
    mixed = [Image.open(photo_files[0]), photos()[1], str(photo_files[2]), photo_files[3]]
    np.testing.assert_array_equal(predictor.logits(mixed), expected)


def test_predictor_reads_the_eval_transform_from_the_weights(weights, predictor):
    _, metadata = checkpoint.read(weights)
    assert predictor.spec == {**metadata['preprocessing'], **SMALL}
    assert metadata['preprocessing']['crop_pct'] == 0.875


def test_predictor_logits_do_not_depend_on_the_batching(weights, predictor):
    one_at_a_time = Predictor(weights, preprocessing=SMALL, batch_size=1,
                              compilation_cache=False)
    in_threes = Predictor(weights, preprocessing=SMALL, batch_size=3, compilation_cache=False)
    expected = np.concatenate([one_at_a_time.logits(p) for p in photos()])
    np.testing.assert_allclose(in_threes.logits(photos()), expected, rtol=1e-5, atol=1e-5)


def test_predictions_are_the_top_k_probabilities_with_imagenet_labels(predictor):
    logits = predictor.logits(photos()[0])[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    top = predictor.predict(photos()[0], top_k=5)[0]
    assert [p.index for p in top] == list(np.argsort(-probabilities)[:5])
    for p in top:
        assert p.label == imagenet_class_names()[p.index]
        assert p.probability == pytest.approx(probabilities[p.index], rel=1e-6)


def test_imagenet_class_names_are_torchvisions():
    expected = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1.meta['categories']
    assert imagenet_class_names() == expected


@pytest.mark.parametrize('name, content', [
    ('labels.txt', 'daisy\ndandelion\nroses\n'),
    ('list.json', '["daisy", "dandelion", "roses"]'),
    ('class_indices.json', '{"0": "daisy", "1": "dandelion", "2": "roses"}'),  # WZMIAOMIAO's
    ('keras.json', '{"0": ["n1", "daisy"], "1": ["n2", "dandelion"], "2": ["n3", "roses"]}'),
])
def test_labels_files_in_common_formats(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert read_labels(tmp_path / name) == ['daisy', 'dandelion', 'roses']


def test_a_labels_file_that_is_not_a_list_is_a_clear_error(tmp_path):
    (tmp_path / 'labels.json').write_text('{"0": "daisy", "2": "roses"}')
    with pytest.raises(ValueError, match='cannot read labels'):
        read_labels(tmp_path / 'labels.json')


def _three_class_weights(weights, path, **metadata_changes):
    """`weights` cut down to 3 classes (the first three logits), saved with `metadata_changes`."""
    variables, metadata = checkpoint.read(weights)
    classifier = variables['params']['classifier']
    classifier['kernel'], classifier['bias'] = classifier['kernel'][:, :3], classifier['bias'][:3]
    effnetv2_jax.save(path, variables, {**metadata, 'num_classes': 3, **metadata_changes})
    return path


def test_trained_weights_bring_their_class_names(weights, tmp_path):
    path = _three_class_weights(weights, tmp_path / 'w.msgpack', class_names=['a', 'b', 'c'])
    predictor = Predictor(path, preprocessing=SMALL, compilation_cache=False)
    assert predictor.labels == ['a', 'b', 'c']


def test_labels_of_another_class_count_are_refused(weights, tmp_path):
    (tmp_path / 'labels.txt').write_text('a\nb\n')
    with pytest.raises(ValueError, match='2 labels for weights of 1000 classes'):
        Predictor(weights, labels=tmp_path / 'labels.txt', compilation_cache=False)


def test_other_class_counts_without_labels_are_labelled_by_index(weights, tmp_path):
    path = _three_class_weights(weights, tmp_path / 'w.msgpack')
    assert Predictor(path, compilation_cache=False).labels == ['0', '1', '2']


def test_weights_without_a_stored_transform_need_one(weights, tmp_path):
    variables, metadata = checkpoint.read(weights)
    del metadata['preprocessing']
    effnetv2_jax.save(tmp_path / 'w.msgpack', variables, metadata)
    with pytest.raises(ValueError, match='lacks'):
        Predictor(tmp_path / 'w.msgpack', compilation_cache=False)
    spec = layouts.TIMM.preprocessing(get_variant('b0'), 'same')
    assert Predictor(tmp_path / 'w.msgpack', preprocessing=spec, compilation_cache=False).spec \
        == spec


def test_weights_without_a_classifier_are_refused(weights, tmp_path):
    variables, metadata = checkpoint.read(weights)
    del variables['params']['classifier']
    effnetv2_jax.save(tmp_path / 'w.msgpack', variables, {**metadata, 'num_classes': 0})
    with pytest.raises(ValueError, match='no classifier'):
        Predictor(tmp_path / 'w.msgpack', compilation_cache=False)


@pytest.mark.parametrize('override, message', [
    ({'resize': 'stretch'}, 'resize'), ({'interpolation': 'lanczos9'}, 'interpolation'),
    ({'crop_pct': 1.5}, 'crop_pct'), ({'mean': [0.5]}, 'mean'), ({'size': 0}, 'size')])
def test_invalid_transform_overrides_are_refused(weights, override, message):
    with pytest.raises(ValueError, match=message):
        Predictor(weights, preprocessing=override, compilation_cache=False)


# --- python -m effnetv2_jax.predict ------------------------------------------------------------

def test_cli_prints_the_top_k_of_each_image(weights, photo_files, capsys):
    assert main([str(p) for p in photo_files[:2]] + ['--weights', str(weights), '--top-k', '3',
                                                     '--size', '64']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(photo_files[0]) and out[4] == str(photo_files[1])
    assert [line.split('.')[0].strip() for line in out[1:4]] == ['1', '2', '3']
    assert all(line.rstrip().endswith(')') and '%' in line for line in out[1:4] + out[5:8])


def test_cli_json_has_index_label_and_probability(weights, photo_files, predictor, capsys):
    assert main([str(photo_files[0]), '--weights', str(weights), '--json', '--size', '64']) == 0
    (result,) = json.loads(capsys.readouterr().out)
    expected = predictor.predict(photo_files[0])[0]
    assert result['image'] == str(photo_files[0])
    assert [p['index'] for p in result['predictions']] == [p.index for p in expected]
    assert result['predictions'][0]['label'] == expected[0].label
    assert result['predictions'][0]['probability'] == pytest.approx(expected[0].probability)


def _one_line_error(capsys, pattern):
    captured = capsys.readouterr()
    assert captured.out == ''
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith('error: ') and pattern in captured.err, captured.err


def test_cli_unreadable_image_is_a_one_line_error(weights, photo_files, tmp_path, capsys):
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    assert main([str(photo_files[0]), str(tmp_path / 'broken.jpg'),
                 '--weights', str(weights)]) == 2
    _one_line_error(capsys, 'broken.jpg')


def test_cli_missing_image_is_a_one_line_error(weights, tmp_path, capsys):
    assert main([str(tmp_path / 'missing.png'), '--weights', str(weights)]) == 2
    _one_line_error(capsys, 'missing.png')


def test_cli_pytorch_weights_get_a_hint_to_convert(photo_files, tmp_path, capsys):
    (tmp_path / 'model.pth').write_bytes(b'PK\x03\x04 a zip archive')
    assert main([str(photo_files[0]), '--weights', str(tmp_path / 'model.pth')]) == 2
    _one_line_error(capsys, 'python -m convert')


def test_cli_garbage_weights_are_a_one_line_error(photo_files, tmp_path, capsys):
    (tmp_path / 'w.msgpack').write_bytes(b'\x00garbage')
    assert main([str(photo_files[0]), '--weights', str(tmp_path / 'w.msgpack')]) == 2
    _one_line_error(capsys, 'w.msgpack')


def test_the_command_reuses_its_compilation_cache(weights, photo_files, tmp_path):
    """Two runs of the real command: the first fills the cache, the second adds nothing to it
    (every program came from the cache) and prints the same."""
    cache = tmp_path / 'xla'
    command = [sys.executable, '-m', 'effnetv2_jax.predict', str(photo_files[0]),
               '--weights', str(weights), '--size', '64']
    env = {**os.environ, 'EFFNETV2_JAX_CACHE_DIR': str(cache)}
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries
    second = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert second.stdout == first.stdout
    assert 'Warning' not in first.stderr + second.stderr
