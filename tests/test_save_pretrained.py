"""`effnetv2_jax.save_pretrained` and `push_to_hub`: a folder in timm's Hub format that timm loads
to the same model, eval transform and class names, and that `local-dir:` reads back bitwise;
written atomically over nothing but its own kind; uploaded in one commit (huggingface_hub's HfApi
replaced: no network). And `python -m train --save-pretrained`."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
import safetensors.numpy
import timm
import torch

import effnetv2_jax
from effnetv2_jax import hub
from effnetv2_jax import checkpoint
from effnetv2_jax.files import OutputError
from effnetv2_jax.transforms import HALF_NORMALISATION, IMAGENET_NORMALISATION, preprocess
from helpers import (SMALL_METADATA, assert_logits_close, assert_one_line_error, jitted_apply,
                     photos, random_variables, snapshot, torch_logits)
from train.__main__ import main as train_main

# name -> (metadata, the config.json's architecture and model_args). 64 px keeps each forward a
# few seconds on 2 CPU cores; the stride-2 convs then see even sizes, which TensorFlow's 'same'
# pads on the bottom/right only and symmetric padding on both sides: a mix-up shows.
CASES = {
    # timm's tf_* weights re-published: TensorFlow's 'same' padding, BN eps 1e-3, ImageNet classes
    'same-b0': ({'variant': 'b0', 'num_classes': 1000, 'padding': 'same', 'bn_eps': 1e-3,
                 'preprocessing': {'size': 64, 'resize': 'shorter', 'crop_pct': 0.875,
                                   'interpolation': 'bicubic', **IMAGENET_NORMALISATION}},
                'tf_efficientnetv2_b0', {'num_classes': 1000, 'bn_eps': 1e-3}),
    # WZMIAOMIAO's layout: symmetric padding, its BN eps 1e-3 (timm's efficientnetv2_s has 1e-5)
    # and its predict.py's transform
    'symmetric-s': ({'variant': 's', 'num_classes': 5, 'padding': 'symmetric', 'bn_eps': 1e-3,
                     'preprocessing': {'size': 64, 'resize': 'shorter', 'crop_pct': 1.0,
                                       'interpolation': 'bilinear', **HALF_NORMALISATION}},
                    'efficientnetv2_s', {'num_classes': 5, 'bn_eps': 1e-3}),
    # fine-tuned on a few classes; timm has a symmetric B0 only as tf_efficientnetv2_b0
    'fine-tuned-b0': ({**SMALL_METADATA, 'class_names': ['cat', 'coffee', 'rocket'],
                       'preprocessing': {'size': 64, 'resize': 'squash', 'crop_pct': 0.9,
                                         'interpolation': 'bilinear', **HALF_NORMALISATION}},
                      'tf_efficientnetv2_b0', {'num_classes': 3, 'bn_eps': 1e-3, 'pad_type': ''}),
}


def write_case(name: str, folder, small_variables) -> tuple:
    """(folder, variables, metadata) of CASES[name], written there by save_pretrained."""
    metadata = CASES[name][0]
    if name == 'fine-tuned-b0':
        variables = small_variables
    else:
        model = checkpoint.build_model(metadata)
        variables = jax.device_get(random_variables(model, np.zeros((1, 32, 32, 3), np.float32)))
    assert effnetv2_jax.save_pretrained(folder, variables, metadata) == folder
    return folder, variables, metadata


@pytest.fixture(scope='module', params=list(CASES))
def saved(request, tmp_path_factory, small_variables):
    folder = tmp_path_factory.mktemp(request.param) / 'pretrained'
    return write_case(request.param, folder, small_variables)


@pytest.fixture(scope='module')
def fine_tuned(tmp_path_factory, small_variables):
    folder = tmp_path_factory.mktemp('fine-tuned') / 'pretrained'
    return write_case('fine-tuned-b0', folder, small_variables)


def timm_model(folder) -> torch.nn.Module:
    return timm.create_model(f'local-dir:{folder}', pretrained=True).eval()


def test_timm_loads_the_folder_to_the_same_logits(saved):
    """Same photos, same preprocessed input: the forwards differ only in summation order
    (float32, XLA vs PyTorch kernels). Measured 7e-7 to 9e-7 of max |logit|; the bound is
    helpers.LOGIT_RTOL, 1e-5, as for every conversion, with equal top-1."""
    folder, variables, metadata = saved
    images = preprocess(photos(), metadata['preprocessing'])
    ours = np.asarray(jitted_apply(checkpoint.build_model(metadata))(variables, images))
    assert_logits_close(torch_logits(timm_model(folder), images), ours)


@pytest.mark.parametrize('variant, padding, bn_eps, architecture, extra_args', [
    ('b0', 'same', 1e-3, 'tf_efficientnetv2_b0', {}),
    ('s', 'same', 1e-5, 'tf_efficientnetv2_s', {}),
    ('s', 'symmetric', 1e-5, 'efficientnetv2_s', {}),
    ('s', 'symmetric', 1e-3, 'efficientnetv2_s', {}),
    # timm has no symmetric B0-B3 but its tf_ ones take pad_type '' (symmetric)
    ('b0', 'symmetric', 1e-3, 'tf_efficientnetv2_b0', {'pad_type': ''}),
    ('b3', 'symmetric', 1e-5, 'tf_efficientnetv2_b3', {'pad_type': ''}),
])
def test_config_names_a_timm_model_with_the_same_padding_and_bn_eps(
        variant, padding, bn_eps, architecture, extra_args):
    config = hub.config({'variant': variant, 'num_classes': 7, 'padding': padding,
                         'bn_eps': bn_eps})
    assert config['architecture'] == architecture
    assert config['model_args'] == {'num_classes': 7, 'bn_eps': bn_eps, **extra_args}
    model = timm.create_model(architecture, **config['model_args'])
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {bn_eps}
    # timm pads stride-2 convs with Conv2dSame for 'same', with the conv's own padding otherwise
    assert (type(model.conv_stem).__name__ == 'Conv2dSame') == (padding == 'same')
    assert hub.architecture(config) == (variant, padding, bn_eps)  # and reads back


def test_config_json_names_the_architecture_and_model_args_timm_builds_it_with(saved):
    folder, _, metadata = saved
    config = json.loads((folder / hub.CONFIG_NAME).read_text())
    name = next(k for k, case in CASES.items() if case[0] is metadata)
    assert (config['architecture'], config['model_args']) == CASES[name][1:]


def test_timm_label_names_are_the_class_names(fine_tuned):
    folder, _, metadata = fine_tuned
    assert timm_model(folder).pretrained_cfg['label_names'] == ['cat', 'coffee', 'rocket']


def test_timm_data_config_is_the_eval_transform_of_the_metadata(fine_tuned):
    """What timm's validate.py and the model card use: resolve_data_config at the test size."""
    folder, _, metadata = fine_tuned
    data_config = timm.data.resolve_data_config({}, model=timm_model(folder), use_test_size=True)
    as_tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    assert as_tuples == {'input_size': (3, 64, 64), 'interpolation': 'bilinear',
                         'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5), 'crop_pct': 0.9,
                         'crop_mode': 'squash'}
    # and timm's transform of it gives our pixels: float32 /255 and normalisation, 1 ulp apart
    from PIL import Image
    transform = timm.data.create_transform(**data_config)
    theirs = np.stack([transform(Image.fromarray(i)).numpy().transpose(1, 2, 0)
                       for i in photos()])
    np.testing.assert_allclose(theirs, preprocess(photos(), metadata['preprocessing']),
                               rtol=0, atol=1e-6)


def test_local_dir_reads_back_the_same_variables_and_metadata(saved):
    folder, variables, metadata = saved
    read_variables, read_metadata = checkpoint.read(f'local-dir:{folder}')
    jax.tree.map(np.testing.assert_array_equal, read_variables, variables)  # bitwise
    assert jax.tree.structure(read_variables) == jax.tree.structure(variables)
    keys = (*checkpoint.MODEL_KEYS, 'preprocessing', 'class_names')
    assert {k: read_metadata.get(k) for k in keys} == {k: metadata.get(k) for k in keys}


# --- where it writes ---------------------------------------------------------------------------

@pytest.fixture
def small(small_variables):
    return small_variables, dict(SMALL_METADATA)


def test_saving_again_replaces_a_folder_save_pretrained_wrote(tmp_path, small):
    variables, metadata = small
    folder = tmp_path / 'pretrained'
    effnetv2_jax.save_pretrained(folder, variables, metadata)
    other = jax.tree.map(lambda a: a + 1, variables)
    effnetv2_jax.save_pretrained(folder, other, metadata)
    read_variables, _ = checkpoint.read(f'local-dir:{folder}')
    jax.tree.map(np.testing.assert_array_equal, read_variables, other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['pretrained']  # no temporary left


def foreign_file(folder):
    folder.mkdir()
    (folder / 'notes.txt').write_text('mine')


def timm_snapshot(folder):
    """What hf_hub_download or timm's save_for_hf leave: the same names, not our weights."""
    folder.mkdir()
    (folder / hub.CONFIG_NAME).write_text('{"architecture": "tf_efficientnetv2_b0"}')
    safetensors.numpy.save_file({'conv_stem.weight': np.zeros((1,), np.float32)},
                                folder / hub.WEIGHTS_NAME)


@pytest.mark.parametrize('make', [foreign_file, timm_snapshot, lambda p: p.write_text('a file')],
                         ids=['other-files', 'timm-files', 'a-file'])
def test_refuses_a_path_save_pretrained_did_not_write_and_changes_nothing(tmp_path, small, make):
    make(tmp_path / 'pretrained')
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match='exists and is not a folder written by effnetv2_jax'):
        effnetv2_jax.save_pretrained(tmp_path / 'pretrained', *small)
    assert snapshot(tmp_path) == before


def test_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path, small, monkeypatch):
    folder = tmp_path / 'pretrained'
    effnetv2_jax.save_pretrained(folder, *small)
    before = snapshot(tmp_path)

    def disk_full(tensors, path, metadata=None):
        open(path, 'wb').write(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(safetensors.numpy, 'save_file', disk_full)
    with pytest.raises(OSError, match='cannot write .*: no space left on device'):
        effnetv2_jax.save_pretrained(folder, *small)
    assert snapshot(tmp_path) == before


def test_variables_that_do_not_fit_the_metadata_are_a_one_line_value_error(tmp_path, small):
    variables, metadata = small
    with pytest.raises(ValueError) as error:
        effnetv2_jax.save_pretrained(tmp_path / 'p', variables, {**metadata, 'num_classes': 4})
    assert str(error.value).startswith('the variables do not fit EfficientNetV2-B0 (4 classes): ')
    assert '\n' not in str(error.value)
    assert list(tmp_path.iterdir()) == []


# --- push_to_hub, huggingface_hub's HfApi replaced ---------------------------------------------

class FakeHfApi:
    """Records create_repo and create_commit; a repo id without owner gets the user's, as the
    Hub does."""
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(('HfApi', token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(('create_repo', repo_id, kwargs))
        full_id = repo_id if '/' in repo_id else f'me/{repo_id}'
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{full_id}')

    def create_commit(self, repo_id, operations, commit_message):
        uploads = {op.path_in_repo: (op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                                     else Path(op.path_or_fileobj).read_bytes())
                   for op in operations}
        self.calls.append(('create_commit', repo_id, uploads))
        return huggingface_hub.CommitInfo(
            commit_url=f'https://huggingface.co/{repo_id}/commit/abc',
            commit_message=commit_message, commit_description='', oid='abc')


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)
    return FakeHfApi.calls


@pytest.fixture
def small_folder(tmp_path, small):
    folder = tmp_path / 'pretrained'
    effnetv2_jax.save_pretrained(folder, *small)
    return folder


def test_push_creates_the_repo_if_missing_and_uploads_the_folder_in_one_commit(
        small_folder, fake_hub):
    url = effnetv2_jax.push_to_hub(small_folder, 'me/digits-b0', token='t')
    assert url == 'https://huggingface.co/me/digits-b0/commit/abc'
    assert [c[0] for c in fake_hub] == ['HfApi', 'create_repo', 'create_commit']
    assert fake_hub[0] == ('HfApi', 't')
    assert fake_hub[1] == ('create_repo', 'me/digits-b0', {'private': None, 'exist_ok': True})
    _, repo_id, uploads = fake_hub[2]
    assert repo_id == 'me/digits-b0'
    assert sorted(uploads) == sorted(p.name for p in small_folder.iterdir())
    for name in (hub.CONFIG_NAME, hub.WEIGHTS_NAME):
        assert uploads[name] == (small_folder / name).read_bytes()


def test_pushed_model_card_names_the_repository(small_folder, fake_hub):
    effnetv2_jax.push_to_hub(small_folder, 'digits-b0')  # the Hub puts it under the user: me/
    card = fake_hub[2][2][hub.CARD_NAME].decode()
    assert "timm.create_model('hf-hub:me/digits-b0', pretrained=True)" in card
    assert "Predictor('hf-hub:me/digits-b0')" in card
    assert 'REPO_ID' not in card


@pytest.mark.parametrize('make', [foreign_file, timm_snapshot, lambda p: p.mkdir(),
                                  lambda p: None], ids=['other-files', 'timm-files', 'empty',
                                                        'missing'])
def test_push_refuses_a_folder_save_pretrained_did_not_write(tmp_path, fake_hub, make):
    make(tmp_path / 'pretrained')
    with pytest.raises(ValueError, match='is not a folder written by save_pretrained$'):
        effnetv2_jax.push_to_hub(tmp_path / 'pretrained', 'me/digits-b0')
    assert fake_hub == []  # nothing sent


# --- python -m train --save-pretrained ---------------------------------------------------------

def test_train_writes_the_final_weights_as_a_folder_timm_loads(
        tmp_path, digits, small_variables):
    """The weights of model.msgpack, class names included. The cheapest run that trains: 3 steps
    of the classifier alone on a B0 from a weights file (its class count differs: the run gives
    it a fresh 10-class classifier), no validation set; compiling the step takes most of it."""
    init, workdir, folder = tmp_path / 'init.msgpack', tmp_path / 'run', tmp_path / 'digits-b0'
    effnetv2_jax.save(init, small_variables, SMALL_METADATA)
    assert train_main(['--data-dir', f'{digits}/train', '--val-split', '0', '--workdir',
                       str(workdir), '--init', str(init), '--freeze-backbone', '--ema-decay', '0',
                       '--batch-size', '16', '--epochs', '0.05', '--num-stages', '1',
                       '--save-pretrained', str(folder)]) == 0
    variables, metadata = checkpoint.read(workdir / 'model.msgpack')
    model = timm_model(folder)
    assert model.pretrained_cfg['label_names'] == [str(d) for d in range(10)]
    images = preprocess(sorted(Path(digits, 'test').rglob('*.png'))[::30],
                        metadata['preprocessing'])
    ours = np.asarray(jitted_apply(checkpoint.build_model(metadata))(variables, images))
    assert_logits_close(torch_logits(model, images), ours)  # tolerance: as above


@pytest.mark.parametrize('folder, message', [
    ('mine', 'mine exists and is not a folder written by effnetv2_jax.save_pretrained'),
    ('run/hf', 'is, holds or is inside the workdir'),
    ('.', 'is, holds or is inside the workdir'),
    ('nowhere/hf', 'output folder'),
])
def test_train_refuses_a_save_pretrained_folder_it_may_not_write_before_it_starts(
        tmp_path, digits, capsys, folder, message):
    foreign_file(tmp_path / 'mine')
    before = snapshot(tmp_path)
    assert train_main(['--data-dir', digits, '--workdir', str(tmp_path / 'run'),
                       '--save-pretrained', str(tmp_path / folder)]) == 2
    assert message in assert_one_line_error(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_train_eval_only_with_save_pretrained_is_a_one_line_error(tmp_path, capsys):
    assert train_main(['--eval-only', '--init', str(tmp_path / 'w.msgpack'),
                       '--save-pretrained', str(tmp_path / 'hf')]) == 2
    assert '--eval-only trains nothing' in assert_one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
