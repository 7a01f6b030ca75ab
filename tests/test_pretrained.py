"""Specification of pretrained weights by name: `hf-hub:`, `local-dir:` and `torchvision:`.

No test touches the network. A Hub repository is what timm's own Hub writer
(`timm.models._hub.save_for_hf`) makes of a timm model with random weights and randomized BatchNorm
statistics, placed in a temporary Hugging Face cache laid out as huggingface_hub lays out a
download (`models--timm--<tag>/refs/main`, `snapshots/<commit>/`), read with the Hub offline.
torchvision's weights are a randomized torchvision model saved in a temporary `$TORCH_HOME` under
the file name torchvision downloads to.

Logits: <= 1e-5 of max |logit| and the same top-1 (`helpers.assert_logits_close`), as every
PyTorch comparison here: float32 convolutions summed in another order differ by ~1e-6 relative,
and a wrong tensor, transpose, padding or eps is off by 1e-2 or more. Pixels: 1e-6 absolute on
normalised values (a float32 ulp at |x| <= 2.7 is 2.4e-7; one intensity level is >= 0.017).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from timm.models._hub import save_for_hf

import effnetv2_jax
import effnetv2_jax.hub
from convert.__main__ import main as convert_main
from convert.torch_reference import randomize_
from effnetv2_jax import pretrained
from effnetv2_jax import Predictor, checkpoint
from effnetv2_jax.predict import main as predict_main
from effnetv2_jax.transforms import eval_crops, normalize
from helpers import (assert_logits_close, assert_one_line_error, jitted_apply, photos,
                     torch_preprocess)

PIXEL_ATOL = 1e-6
COMMITS = ('1' * 40, '2' * 40)
TIMM_CROP_MODES = {'center': 'shorter', 'squash': 'squash'}


# --- a Hugging Face cache holding timm's files, read offline ------------------------------------

def publish(cache: Path, tag: str, seed: int = 0, commit: str = COMMITS[0],
            model_config: dict | None = None, calibration_size: int = 32) -> torch.nn.Module:
    """Writes timm's Hub files of `timm.create_model(tag)` (random weights and BN statistics,
    calibrated at `calibration_size`: logits stay O(1) near that size) into the Hugging Face cache
    `cache` as repository timm/<tag> at `commit`, which becomes `main`. Returns the timm model, in
    eval mode."""
    model = randomize_(timm.create_model(tag, pretrained=False), seed=seed,
                       calibration_size=calibration_size)
    repo = cache / f'models--timm--{tag}'
    save_for_hf(model, repo / 'snapshots' / commit, safe_serialization=True,
                model_config=model_config)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    return model


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, the Hub offline, and an empty converted-weights cache."""
    cache = tmp_path / 'hf'
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / 'converted'))
    return cache


def timm_pixels(config: dict, images) -> np.ndarray:
    """timm's eval transform resolved from a Hub config.json, as timm's validate.py resolves it."""
    data_config = timm.data.resolve_data_config({}, pretrained_cfg=config['pretrained_cfg'],
                                                use_test_size=True)
    return torch_preprocess(timm.data.create_transform(**data_config), images)


def hub_config(cache: Path, tag: str) -> dict:
    return json.loads(next((cache / f'models--timm--{tag}').glob('snapshots/*/config.json'))
                      .read_text())


def timm_logits(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()


# --- hf-hub: names -----------------------------------------------------------------------------

# One of each kind: ImageNet-1k at an even size (B0, 224), ImageNet-21k at 300 (75 after two
# stride-2 layers: odd), and an ImageNet-21k fine-tune (S at 384, squash-free 'center' crop_pct 1).
LOGIT_TAGS = ['tf_efficientnetv2_b0.in1k', 'tf_efficientnetv2_b3.in21k',
              'tf_efficientnetv2_s.in21k_ft_in1k']


@pytest.mark.parametrize('tag', LOGIT_TAGS)
def test_hub_name_gives_timms_logits_on_photos(hub, tag):
    size = timm.create_model(tag, pretrained=False).pretrained_cfg['test_input_size'][-1]
    model = publish(hub, tag, calibration_size=size)
    images = photos()[:2]
    expected = timm_logits(model, timm_pixels(hub_config(hub, tag), images))
    assert_logits_close(Predictor(f'hf-hub:timm/{tag}').logits(images), expected)


@pytest.mark.parametrize('tag', ['tf_efficientnetv2_b0.in1k',  # center crop, crop_pct 0.875
                                 'tf_efficientnetv2_b3.in21k_ft_in1k'])  # squash
def test_hub_preprocessing_is_timms_transform_from_the_same_config(hub, tag):
    publish(hub, tag)
    _, metadata = checkpoint.read(f'hf-hub:timm/{tag}')
    images = photos()
    ours = np.asarray(normalize(eval_crops(images, metadata['preprocessing']),
                                metadata['preprocessing']))
    np.testing.assert_allclose(ours, timm_pixels(hub_config(hub, tag), images), rtol=0,
                               atol=PIXEL_ATOL)


def test_hub_labels_are_the_configs_descriptions(hub):
    info = timm.data.ImageNetInfo('imagenet-21k')
    names = info.label_names()
    descriptions = {n: info.index_to_description(i) for i, n in enumerate(names)}
    publish(hub, 'tf_efficientnetv2_b3.in21k',
            model_config={'label_names': names, 'label_descriptions': descriptions})
    predictor = Predictor('hf-hub:timm/tf_efficientnetv2_b3.in21k')
    assert len(predictor.labels) == 21843
    assert predictor.labels[0] == descriptions[names[0]]
    assert predictor.labels == [descriptions[n] for n in names]


def test_hub_labels_fall_back_to_imagenet_names_without_label_names(hub):
    publish(hub, 'tf_efficientnetv2_b0.in1k')
    _, metadata = checkpoint.read('hf-hub:timm/tf_efficientnetv2_b0.in1k')
    assert 'class_names' not in metadata
    assert Predictor('hf-hub:timm/tf_efficientnetv2_b0.in1k').labels[281] == 'tabby'


def test_timm_reads_the_same_cache_positive_control(hub):
    # The cache is laid out as huggingface_hub lays out a download, or timm would not find it.
    model = publish(hub, 'tf_efficientnetv2_b0.in1k')
    from_cache = timm.create_model('hf-hub:timm/tf_efficientnetv2_b0.in1k', pretrained=True).eval()
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(timm_logits(from_cache, x), timm_logits(model, x))


def test_hub_load_never_imports_torch(hub, tmp_path):
    publish(hub, 'tf_efficientnetv2_b0.in1k')
    code = ("import sys, numpy as np, effnetv2_jax\n"
            "p = effnetv2_jax.Predictor('hf-hub:timm/tf_efficientnetv2_b0.in1k')\n"
            "p.predict(np.zeros((40, 50, 3), np.uint8))\n"
            "model, variables = effnetv2_jax.load('hf-hub:timm/tf_efficientnetv2_b0.in1k')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision',"
            " 'timm')))\n")
    env = {**os.environ, 'HF_HUB_CACHE': str(hub), 'HF_HUB_OFFLINE': '1',
           pretrained.CACHE_ENV: str(tmp_path / 'converted'), 'JAX_PLATFORMS': 'cpu',
           'EFFNETV2_JAX_CACHE_DIR': 'off'}
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'


def test_second_load_reads_the_converted_cache_not_the_hub_files(hub):
    publish(hub, 'tf_efficientnetv2_b0.in1k')
    first, _ = checkpoint.read('hf-hub:timm/tf_efficientnetv2_b0.in1k')
    for weights in hub.rglob('model.safetensors'):
        weights.unlink()
    second, metadata = checkpoint.read('hf-hub:timm/tf_efficientnetv2_b0.in1k')
    np.testing.assert_array_equal(second['params']['stem']['conv']['kernel'],
                                  first['params']['stem']['conv']['kernel'])
    assert metadata['source'] == f'hf-hub:timm/tf_efficientnetv2_b0.in1k@{COMMITS[0]}'


def test_hub_revision_pins_a_commit(hub):
    old = publish(hub, 'tf_efficientnetv2_b0.in1k', seed=0, commit=COMMITS[0])
    publish(hub, 'tf_efficientnetv2_b0.in1k', seed=1, commit=COMMITS[1])  # now main
    pinned, _ = checkpoint.read(f'hf-hub:timm/tf_efficientnetv2_b0.in1k@{COMMITS[0]}')
    main, _ = checkpoint.read('hf-hub:timm/tf_efficientnetv2_b0.in1k')
    kernel = lambda v: v['params']['stem']['conv']['kernel']
    np.testing.assert_array_equal(kernel(pinned),
                                  old.conv_stem.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert not np.array_equal(kernel(pinned), kernel(main))


# Every EfficientNetV2 tag timm publishes, except gc_efficientnetv2_rw_t (global-context
# attention in place of squeeze-excite: not a block this package builds).
TAGS = [t for t in timm.list_pretrained('*efficientnetv2*') if not t.startswith('gc_')]


@pytest.mark.slow
@pytest.mark.parametrize('tag', TAGS)
def test_every_timm_efficientnetv2_tag_loads(hub, tag):
    timm_model = publish(hub, tag)
    _, metadata = checkpoint.read(f'hf-hub:timm/{tag}')
    architecture = tag.split('.')[0]
    assert metadata['variant'] == architecture.split('efficientnetv2_')[1]
    assert metadata['num_classes'] == timm_model.num_classes
    assert metadata['padding'] == ('same' if architecture.startswith('tf_') else 'symmetric')
    assert metadata['bn_eps'] == timm_model.bn1.eps
    data_config = timm.data.resolve_data_config({}, model=timm_model, use_test_size=True)
    assert metadata['preprocessing'] == {
        'size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
        'resize': TIMM_CROP_MODES[data_config['crop_mode']],
        'interpolation': data_config['interpolation'],
        'mean': list(data_config['mean']), 'std': list(data_config['std'])}


def test_unknown_repository_is_one_line_error(hub):
    with pytest.raises(ValueError, match='not in the local Hugging Face cache'):
        checkpoint.read('hf-hub:timm/no_such_model')


def test_repository_of_another_model_is_one_line_error(hub):
    publish(hub, 'resnet18.a1_in1k')
    with pytest.raises(ValueError, match="architecture is 'resnet18', not an EfficientNetV2"):
        checkpoint.read('hf-hub:timm/resnet18.a1_in1k')


def test_global_context_variant_is_refused_with_the_reason(hub):
    publish(hub, 'gc_efficientnetv2_rw_t.agc_in1k')
    with pytest.raises(ValueError, match='gc_efficientnetv2_rw_t'):
        checkpoint.read('hf-hub:timm/gc_efficientnetv2_rw_t.agc_in1k')


def test_predict_cli_takes_a_hub_name(hub, tmp_path, capsys):
    publish(hub, 'tf_efficientnetv2_b0.in1k')
    image = tmp_path / 'cat.png'
    Image.fromarray(photos()[0]).save(image)
    assert predict_main([str(image), '--weights', 'hf-hub:timm/tf_efficientnetv2_b0.in1k',
                         '--json', '--top-k', '1']) == 0
    [result] = json.loads(capsys.readouterr().out)
    [expected] = Predictor('hf-hub:timm/tf_efficientnetv2_b0.in1k').predict(image, top_k=1)
    assert result['predictions'][0]['index'] == expected[0].index


def test_convert_cli_writes_a_hub_name_as_weights_file(hub, tmp_path, monkeypatch):
    publish(hub, 'tf_efficientnetv2_b0.in1k')
    monkeypatch.chdir(tmp_path)
    assert convert_main(['hf-hub:timm/tf_efficientnetv2_b0.in1k']) == 0
    variables, metadata = checkpoint.read(tmp_path / 'tf_efficientnetv2_b0.in1k.msgpack')
    expected, _ = checkpoint.read('hf-hub:timm/tf_efficientnetv2_b0.in1k')
    np.testing.assert_array_equal(variables['params']['classifier']['kernel'],
                                  expected['params']['classifier']['kernel'])
    assert metadata['source'].startswith('hf-hub:timm/tf_efficientnetv2_b0.in1k@')


def test_convert_cli_saves_a_name_in_timms_format_and_pushes_it(hub, tmp_path, monkeypatch):
    publish(hub, 'tf_efficientnetv2_b0.in1k')
    pushed = []
    monkeypatch.setattr(effnetv2_jax.hub, 'push_to_hub',
                        lambda folder, repo_id: pushed.append((folder, repo_id)) or 'url')
    assert convert_main(['hf-hub:timm/tf_efficientnetv2_b0.in1k', '--save-pretrained',
                         str(tmp_path / 'b0'), '--push-to-hub', 'me/b0']) == 0
    assert pushed == [(tmp_path / 'b0', 'me/b0')]
    saved, metadata = checkpoint.read(f'local-dir:{tmp_path / "b0"}')
    original, original_metadata = checkpoint.read('hf-hub:timm/tf_efficientnetv2_b0.in1k')
    jax.tree.map(np.testing.assert_array_equal, saved, original)
    assert metadata['preprocessing'] == original_metadata['preprocessing']


def test_failed_push_says_the_folder_was_written(hub, tmp_path, monkeypatch, capsys):
    publish(hub, 'tf_efficientnetv2_b0.in1k')

    def offline(folder, repo_id):
        raise huggingface_hub.errors.OfflineModeIsEnabled('Cannot reach the Hub: offline mode')
    monkeypatch.setattr(effnetv2_jax.hub, 'push_to_hub', offline)
    assert convert_main(['hf-hub:timm/tf_efficientnetv2_b0.in1k', '--save-pretrained',
                         str(tmp_path / 'b0'), '--push-to-hub', 'me/b0']) == 2
    assert 'was written, but the upload failed' in assert_one_line_error(capsys.readouterr().err)
    assert (tmp_path / 'b0' / 'model.safetensors').is_file()


@pytest.mark.parametrize('name', ['hf-hub:timm/no_such_model', 'torchvision:efficientnet_b0',
                                  'torchvision:efficientnet_v2_s:NO_SUCH_WEIGHTS', 'hf-hub:',
                                  'local-dir:/nonexistent'])
def test_bad_names_are_exit_2_and_one_line_in_the_clis(hub, tmp_path, monkeypatch, capsys, name):
    (tmp_path / 'work').mkdir()
    monkeypatch.chdir(tmp_path / 'work')
    assert convert_main([name]) == 2
    assert_one_line_error(capsys.readouterr().err)
    assert predict_main(['cat.png', '--weights', name]) == 2
    assert_one_line_error(capsys.readouterr().err)
    assert list((tmp_path / 'work').iterdir()) == []


# --- local-dir: names --------------------------------------------------------------------------

def test_local_dir_reads_timms_hub_folder(tmp_path):
    model = randomize_(timm.create_model('tf_efficientnetv2_b0', pretrained=False), seed=2)
    save_for_hf(model, tmp_path / 'b0', safe_serialization=True)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    flax_model, variables = effnetv2_jax.load(f'local-dir:{tmp_path / "b0"}')
    assert_logits_close(np.asarray(jitted_apply(flax_model)(variables, x)), timm_logits(model, x))


# --- torchvision: names ------------------------------------------------------------------------

@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty $TORCH_HOME and converted-weights cache."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / 'converted'))
    return tmp_path / 'torch'


def test_torchvision_name_gives_torchvisions_logits_and_categories(torch_home):
    weights = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1
    model = randomize_(torchvision.models.efficientnet_v2_s(), seed=4, calibration_size=384)
    checkpoints = torch_home / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoints / weights.url.rsplit('/', 1)[-1])
    images = photos()[:2]
    predictor = Predictor('torchvision:efficientnet_v2_s:IMAGENET1K_V1')
    expected = timm_logits(model, torch_preprocess(weights.transforms(), images))
    assert_logits_close(predictor.logits(images), expected)
    assert predictor.labels == weights.meta['categories']
