"""Orbax checkpoints of a training run (not the weights file, `effnetv2_jax.checkpoint`): train
state, the grain iterator's position and the stage, what the run was started with (its flags and
classes), and the multi-process preemption sync point.

Saves are asynchronous (the arrays are copied off the devices, then written in the background);
`keep` most recent steps are kept. Restoring builds the state onto the current mesh, so a run
saved on 8 devices resumes on 1 and vice versa. A save that fails (a full disk) is an
`OutputError` of one line that leaves no temporary folder; a checkpoint that cannot be read is
moved aside and the run resumes from the one before. Orbax's own logging is silenced: every
failure it logs reaches the caller as an exception, which the command reports in one line.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from effnetv2_jax.files import OutputError
from effnetv2_jax.messages import first_line, silence_orbax, write_failure
from train.config import ConfigError

TMP_SUFFIX = '.orbax-checkpoint-tmp'  # what Orbax writes a step into before renaming it


class DamagedCheckpoint(Exception):
    """A checkpoint (or an item of it) that cannot be read; the message is one line."""


def _leaves(tree) -> dict[str, tuple]:
    """{'params/stem/conv/kernel': (shape, dtype)} of a tree of arrays or of array metadata."""
    return {jax.tree_util.keystr(path, simple=True, separator='/'):
            (tuple(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class RunCheckpoints:
    """The run checkpoints under `workdir/checkpoints`, the `keep` most recent steps; `run` (a
    JSON-able dict) is saved with each, for a resumed run to compare with its own."""

    def __init__(self, workdir: str, keep: int, num_workers: int = 0, run: dict | None = None):
        silence_orbax()
        self.num_workers = num_workers  # of the run's data iterators
        self.run = run or {}
        self.directory = Path(workdir).absolute() / 'checkpoints'
        self._saving = None  # the step of the save in flight
        self.closed = False
        options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, create=True,
                cleanup_tmp_directories=True)  # what a killed run left
        with self._writing(self.directory):
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def progress(self, step: int, stage: int) -> dict:
        """What goes beside the state at `step`: the step, and the layout its iterator position
        belongs to (stage, process count, grain workers)."""
        return {'step': step, 'stage': stage, 'process_count': jax.process_count(),
                'num_workers': self.num_workers}

    def save(self, step: int, state, data_iterator, stage: int):
        """Starts an asynchronous save of `state`, the iterator position, `progress` and `run`
        at `step` (nothing if `step` is saved already). `OutputError` if this save or the one
        before it fails."""
        if step in self.manager.all_steps():
            return
        self.wait()
        self._saving = step
        with self._writing(self.directory / str(step)):
            self.manager.save(step, force=True, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                    progress=ocp.args.JsonSave(self.progress(step, stage)),
                    run=ocp.args.JsonSave(self.run)))

    def restore_latest(self, abstract_state, check_run: Callable[[dict | None], None]
                       ) -> tuple[object, dict] | None:
        """(state, progress) of the newest checkpoint that can be read, None if there is none;
        the state as `restore_state` places it. `check_run(the run saved with it, None if it
        has none)` raises when the checkpoint is of another run; a state of other shapes than
        `abstract_state` is a `ConfigError`. Newer checkpoints that cannot be read are moved
        aside, each with a warning line; if none can be read, `ConfigError`."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                check_run(self._restore_run(step))
                self._check_shapes(step, abstract_state)
                state = self.restore_state(step, abstract_state)
                progress = self._restore(step, 'progress', ocp.args.JsonRestore())
            except DamagedCheckpoint as e:
                damaged.append((step, str(e)))
                continue
            self._set_aside(damaged, f'resuming from step {step}')
            return state, progress
        if damaged:
            step, reason = damaged[0]
            raise ConfigError(f'checkpoint {self.directory / str(step)} cannot be read ({reason}) '
                              'and there is no earlier one: choose a new --workdir (or move '
                              f'{self.directory} away)')
        return None

    def restore_state(self, step: int, abstract_state):
        """The state at `step`, placed with the shardings of `abstract_state`'s leaves;
        `DamagedCheckpoint` if it cannot be read."""
        return self._restore(step, 'state', ocp.args.StandardRestore(abstract_state))

    def restore_iterator(self, step: int, data_iterator):
        """Moves `data_iterator` to the position saved at `step` (saved with the same layout);
        `DamagedCheckpoint` if it cannot be read."""
        self._restore(step, 'data', grain.checkpoint.CheckpointRestore(data_iterator))

    def reached_preemption(self, step: int) -> bool:
        """Multi-process runs: whether every process is to stop and save at `step` (JAX's
        preemption sync point, agreed between the processes after a SIGTERM to any of them). True
        only at exactly that step, so to be asked at every step; always False in a single process
        or with `jax_enable_preemption_service` off."""
        return self.manager.reached_preemption(step)

    def wait(self):
        """Waits for the save in flight; `OutputError` if it failed."""
        with self._writing(self.directory / str(self._saving)):
            self.manager.wait_until_finished()

    def close(self):
        """Waits for the save in flight (`OutputError` if it failed) and ends the background
        work; once."""
        if not self.closed:
            self.closed = True
            with self._writing(self.directory / str(self._saving)):
                self.manager.close()

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, exc_type, *_):
        """Closes; after an error, quietly (a failed save has been reported already)."""
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.close()

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """A failure inside is `OutputError('cannot write <path>: <why>')`, and leaves no
        temporary folder of Orbax's."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- Orbax and TensorStore raise many kinds
            if jax.process_index() == 0:
                for tmp in self.directory.glob(f'*{TMP_SUFFIX}'):
                    shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f'cannot write {path}: {write_failure(e)}') from e

    def _restore(self, step: int, item: str, args):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
        except Exception as e:  # noqa: BLE001 -- a damaged file fails in any of many ways
            raise DamagedCheckpoint(f"{item}: {first_line(e, 120)}") from e

    def _restore_run(self, step: int) -> dict | None:
        """The `run` saved at `step`; None for a checkpoint saved before runs saved theirs."""
        if not (self.directory / str(step) / 'run').exists():
            return None
        run = self._restore(step, 'run', ocp.args.JsonRestore())
        if not (isinstance(run, dict) and isinstance(run.get('config'), dict)
                and isinstance(run.get('class_names'), list)):
            raise DamagedCheckpoint('run: not the flags and classes of a run')
        return run

    def _check_shapes(self, step: int, abstract_state):
        path = self.directory / str(step) / 'state'
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                tree = getattr(checkpointer.metadata(path).item_metadata, 'tree', None)
        except Exception as e:  # noqa: BLE001 -- as in _restore
            raise DamagedCheckpoint(f"state: {first_line(e, 120)}") from e
        if not tree:
            raise DamagedCheckpoint('no train state in it')
        stored = _leaves(tree)
        asked = _leaves(abstract_state)
        if stored != asked:
            name = min(set(stored.items()) ^ set(asked.items()))[0]
            raise ConfigError(
                    f'checkpoint {path.parent} holds another train state than this run builds '
                    f'({name}: {stored.get(name, "absent")} saved, {asked.get(name, "absent")} '
                    'now): rerun with the flags it was started with or choose a new --workdir')

    def _set_aside(self, damaged: list[tuple[int, str]], outcome: str):
        """Renames the `damaged` steps' folders out of the way of the steps this run saves (a
        folder of someone else's that looks like a step is kept, not overwritten)."""
        if not damaged:
            return
        if jax.process_count() > 1:  # every process has read what it needed from them
            multihost_utils.sync_global_devices('damaged checkpoints found')
        for step, reason in damaged:
            if jax.process_index() == 0:
                aside = tempfile.mkdtemp(dir=self.directory, prefix=f'{step}.damaged-')
                os.replace(self.directory / str(step), aside)  # onto the empty folder
                print(f'warning: checkpoint {self.directory / str(step)} cannot be read '
                      f'({reason}); moved it to {aside}, {outcome}', file=sys.stderr)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices('damaged checkpoints moved')
        self.manager.reload()
