"""What `python -m train` does with a workdir it must not or cannot use: one that is or holds an
input, is in use by another run, fills the disk, holds checkpoints of another configuration or
damaged ones, or a torn or foreign metrics log; and a symlink loop in the data. A refusal is one
line `error: ...` with exit status 2 before anything is written; a damaged checkpoint or a torn
log line is left behind with one warning line and the run goes on."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

import effnetv2_jax
from effnetv2_jax.files import OutputError
from helpers import SMALL_METADATA, assert_one_line_error
from train import loop, report
from train.__main__ import main as train_main
from train.report import METRICS_FILE, read_metrics_log
from train.run_checkpoints import TMP_SUFFIX
from train.workdir import LOCK_FILE

# 3 steps of 4 images at 32 px, a checkpoint after each (the 2 latest kept), no validation.
RUN = ['--batch-size', '4', '--epochs', '1', '--num-stages', '1', '--val-split', '0',
       '--checkpoint-every', '1', '--log-every', '1']
CHECKPOINT_KIB = 90 * 1024  # a checkpoint of RUN's train state (B0, AdamW, EMA) is ~85 MiB


def train(data, workdir, *flags: str) -> int:
    return train_main(['--data-dir', str(data), '--workdir', str(workdir), *RUN, *flags])


def shown_lines(err: str) -> list[str]:
    """The lines of stderr as a terminal shows them, less the progress bar's."""
    shown = (line.split('\r')[-1] for line in err.split('\n'))
    return [line for line in shown if line.strip() and not re.search(r'\d+%\|', line)]


def one_error_line(capsys) -> str:
    return assert_one_line_error('\n'.join(shown_lines(capsys.readouterr().err)))


def one_warning_line(err: str) -> str:
    lines = shown_lines(err)
    assert len(lines) == 1 and lines[0].startswith('warning: '), err
    return lines[0]


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and modification time: what a write changes; but
    the lock file's, which holds the pid of the run that used the workdir last."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob('*')) if p.name != LOCK_FILE}


@pytest.fixture(scope='module')
def data(digits, tmp_path_factory) -> Path:
    """Classes 3 and 7 of the digits, 6 images each."""
    root = tmp_path_factory.mktemp('small') / 'data'
    for digit in ('3', '7'):
        (root / digit).mkdir(parents=True)
        for png in sorted((Path(digits) / 'train' / digit).glob('*.png'))[:6]:
            (root / digit / png.name).write_bytes(png.read_bytes())
    return root


@pytest.fixture(scope='module')
def stopped(data, tmp_path_factory) -> Path:
    """The workdir of RUN stopped after step 2 of 3 (as on SIGTERM): checkpoints 1 and 2."""
    workdir = tmp_path_factory.mktemp('stopped') / 'run'
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop.Preemption, 'requested', lambda self, step: step == 2)
        assert train(data, workdir) == 143
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['1', '2']
    return workdir


@pytest.fixture
def resumable(stopped, tmp_path) -> Path:
    """A copy of `stopped`, to resume or damage."""
    return Path(shutil.copytree(stopped, tmp_path / 'run'))


# --- the workdir apart from the inputs -----------------------------------------------------

def test_a_workdir_holding_the_init_weights_is_refused(tmp_path, data, small_variables, capsys):
    """A finished run would replace its own init weights."""
    workdir = tmp_path / 'run'
    workdir.mkdir()
    effnetv2_jax.save(workdir / 'model.msgpack', small_variables, SMALL_METADATA)
    before = listing(tmp_path)
    assert train(data, workdir, '--init', str(workdir / 'model.msgpack')) == 2
    assert one_error_line(capsys) == (f'error: --workdir {workdir} contains the input '
                                      f'{workdir / "model.msgpack"}; choose another --workdir')
    assert listing(tmp_path) == before


@pytest.mark.parametrize('place, relation', [
        (lambda data: data, 'is'),
        (lambda data: data.parent, 'contains'),
        (lambda data: data / 'run', 'is inside')])
def test_a_workdir_that_is_holds_or_lies_in_the_data_is_refused(data, capsys, place, relation):
    """Its checkpoints/ would become a class of the data."""
    workdir = place(data)
    before = listing(data.parent)
    assert train(data, workdir) == 2
    assert one_error_line(capsys) == (f'error: --workdir {workdir} {relation} the input {data}; '
                                      'choose another --workdir')
    assert listing(data.parent) == before


# --- one run at a time ----------------------------------------------------------------------

def test_a_run_in_a_workdir_another_run_holds_is_refused(tmp_path, data, capsys):
    workdir = tmp_path / 'run'
    workdir.mkdir()
    with open(workdir / LOCK_FILE, 'w') as lock:  # as the other run holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write('4242\n')
        lock.flush()
        before = listing(workdir)
        assert train(data, workdir) == 2
        assert listing(workdir) == before
        assert (workdir / LOCK_FILE).read_text() == '4242\n'
    assert one_error_line(capsys) == (
            f'error: another python -m train (pid 4242) is using workdir {workdir}; wait for it '
            'to end or choose another --workdir')


def test_a_run_releases_its_workdir_when_it_ends(resumable):
    with open(resumable / LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held


# --- a full disk ----------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_checkpoint_before(
        data, full_disk, tmp_path, capsys):
    """Room for one checkpoint and a half: the second save fails mid-way. Orbax's logging of the
    failure stays silent, its temporary folder is removed, and the first checkpoint resumes."""
    workdir = full_disk(CHECKPOINT_KIB * 3 // 2 * 1024) / 'run'
    assert train(data, workdir) == 2
    assert one_error_line(capsys) == (f'error: cannot write {workdir.absolute()}/checkpoints/2: '
                                      'no space left on device')
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['1']
    moved = shutil.copytree(workdir, tmp_path / 'run')
    assert train(data, moved) == 0
    assert 'resumed at step 1' in capsys.readouterr().out


# --- resuming: flags, classes and damaged checkpoints ----------------------------------------

@pytest.mark.parametrize('flags, stored, asked', [
        (['--variant', 'b1'], '--variant b0', '--variant b1'),
        (['--optimizer', 'sgd'], '--optimizer adamw', '--optimizer sgd'),
        (['--ema-decay', '0'], '--ema-decay 0.99', '--ema-decay 0')])
def test_resuming_with_another_state_shaping_flag_names_it(
        resumable, data, capsys, flags, stored, asked):
    before = listing(resumable)
    assert train(data, resumable, *flags) == 2
    assert one_error_line(capsys) == (f'error: workdir {resumable} was trained with {stored}; '
                                      f'asked for {asked}: rerun with {stored} or choose a new '
                                      '--workdir')
    assert listing(resumable) == before


def test_resuming_on_other_classes_names_them(resumable, data, tmp_path, capsys):
    other = tmp_path / 'other'
    shutil.copytree(data, other)
    shutil.copytree(data / '7', other / '9')
    before = listing(resumable)
    assert train(other, resumable) == 2
    assert one_error_line(capsys) == (f'error: workdir {resumable} was trained on the classes 3, '
                                      '7; the data has 3, 7, 9: rerun with the data it was '
                                      'trained on or choose a new --workdir')
    assert listing(resumable) == before


def truncate_the_largest_state_file(checkpoint: Path):
    largest = max((p for p in (checkpoint / 'state').rglob('*') if p.is_file()),
                  key=lambda p: p.stat().st_size)
    os.truncate(largest, 1000)


def scramble_the_progress(checkpoint: Path):
    (checkpoint / 'progress' / 'metadata').write_text('garbage')


@pytest.mark.parametrize('damage, reason', [
        (truncate_the_largest_state_file, '(state: '),
        (scramble_the_progress, '(progress: Expecting value')])
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
        resumable, data, capsys, damage, reason):
    damage(resumable / 'checkpoints' / '2')
    assert train(data, resumable) == 0
    captured = capsys.readouterr()
    warning = one_warning_line(captured.err)
    assert warning.startswith(f'warning: checkpoint {resumable.absolute()}/checkpoints/2 cannot '
                              f'be read {reason}'), warning
    assert warning.endswith(', resuming from step 1')
    assert 'resumed at step 1' in captured.out
    assert len(list((resumable / 'checkpoints').glob('2.damaged-*'))) == 1


def test_a_users_folder_named_like_a_step_is_kept_and_the_run_resumes(resumable, data, capsys):
    folder = resumable / 'checkpoints' / '7'
    folder.mkdir()
    (folder / 'notes.txt').write_text('mine')
    assert train(data, resumable) == 0
    captured = capsys.readouterr()
    assert '/checkpoints/7 cannot be read (no train state in it)' in one_warning_line(
            captured.err)
    assert 'resumed at step 2' in captured.out
    [aside] = (resumable / 'checkpoints').glob('7.damaged-*')
    assert (aside / 'notes.txt').read_text() == 'mine'


def test_an_unreadable_data_position_resumes_from_the_position_of_the_step(
        resumable, data, capsys):
    (resumable / 'checkpoints' / '2' / 'data' / 'process_0-of-1.json').write_text('')
    assert train(data, resumable) == 0
    captured = capsys.readouterr()
    assert one_warning_line(captured.err).startswith(
            f'warning: the data position in checkpoint 2 of {resumable} cannot be read')
    assert 'resumed at step 2' in captured.out


def test_no_readable_checkpoint_is_one_line_suggesting_a_new_workdir(resumable, data, capsys):
    for step in ('1', '2'):
        scramble_the_progress(resumable / 'checkpoints' / step)
    before = listing(resumable)
    assert train(data, resumable) == 2
    line = one_error_line(capsys)
    assert line.startswith(f'error: checkpoint {resumable.absolute()}/checkpoints/2 cannot be '
                           'read (progress: ')
    assert line.endswith('and there is no earlier one: choose a new --workdir (or move '
                         f'{resumable.absolute()}/checkpoints away)')
    assert listing(resumable) == before


# --- the metrics log ------------------------------------------------------------------------

@pytest.mark.parametrize('text, rows, torn', [
        ('{"step": 1}\n{"step": 2}\n', 2, False),
        ('{"step": 1}\n{"step": 2', 1, True),  # killed mid-line
        ('{"step": 1}\n\n', 1, True),  # a blank last line
        ('{"step": 1}\n\0\0\0', 1, True),  # what a crash of the file system may leave
        ('', 0, False)])
def test_a_torn_or_blank_last_line_of_the_metrics_log_is_left_out(tmp_path, text, rows, torn):
    path = tmp_path / METRICS_FILE
    path.write_text(text)
    assert [len(read_metrics_log(path)[0]), read_metrics_log(path)[1]] == [rows, torn]


@pytest.mark.parametrize('text', ['my notes\n', '{"step": 1}\nmy notes\n{"step": 2}\n',
                                  '{"id": 1}\n', '[1, 2]\n'])
def test_a_file_of_someone_elses_is_no_metrics_log(tmp_path, text):
    path = tmp_path / METRICS_FILE
    path.write_text(text)
    with pytest.raises(ValueError, match='is not a metrics log of python -m train'):
        read_metrics_log(path)


def test_a_full_disk_while_logging_is_one_line_and_leaves_a_log_a_resume_reads(full_disk):
    reporter = report.Reporter(str(full_disk(64 * 1024)), total_steps=1, first_step=0)
    with pytest.raises(OutputError) as failed:
        for step in range(10_000):
            reporter.write(step, {'train/loss': 1 / 3, 'note': 'x' * 100})
    reporter.close()
    path = reporter.workdir / METRICS_FILE
    assert str(failed.value) == f'cannot write {path}: no space left on device'
    rows, _ = read_metrics_log(path)
    assert [row['step'] for row in rows] == list(range(len(rows)))


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(resumable, data, capsys):
    metrics = resumable / METRICS_FILE
    with open(metrics, 'a') as f:
        f.write('{"step": 3, "ti')
    assert train(data, resumable) == 0
    warning = one_warning_line(capsys.readouterr().err)
    assert warning == (f'warning: the last line of {metrics} was cut short (the run writing it was '
                       'killed or out of disk space); dropped it')
    rows, torn = read_metrics_log(metrics)
    assert not torn and rows[-1]['summary']['steps'] == 3


def test_a_foreign_file_named_like_the_metrics_log_is_refused_untouched(
        tmp_path, data, capsys):
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / METRICS_FILE).write_text('my notes\n')
    before = listing(workdir)
    assert train(data, workdir) == 2
    assert one_error_line(capsys) == (f'error: {workdir / METRICS_FILE} exists and is not a '
                                      'metrics log of python -m train; not replacing it (move it '
                                      'away or choose another output)')
    assert listing(workdir) == before
    assert not (workdir / LOCK_FILE).exists()


# --- SIGTERM --------------------------------------------------------------------------------

def test_sigterm_during_a_write_of_the_run_saves_exits_143_and_leaves_no_temporary(
        resumable, data, capsys, monkeypatch):
    """SIGTERM while the resumed run rewrites its metrics log: the write completes, the run
    saves its next step and stops; SIGTERM is handled as before the run again."""
    atomic_write = report.atomic_write

    def write_interrupted(path, write, kind, inputs=()):
        def sigterm_then_write(tmp):
            os.kill(os.getpid(), signal.SIGTERM)
            write(tmp)
        atomic_write(path, sigterm_then_write, kind, inputs)
    monkeypatch.setattr(report, 'atomic_write', write_interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    assert train(data, resumable) == 143
    assert 'SIGTERM: saved step 3' in capsys.readouterr().err
    assert [p for p in resumable.rglob('*')
            if p.name.endswith('.tmp') or p.name.endswith(TMP_SUFFIX)] == []
    read_metrics_log(resumable / METRICS_FILE)  # whole
    assert signal.getsignal(signal.SIGTERM) is handler


# --- symlink loops in the data ---------------------------------------------------------------

def test_eval_only_counts_an_image_that_is_a_symlink_loop_as_unreadable(
        tmp_path, data, small_variables, capsys):
    weights = tmp_path / 'w.msgpack'
    effnetv2_jax.save(weights, small_variables, SMALL_METADATA)  # classes '0', '1', '2'
    folder = tmp_path / 'data'
    for name, digit in (('0', '3'), ('1', '7')):
        shutil.copytree(data / digit, folder / name)
    (folder / '1' / 'loop.png').symlink_to('loop.png')
    assert train_main(['--eval-only', '--init', str(weights), '--data-dir', str(folder),
                       '--eval-image-size', '32', '--batch-size', '4']) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result['images'], result['skipped_images']) == (12, 1)


def test_a_class_folder_that_is_a_symlink_loop_is_refused(tmp_path, data, capsys):
    folder = tmp_path / 'data'
    shutil.copytree(data, folder)
    (folder / 'loop').symlink_to('loop')
    assert train(folder, tmp_path / 'run') == 2
    assert one_error_line(capsys) == (f'error: cannot read {folder / "loop"}: Too many levels of '
                                      'symbolic links')
    assert not (tmp_path / 'run').exists()
