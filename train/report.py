"""What a run shows and leaves behind: a progress bar, metrics as JSON lines (optionally
TensorBoard) averaged over the steps between log lines, training throughput, and a PNG of the
training curves. Only process 0 reports."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from effnetv2_jax.files import OutputError, OutputKind, atomic_write
from effnetv2_jax.messages import write_failure
from train.config import ConfigError

METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'curves.png'
DATA_WAIT_LIMIT = 0.10  # beyond this fraction of the run waiting for data, the run says so


def _metrics_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and type(row.get('step')) is int else None


def read_metrics_log(path: Path) -> tuple[list[dict], bool]:
    """(the rows of the metrics log `path`, whether its last line was torn and left out). A torn
    or blank last line is what a run killed or out of disk space while appending leaves; any
    other line that is not a row {'step': int, ...}, or a file of one such line alone, makes it
    someone else's file: ValueError."""
    lines = path.read_text(errors='replace').splitlines()
    rows = [_metrics_row(line) for line in lines]
    torn = bool(rows) and rows[-1] is None
    if torn:
        rows.pop()
    if None in rows or (torn and not rows and lines[-1].strip()):
        raise ValueError(f'{path} is not a metrics log of python -m train')
    return rows, torn


def _is_metrics_log(path: Path) -> bool:
    try:
        read_metrics_log(path)
        return True
    except (OSError, ValueError):
        return False


def _is_png(path: Path) -> bool:
    try:
        with open(path, 'rb') as f:
            return f.read(8) == b'\x89PNG\r\n\x1a\n'
    except OSError:
        return False


# What a run writes into its workdir besides checkpoints, and how a rerun recognises its own.
WORKDIR_OUTPUTS = {METRICS_FILE: OutputKind('a metrics log of python -m train', _is_metrics_log),
                   PLOT_FILE: OutputKind('a PNG image', _is_png)}


class Reporter:
    def __init__(self, workdir: str, total_steps: int, first_step: int, tensorboard: bool = False):
        self.enabled = jax.process_index() == 0
        self.workdir = Path(workdir)
        self.writer = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ConfigError('--tensorboard needs `pip install tensorboardX`') from None
            self.writer = SummaryWriter(str(self.workdir / 'tensorboard'))
        if self.enabled:
            self._forget_after(first_step)
        self.bar = tqdm(total=total_steps, initial=first_step, unit='step', dynamic_ncols=True,
                        disable=not self.enabled, smoothing=0.1)

    def _forget_after(self, step: int):
        """A resumed run repeats the steps after its checkpoint: drop their old lines, and a
        torn last line (with a warning)."""
        path = self.workdir / METRICS_FILE
        if not path.exists():
            return
        rows, torn = read_metrics_log(path)
        if torn:
            print(f'warning: the last line of {path} was cut short (the run writing it was '
                  'killed or out of disk space); dropped it', file=sys.stderr)
        kept = ''.join(json.dumps(row) + '\n' for row in rows if row['step'] <= step)
        atomic_write(path, lambda tmp: tmp.write_text(kept), WORKDIR_OUTPUTS[METRICS_FILE])

    def advance(self, steps: int, postfix: dict[str, str]):
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(steps)

    def write(self, step: int, metrics: dict[str, float]):
        """Appends one JSON line {'step', 'time', **metrics} (and TensorBoard scalars)."""
        if not self.enabled:
            return
        path = self.workdir / METRICS_FILE
        try:
            with open(path, 'a') as f:
                f.write(json.dumps({'step': step, 'time': time.time(), **metrics}) + '\n')
        except OSError as e:
            raise OutputError(f'cannot write {path}: {write_failure(e)}') from None
        if self.writer:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def print(self, line: str):
        if self.enabled:
            self.bar.write(line)

    def warn(self, line: str):
        """`line` on stderr, on a line of its own beside the progress bar (of any process)."""
        self.bar.write(line, file=sys.stderr)

    def close(self):
        """Ends the progress bar's line and the TensorBoard file; once."""
        self.bar.close()
        if self.writer:
            self.writer.close()
            self.writer = None


class MetricsWindow:
    """The step metrics since the last log line, averaged when it is written."""

    def __init__(self):
        self.steps: list[dict] = []

    def add(self, metrics: dict):
        """One step's metrics (device scalars; fetched only when averaged)."""
        self.steps.append(metrics)

    def __len__(self) -> int:
        return len(self.steps)

    def pop_average(self) -> dict[str, float]:
        """{'train/<name>': mean over the window's steps}; starts the next window."""
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(self.steps))
        self.steps = []
        return {f'train/{k}': float(np.mean(v)) for k, v in stacked.items()}


class Throughput:
    """Training images per second, and the fraction of the time the loop waits for its next
    batch. A window is the time between log lines; the first window of each stage (which
    compiles its step and starts the input pipeline) and the time spent evaluating are left out
    of the run's averages."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.images, self.seconds, self.waited = 0, 0.0, 0.0
        self.start_stage()

    def start_stage(self):
        self.window_start, self.window_waited, self.compiling = time.time(), 0.0, True

    @contextlib.contextmanager
    def waiting_for_data(self, previous_step=None):
        """Time spent inside the block (getting the next batch) is waiting for data.

        `previous_step`, an output of the step before the one just dispatched, is waited for
        first, untimed: the loop then runs at most one step ahead of the device, so a batch the
        input pipeline had ready in time counts as no wait, however far ahead the loop could
        otherwise have run while the device was busy."""
        jax.block_until_ready(previous_step)
        start = time.time()
        try:
            yield
        finally:
            self.window_waited += time.time() - start

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside the block (evaluation) is not training time: it is left out of the
        window it falls in."""
        start = time.time()
        try:
            yield
        finally:
            self.window_start += time.time() - start

    def end_window(self, steps: int) -> tuple[float, float]:
        """Closes a window of `steps` steps; returns its img/s and the fraction of its time spent
        waiting for data (compilation included)."""
        now = time.time()
        seconds = now - self.window_start
        if not self.compiling:
            self.images += steps * self.batch_size
            self.seconds += seconds
            self.waited += self.window_waited
        waited = self.window_waited / seconds
        self.compiling = False
        self.window_start, self.window_waited = now, 0.0
        return steps * self.batch_size / seconds, waited

    @property
    def images_per_second(self) -> float | None:
        """The run's average over its measured windows (None when there were none)."""
        return self.images / self.seconds if self.seconds else None

    @property
    def data_wait(self) -> float | None:
        """The fraction of the measured windows' time spent waiting for data (None when there
        were none)."""
        return self.waited / self.seconds if self.seconds else None


def data_wait_warning(data_wait: float | None, num_workers: int) -> str | None:
    """The end-of-run line when the loop waited for data more than `DATA_WAIT_LIMIT` of the
    time, else None."""
    if data_wait is None or data_wait <= DATA_WAIT_LIMIT:
        return None
    return (f'warning: the training loop waited for data {data_wait:.0%} of the time (over '
            f'{DATA_WAIT_LIMIT:.0%}): the input pipeline is the bottleneck; raise --num-workers '
            f'(now {num_workers}) to decode in more processes')


def plot_curves(workdir: str) -> Path | None:
    """Draws train loss, learning rate and eval top-1 (raw and EMA) against step into
    `workdir/curves.png`; returns its path (None if nothing was logged)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return None
    rows, _ = read_metrics_log(path)

    def series(name):
        points = [(r['step'], r[name]) for r in rows if name in r]
        return list(zip(*points)) if points else ([], [])

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(*series('train/loss'), label='train loss')
    axes[0].plot(*series('eval/raw/loss'), 'o-', label='eval loss')
    axes[1].plot(*series('train/lr'))
    for name, label in (('eval/raw/top1', 'raw'), ('eval/ema/top1', 'EMA')):
        axes[2].plot(*series(name), 'o-', label=label)
    for ax, title in zip(axes, ('loss', 'learning rate', 'validation top-1')):
        ax.set_title(title)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend()
    fig.tight_layout()
    out = Path(workdir) / PLOT_FILE
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format='png'),
                 WORKDIR_OUTPUTS[PLOT_FILE])
    plt.close(fig)
    return out
