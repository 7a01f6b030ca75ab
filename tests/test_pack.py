"""`python -m train.pack` and training from its ArrayRecord shards: the records hold the folder's
bytes, labels and names in its order, the command's errors, and training from the shards ends with
bitwise the weights training from the folder ends with."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import effnetv2_jax
from helpers import assert_one_line_error, snapshot
from train import input_pipeline as ip
from train import loop, records
from train.__main__ import main as train_main
from train.pack import main as pack_main


def pack(folder, out, *flags: str) -> str:
    assert pack_main([str(folder), str(out), *flags]) == 0
    return str(out)


@pytest.fixture(scope='module')
def packed_digits(digits, tmp_path_factory) -> str:
    return pack(digits, tmp_path_factory.mktemp('packed') / 'digits', '--shards', '3')


def assert_same_images(folder: ip.ImageFolder, packed: ip.ImageSource):
    assert packed.class_names == folder.class_names
    np.testing.assert_array_equal(packed.labels, folder.labels)
    for index, path in enumerate(folder.paths):
        file = packed.image_file(index)
        assert file.getvalue() == Path(path).read_bytes(), path
        assert ip.image_name(file).endswith(str(Path(path).relative_to(Path(path).parents[1])))


def test_packed_splits_hold_the_folders_bytes_labels_and_class_names(digits, packed_digits):
    folder_train, folder_val = ip.find_splits(digits)
    train, val = ip.find_splits(packed_digits)
    assert isinstance(train, ip.PackedImages) and isinstance(val, ip.PackedImages)
    assert_same_images(folder_train, train)
    assert_same_images(folder_val, val)


def test_pack_writes_three_shards_per_split_and_the_class_counts(packed_digits):
    info = json.loads((Path(packed_digits) / records.DATASET_FILE).read_text())
    assert sorted(p.name for p in Path(packed_digits).iterdir()) == sorted(
            [records.DATASET_FILE] + [f'{split}-{k:05d}-of-00003.array_record'
                                      for split in ('train', 'val') for k in range(3)])
    assert (info['format'], info['version']) == (records.FORMAT, records.VERSION)
    assert info['class_names'] == [str(d) for d in range(10)]
    # scikit-learn's digits as train.digits splits them (test/ is not a split: left out)
    assert [sum(s['class_counts']) for s in info['splits'].values()] == [1259, 269]
    assert [s['records'] for s in info['splits']['val']['shards']] == [90, 90, 89]


def test_a_record_decodes_to_the_pixels_of_its_file(tmp_path):
    """A JPEG (lossy, so a decoder difference would show) decodes through a record as from its
    path."""
    rng = np.random.default_rng(0)
    (tmp_path / 'data' / 'a').mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(
            tmp_path / 'data' / 'a' / 'noise.jpg', quality=70)
    folder, _ = ip.find_splits(str(tmp_path / 'data'))
    packed, _ = ip.find_splits(pack(tmp_path / 'data', tmp_path / 'packed'))
    np.testing.assert_array_equal(np.asarray(ip.load_image(packed.image_file(0))),
                                  np.asarray(ip.load_image(folder.image_file(0))))


def test_val_split_of_a_packed_class_tree_holds_out_the_same_images(digits, tmp_path):
    tree = Path(digits) / 'val'
    packed = pack(tree, tmp_path / 'packed')
    folder_train, folder_val = ip.find_splits(str(tree), val_split=0.2, seed=4)
    train, val = ip.find_splits(packed, val_split=0.2, seed=4)
    assert_same_images(folder_train, train)
    assert_same_images(folder_val, val)


def test_eval_split_of_a_packed_folder_is_its_val_split(digits, packed_digits):
    assert_same_images(ip.eval_split(str(Path(digits) / 'val')), ip.eval_split(packed_digits))


@pytest.mark.parametrize('make, message', [
        (lambda tmp: (tmp / 'missing', tmp / 'out'), 'data folder not found'),
        (lambda tmp: ((tmp / 'data' / 'a').mkdir(parents=True) or tmp / 'data', tmp / 'out'),
         'no images'),
        (lambda tmp: (tmp, tmp / 'out'), 'is inside the input'),
        (lambda tmp: (tmp / 'data', (tmp / 'out').write_text('mine') and tmp / 'out'),
         'exists and is not a folder of effnetv2-jax packed images'),
])
def test_bad_input_or_output_is_a_one_line_error_and_writes_nothing(
        tmp_path, capsys, make, message):
    folder, out = make(tmp_path)
    before = snapshot(tmp_path)
    assert pack_main([str(folder), str(out)]) == 2
    assert message in assert_one_line_error(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_a_bad_command_line_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse
        pack_main(['a', 'b', '--shards', '0'])
    assert exit_.value.code == 2
    assert 'expected a positive integer' in assert_one_line_error(capsys.readouterr().err)


def remove_a_shard(packed: Path):
    (packed / 'val-00000-of-00001.array_record').unlink()


def truncate_a_shard(packed: Path):
    shard = packed / 'train-00000-of-00001.array_record'
    shard.write_bytes(shard.read_bytes()[:70_000])


def misspell_the_description(packed: Path):
    info = json.loads((packed / records.DATASET_FILE).read_text())
    info['splits']['train']['class_counts'] = [1]
    (packed / records.DATASET_FILE).write_text(json.dumps(info))


@pytest.mark.parametrize('damage, message', [
        (remove_a_shard, 'cannot read the val shards'),
        (truncate_a_shard, 'cannot read the train shards'),
        (misspell_the_description, 'the class counts of split train do not match'),
])
def test_damaged_packed_folder_is_a_one_line_error_before_training(
        digits, tmp_path, capsys, damage, message):
    packed = Path(pack(digits, tmp_path / 'packed', '--shards', '1'))
    damage(packed)
    capsys.readouterr()
    assert train_main(['--data-dir', str(packed), '--workdir', str(tmp_path / 'run')]) == 2
    assert message in assert_one_line_error(capsys.readouterr().err)
    assert not (tmp_path / 'run').exists()


def test_packing_again_replaces_a_packed_folder(digits, tmp_path):
    out = pack(Path(digits) / 'val', tmp_path / 'out', '--shards', '2')
    pack(Path(digits) / 'val', out, '--shards', '1')
    assert sorted(p.name for p in Path(out).iterdir()) == [
            records.DATASET_FILE, 'train-00000-of-00001.array_record']


def test_packing_into_an_empty_folder_fills_it(digits, tmp_path):
    (tmp_path / 'out').mkdir()
    pack(Path(digits) / 'val', tmp_path / 'out', '--shards', '1')
    assert (tmp_path / 'out' / records.DATASET_FILE).exists()


def add_a_file(out: Path):
    (out / 'notes.txt').write_text('mine')


def add_a_folder(out: Path):
    (out / 'mine').mkdir()


def describe_another_format(out: Path):
    (out / records.DATASET_FILE).write_text(json.dumps({'format': 'my own', 'version': 1}))


@pytest.mark.parametrize('change', [add_a_file, add_a_folder, describe_another_format])
def test_packing_again_leaves_a_folder_holding_more_than_a_pack_alone(
        digits, tmp_path, capsys, change):
    out = Path(pack(Path(digits) / 'val', tmp_path / 'out', '--shards', '1'))
    change(out)
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert pack_main([str(Path(digits) / 'val'), str(out)]) == 2
    assert 'exists and is not a folder of effnetv2-jax packed images' in assert_one_line_error(
            capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_an_image_that_is_a_symlink_loop_is_a_one_line_error(digits, tmp_path, capsys):
    """A file whose bytes cannot be read cannot be copied into a record."""
    folder = tmp_path / 'data'
    shutil.copytree(Path(digits) / 'val', folder)
    (folder / '3' / 'loop.png').symlink_to('loop.png')
    assert pack_main([str(folder), str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err  # after the progress bar of the packing it stopped
    assert 'Traceback' not in err
    assert err.splitlines()[-1] == (f'error: cannot read {folder / "3" / "loop.png"}: Too many '
                                    'levels of symbolic links')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']


@pytest.fixture(scope='module')
def small(digits, tmp_path_factory) -> tuple[str, str]:
    """(folder, the folder packed into 3 shards): train/ of 2 classes, 9 + 10 images, one of them
    not an image (training substitutes the next image of the stream), and val/ of 3 + 3."""
    root = tmp_path_factory.mktemp('small') / 'data'
    for split, count in (('train', 9), ('val', 3)):
        for digit in ('3', '7'):
            (root / split / digit).mkdir(parents=True)
            for png in sorted((Path(digits) / split / digit).glob('*.png'))[:count]:
                (root / split / digit / png.name).write_bytes(png.read_bytes())
    (root / 'train' / '7' / 'broken.png').write_bytes(b'not an image')
    return str(root), pack(root, root.parent / 'packed', '--shards', '3')


# 4 steps of 6 images (3 steps an epoch of 19) at 32 px, validation at the end.
RUN = ['--batch-size', '6', '--epochs', '1.4', '--num-stages', '1', '--eval-every', '100',
       '--ema-decay', '0', '--optimizer', 'sgd', '--base-lr', '0.1', '--checkpoint-every', '2']


def train(data: str, workdir: Path, *flags: str) -> int:
    return train_main(['--data-dir', data, '--workdir', str(workdir), *RUN, *flags])


def result(workdir: Path) -> tuple[dict, dict]:
    """(the run's summary, its final variables)."""
    summary = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])['summary']
    variables, _ = effnetv2_jax.checkpoint.read(workdir / loop.WEIGHTS_FILE)
    return summary, variables


@pytest.fixture(scope='module')
def from_folder(small, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('from_folder')
    assert train(small[0], workdir) == 0
    summary, variables = result(workdir)
    assert summary['steps'] == 4 and summary['skipped_images'] >= 1  # substitution happened
    return summary, variables


def test_training_from_packed_shards_ends_with_the_folders_weights_bitwise(
        small, from_folder, tmp_path, monkeypatch):
    """Stopped after step 2 (as on SIGTERM) and resumed from its checkpoint, iterator state
    included."""
    workdir = tmp_path / 'run'
    with monkeypatch.context() as patch:
        patch.setattr(loop.Preemption, 'requested', lambda self, step: step == 2)
        assert train(small[1], workdir) == 143
    assert train(small[1], workdir) == 0
    summary, variables = result(workdir)
    expected_summary, expected_variables = from_folder
    assert summary['steps'] == 4
    assert summary['final'] == expected_summary['final']
    jax.tree.map(np.testing.assert_array_equal, variables, expected_variables)


def take(dataset, count: int) -> list[dict]:
    iterator = iter(dataset)
    batches = [next(iterator) for _ in range(count)]
    iterator.close()  # stops its worker processes
    return batches


def test_packed_training_batches_with_workers_are_the_folders(small):
    """Two grain workers reading the shards give the batches the main process gives from the
    folder (so training with workers ends with the same weights too)."""
    (folder, _), (packed, _) = (ip.find_splits(data) for data in small)
    settings = dict(global_batch_size=6, image_size=16, randaug_layers=2, randaug_magnitude=9,
                    seed=3)
    expected = take(ip.train_dataset(folder, **settings), 7)  # 2 epochs and more
    batches = take(ip.train_dataset(packed, num_workers=2, **settings), 7)
    assert sum(int(batch['skipped'].sum()) for batch in expected) >= 1  # substitution compared
    for expected_batch, batch in zip(expected, batches, strict=True):
        assert batch.keys() == expected_batch.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected_batch[key], err_msg=key)


def test_eval_only_on_packed_shards_evaluates_their_val_split(small, from_folder, capsys):
    """The same numbers as the folder run's last validation, of the same weights."""
    summary, _ = from_folder
    assert train_main(['--eval-only', '--init', summary['weights'], '--data-dir', small[1],
                       '--batch-size', '6']) == 0
    evaluation = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert evaluation['images'] == summary['final']['images'] == 6
    assert (evaluation['top1'], evaluation['loss']) == (summary['final']['raw/top1'],
                                                       summary['final']['raw/loss'])
