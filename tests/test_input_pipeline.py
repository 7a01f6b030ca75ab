"""Input pipeline: image folders, deterministic and process-count-independent grain batches,
resumable iterator state, eval coverage, eval transforms against torchvision, RandAugment, digits.

Synthetic images are solid colours that encode their index, so a batch element can be traced
back to its file when augmentation is off (min_scale 1 on square images is a plain resize).
`eval_transform` must equal torchvision's PIL path exactly: both make the same PIL resize call.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image
from skimage import data

from effnetv2_jax.transforms import eval_transform, normalize
from train import input_pipeline as ip
from train.digits import materialize_digits
from train.randaugment import OPS, rand_augment

SIDE = 16
PLAIN = dict(image_size=SIDE, min_scale=1.0, flip=False, randaug_layers=0, randaug_magnitude=0)
AUGMENTED = dict(image_size=12, min_scale=0.3, flip=True, randaug_layers=2, randaug_magnitude=9)
IDENTITY_SPEC = {'size': SIDE, 'resize': 'shorter', 'crop_pct': 1.0, 'interpolation': 'bilinear',
                 'mean': (0.5,) * 3, 'std': (0.5,) * 3}


def colour(index: int) -> tuple[int, int, int]:
    return (10 * (index % 25), 10 * (index // 25), 200)


def make_folder(root, counts: dict[str, int], bad: dict[str, bytes] = ()) -> str:
    """`root/<class>/<i>.png` solid images, colour(i) with i global over classes in order; `bad`
    maps 'class/name' to raw file bytes."""
    index = 0
    for name, count in counts.items():
        os.makedirs(root / name, exist_ok=True)
        for _ in range(count):
            Image.new('RGB', (SIDE, SIDE), colour(index)).save(root / name / f'{index:03d}.png')
            index += 1
    for relative, content in dict(bad).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return str(root)


def identify(images: np.ndarray) -> list[int]:
    """The colour index of each solid uint8 [B, H, W, 3] image."""
    return [int(r) // 10 + int(g) // 10 * 25 for r, g, _ in images[:, SIDE // 2, SIDE // 2]]


def take(ds, count: int) -> list[dict]:
    it = iter(ds)
    batches = [next(it) for _ in range(count)]
    it.close()
    return batches


def assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """3 classes, 23 images (prime, so batches straddle epoch boundaries)."""
    root = tmp_path_factory.mktemp('pipe_folder')
    return ip.scan_image_folder(make_folder(root, {'cat': 9, 'dog': 7, 'emu': 7}))


@pytest.fixture(scope='module')
def photo():
    return Image.fromarray(data.chelsea())  # 451 x 300


# --- folders and splits ---------------------------------------------------------------------

def test_scan_finds_sorted_classes_and_labels(tmp_path):
    make_folder(tmp_path, {'b': 2, 'a': 3})
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')
    (tmp_path / 'a' / 'UPPER.JPG').write_bytes(b'')
    found = ip.scan_image_folder(str(tmp_path))
    assert found.class_names == ('a', 'b')
    assert [os.path.basename(p) for p in found.paths] == [
        '002.png', '003.png', '004.png', 'UPPER.JPG', '000.png', '001.png']
    np.testing.assert_array_equal(found.labels, [0, 0, 0, 0, 1, 1])
    assert found.labels.dtype == np.int32 and len(found) == 6


def test_missing_folder_raises_data_error_naming_it(tmp_path):
    with pytest.raises(ip.DataError, match=str(tmp_path / 'nope')):
        ip.scan_image_folder(str(tmp_path / 'nope'))


def test_folder_without_class_subfolders_raises_data_error(tmp_path):
    (tmp_path / 'loose.png').write_bytes(b'')
    with pytest.raises(ip.DataError, match='no class subfolders'):
        ip.scan_image_folder(str(tmp_path))


def test_class_folders_without_images_raise_data_error(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    with pytest.raises(ip.DataError, match='no images'):
        ip.scan_image_folder(str(tmp_path))


def test_an_image_that_is_a_symlink_loop_is_listed_to_be_counted_unreadable(tmp_path):
    make_folder(tmp_path, {'a': 2})
    (tmp_path / 'a' / 'loop.png').symlink_to('loop.png')
    (tmp_path / 'a' / 'notes.txt').symlink_to('notes.txt')  # no image: left out as before
    found = ip.scan_image_folder(str(tmp_path))
    assert [os.path.basename(p) for p in found.paths] == ['000.png', '001.png', 'loop.png']
    assert ip.load_image(found.paths[2], warn=False) is None


def test_a_class_folder_that_is_a_symlink_loop_raises_data_error(tmp_path):
    make_folder(tmp_path, {'a': 2})
    (tmp_path / 'b').symlink_to('b')
    with pytest.raises(ip.DataError, match=f'cannot read {tmp_path / "b"}: Too many levels'):
        ip.scan_image_folder(str(tmp_path))


def test_train_val_class_mismatch_raises_data_error(tmp_path):
    make_folder(tmp_path / 'train', {'a': 1, 'b': 1})
    make_folder(tmp_path / 'val', {'a': 1, 'c': 1})
    with pytest.raises(ip.DataError, match=r"only in train \['b'\], only in val \['c'\]"):
        ip.find_splits(str(tmp_path))


def test_train_and_val_folders_are_used_as_is(tmp_path):
    make_folder(tmp_path / 'train', {'a': 3, 'b': 2})
    make_folder(tmp_path / 'val', {'a': 1, 'b': 1})
    train, val = ip.find_splits(str(tmp_path), val_split=0.5)
    assert (len(train), len(val)) == (5, 2)


def test_val_split_is_deterministic_and_stratified(tmp_path):
    make_folder(tmp_path, {'a': 20, 'b': 10, 'c': 1})
    train, val = ip.find_splits(str(tmp_path), val_split=0.2, seed=3)
    again_train, again_val = ip.find_splits(str(tmp_path), val_split=0.2, seed=3)
    _, other_val = ip.find_splits(str(tmp_path), val_split=0.2, seed=4)
    assert val.paths == again_val.paths and train.paths == again_train.paths
    assert val.paths != other_val.paths
    np.testing.assert_array_equal(np.bincount(val.labels, minlength=3), [4, 2, 0])
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=3), [16, 8, 1])
    assert not set(train.paths) & set(val.paths)
    assert ip.find_splits(str(tmp_path), val_split=0.0)[1] is None


# --- training stream -------------------------------------------------------------------------

def test_each_draw_of_an_unreadable_image_is_substituted_and_counted_once(tmp_path):
    png = (tmp_path / 'ok.png')
    Image.new('RGB', (SIDE, SIDE), (1, 2, 3)).save(png)
    bad = {'a/x.jpg': b'garbage, not a jpeg', 'b/truncated.png': png.read_bytes()[:40],
           **{f'b/{i}.png': b'' for i in range(4)}}
    # 2 readable images among 8: every epoch draws runs of unreadable ones, whose substitutes
    # are looked for past the element's own position.
    found = ip.scan_image_folder(make_folder(tmp_path / 'data', {'a': 1, 'b': 1}, bad))
    batches = take(ip.train_dataset(found, global_batch_size=8, seed=0, **PLAIN), 3)  # 3 epochs
    for batch in batches:
        assert batch['image'].shape == (8, SIDE, SIDE, 3)
        assert batch['skipped'].sum() == 6 and set(batch['skipped']) == {0, 1}
        ids = identify(batch['image'])
        assert set(ids) == {0, 1}  # the readable images took the others' places ...
        np.testing.assert_array_equal(batch['label'], ids)  # ... with their labels


def test_too_many_unreadable_images_raise_data_error(tmp_path):
    bad = {f'a/{i:02d}.jpg': b'garbage' for i in range(ip.MAX_SUBSTITUTIONS)}
    found = ip.scan_image_folder(make_folder(tmp_path, {}, bad))
    with pytest.raises(ip.DataError, match='unreadable images in a row'):
        take(ip.train_dataset(found, global_batch_size=2, seed=0, **PLAIN), 1)


def test_folder_without_a_readable_image_is_a_data_error(tmp_path):
    found = ip.scan_image_folder(make_folder(tmp_path, {}, {'a/0.png': b'', 'b/1.jpg': b'x'}))
    with pytest.raises(ip.DataError, match=r'none of the 2 images in .* can be read \(.*a/0.png: '):
        ip.require_readable(found)


def test_folder_with_one_readable_image_passes_the_readability_check(tmp_path):
    found = ip.scan_image_folder(make_folder(tmp_path, {'b': 1}, {'a/0.png': b''}))
    ip.require_readable(found)  # the unreadable a/0.png comes first


def test_train_epoch_is_a_permutation_with_matching_labels(folder):
    batches = take(ip.train_dataset(folder, global_batch_size=23, seed=1, **PLAIN), 2)
    for batch in batches:
        ids = identify(batch['image'])
        assert sorted(ids) == list(range(23))
        np.testing.assert_array_equal(batch['label'], folder.labels[ids])
        assert batch['label'].dtype == np.int32 and batch['skipped'].dtype == np.int32
    assert identify(batches[0]['image']) != identify(batches[1]['image'])  # reshuffled


def test_train_batches_are_deterministic_per_seed(folder):
    kwargs = dict(global_batch_size=8, **AUGMENTED)
    first = take(ip.train_dataset(folder, seed=5, **kwargs), 4)
    assert_batches_equal(first, take(ip.train_dataset(folder, seed=5, **kwargs), 4))
    other = take(ip.train_dataset(folder, seed=6, **kwargs), 4)
    assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_global_batch_is_independent_of_process_count(folder):
    kwargs = dict(global_batch_size=8, seed=2, stage=1, **AUGMENTED)
    single = take(ip.train_dataset(folder, **kwargs), 5)
    parts = [take(ip.train_dataset(folder, process_index=p, process_count=2, **kwargs), 5)
             for p in range(2)]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
    assert parts[0][0]['image'].shape[0] == 4
    assert_batches_equal(single, joined)


def test_batch_size_not_divisible_by_process_count_raises_data_error(folder):
    with pytest.raises(ip.DataError, match='multiple of the process count 3'):
        ip.train_dataset(folder, global_batch_size=8, seed=0, process_count=3, **PLAIN)


def test_start_step_continues_the_stream(folder):
    kwargs = dict(global_batch_size=8, seed=0, **AUGMENTED)
    assert_batches_equal(take(ip.train_dataset(folder, **kwargs), 5)[3:],
                         take(ip.train_dataset(folder, start_step=3, **kwargs), 2))


def test_workers_do_not_change_batches(folder):
    kwargs = dict(global_batch_size=8, seed=0, **AUGMENTED)
    assert_batches_equal(take(ip.train_dataset(folder, **kwargs), 5),
                         take(ip.train_dataset(folder, num_workers=2, **kwargs), 5))


@pytest.mark.parametrize('num_workers', [0, 2])
def test_iterator_state_round_trip_continues_exactly(folder, num_workers):
    ds = ip.train_dataset(folder, global_batch_size=8, seed=0, num_workers=num_workers,
                          **AUGMENTED)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it.close()
    resumed = iter(ds)
    resumed.set_state(state)
    assert_batches_equal(expected, [next(resumed) for _ in range(3)])
    resumed.close()


# --- evaluation ------------------------------------------------------------------------------

def test_eval_covers_every_image_once_with_padding_masked(folder):
    assert ip.num_eval_batches(folder, 6) == 4  # 23 images -> 24 positions
    seen, labels, masks = [], [], []
    for p in range(2):
        batches = list(ip.eval_dataset(folder, global_batch_size=6, spec=IDENTITY_SPEC,
                                       process_index=p, process_count=2))
        assert len(batches) == 4 and batches[0]['image'].shape == (3, SIDE, SIDE, 3)
        for batch in batches:
            real = batch['mask'] == 1
            seen += identify(batch['image'][real])
            labels += list(batch['label'][real])
            masks += list(batch['mask'])
    assert sorted(seen) == list(range(23))
    np.testing.assert_array_equal(labels, folder.labels[seen])
    assert sorted(masks) == [0.0] + [1.0] * 23


def test_eval_dataset_is_reiterable(folder):
    ds = ip.eval_dataset(folder, global_batch_size=10, spec=IDENTITY_SPEC)
    assert_batches_equal(list(ds), list(ds))


def test_eval_masks_unreadable_images(tmp_path):
    found = ip.scan_image_folder(make_folder(tmp_path, {'a': 2}, {'a/x.jpg': b'garbage'}))
    (batch,) = list(ip.eval_dataset(found, global_batch_size=4, spec=IDENTITY_SPEC))
    np.testing.assert_array_equal(batch['mask'], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch['skipped'], [0, 0, 1, 0])


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('crop_pct', [1.0, 0.875])
def test_eval_transform_shorter_matches_torchvision(photo, interpolation, crop_pct):
    spec = {**IDENTITY_SPEC, 'size': 224, 'crop_pct': crop_pct, 'interpolation': interpolation}
    mode = T.InterpolationMode(interpolation)
    reference = T.Compose([T.Resize(int(224 / crop_pct), mode), T.CenterCrop(224)])
    for image in (photo, photo.transpose(Image.Transpose.TRANSPOSE)):  # landscape, portrait
        np.testing.assert_array_equal(eval_transform(image, spec), np.asarray(reference(image)))


def test_eval_transform_squash_matches_torchvision(photo):
    spec = {**IDENTITY_SPEC, 'size': 224, 'resize': 'squash', 'crop_pct': 0.9,
            'interpolation': 'bicubic'}
    reference = T.Compose([T.Resize((248, 248), T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    np.testing.assert_array_equal(eval_transform(photo, spec), np.asarray(reference(photo)))


def test_eval_transform_converts_to_rgb(photo):
    palette = photo.convert('P')
    palette.info['transparency'] = 0
    for image in (photo.convert('L'), photo.convert('RGBA'), palette):
        out = eval_transform(image, {**IDENTITY_SPEC, 'size': 64})
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_normalize_works_on_numpy_and_under_jit():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    spec = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}
    expected = (images / 255.0 - np.array(spec['mean'])) / np.array(spec['std'])
    out = normalize(images, spec)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    traced = jax.jit(lambda x: normalize(x, spec))(jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(traced), expected, rtol=1e-6, atol=1e-6)


# --- training transform ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def large_jpeg(tmp_path_factory):
    """chelsea at 4x (1804 x 1200), JPEG quality 90."""
    path = tmp_path_factory.mktemp('jpeg') / 'chelsea.jpg'
    Image.fromarray(data.chelsea()).resize((1804, 1200), Image.Resampling.BICUBIC).save(
        path, quality=90)
    return str(path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


def full_decode_transform(path: str, seed: int, settings: dict) -> np.ndarray:
    """`train_transform` on the image decoded at full size first."""
    rng = np.random.default_rng(seed)
    crop = ip.random_resized_crop(ip.load_image(path), settings['image_size'],
                                  (settings['min_scale'], 1.0), rng)
    if settings['flip'] and rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(rand_augment(crop, settings['randaug_layers'],
                                   settings['randaug_magnitude'], rng))


def test_jpeg_crop_far_larger_than_the_output_is_decoded_at_reduced_scale(large_jpeg):
    # min_scale 1: the crop is the image's 4:3 center, 1200 px high, over 8x the 64 px output:
    # decoded at 1/8 scale (libjpeg's DCT scaling) and resized from 150 px.
    settings = {**AUGMENTED, 'image_size': 64, 'min_scale': 1.0}
    reduced = ip.train_transform(large_jpeg, np.random.default_rng(0), **settings)
    np.testing.assert_array_equal(
        reduced, ip.train_transform(large_jpeg, np.random.default_rng(0), **settings))
    full = full_decode_transform(large_jpeg, 0, settings)
    assert not np.array_equal(reduced, full)
    # Other pixels, same picture: 53 dB here, where bilinear instead of bicubic resizing of the
    # same crop gives 41 dB; 40 dB leaves room for other libjpeg builds.
    assert psnr(reduced, full) > 40


def test_crop_that_needs_the_full_resolution_equals_the_full_decode(large_jpeg, photo, tmp_path):
    photo.save(tmp_path / 'photo.png')
    for path, size in ((large_jpeg, 1024), (str(tmp_path / 'photo.png'), 12)):  # PNG: no draft
        settings = {**AUGMENTED, 'image_size': size}
        for seed in range(3):
            np.testing.assert_array_equal(
                ip.train_transform(path, np.random.default_rng(seed), **settings),
                full_decode_transform(path, seed, settings))


def test_truncated_jpeg_is_unreadable_for_the_training_transform(large_jpeg, tmp_path):
    truncated = tmp_path / 'truncated.jpg'
    with open(large_jpeg, 'rb') as f:
        truncated.write_bytes(f.read()[:20_000])  # the header and the first rows
    assert ip.train_transform(str(truncated), np.random.default_rng(0), **AUGMENTED) is None


# --- RandAugment -----------------------------------------------------------------------------

def test_rand_augment_magnitude_zero_is_identity(photo):
    rng = np.random.default_rng(0)
    assert rand_augment(photo, 2, 0, rng) is photo
    assert rand_augment(photo, 0, 10, rng) is photo


def test_rand_augment_changes_image_and_keeps_size_and_mode(photo):
    small = photo.resize((64, 48))
    for seed in range(8):
        out = rand_augment(small, 2, 10, np.random.default_rng(seed))
        assert out.size == small.size and out.mode == 'RGB'
        assert not np.array_equal(np.asarray(out), np.asarray(small)), seed


@pytest.mark.parametrize('name', sorted(OPS))
def test_every_op_keeps_size_and_mode_and_is_seeded_at_every_magnitude(photo, name):
    small = photo.resize((64, 48))
    for magnitude in (0.5, 1, 2.4, 5, 6.25, 10, 15, 20):  # progressive stages use fractions
        outs = [np.asarray(OPS[name](small, magnitude, np.random.default_rng(1)))
                for _ in range(2)]
        assert outs[0].shape == (48, 64, 3)
        np.testing.assert_array_equal(*outs)


# --- digits ----------------------------------------------------------------------------------

def test_digits_materialize_writes_documented_counts_and_is_idempotent(tmp_path):
    root = materialize_digits(str(tmp_path / 'digits'))
    counts = {split: len(ip.scan_image_folder(os.path.join(root, split)))
              for split in ('train', 'val', 'test')}
    assert counts == {'train': 1259, 'val': 269, 'test': 269}
    train, val = ip.find_splits(root)
    assert train.class_names == tuple(str(d) for d in range(10)) and len(val) == 269
    with Image.open(train.paths[0]) as image:
        assert image.size == (32, 32)
    stamp = os.stat(train.paths[0]).st_mtime_ns
    assert materialize_digits(root) == root
    assert os.stat(train.paths[0]).st_mtime_ns == stamp
    assert os.listdir(tmp_path) == ['digits']  # no temporary folder left behind
