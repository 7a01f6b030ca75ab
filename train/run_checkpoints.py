"""Orbax checkpoints of a training run (not the weights file, `effnetv2_jax.checkpoint`): train
state, the grain iterator's position and the stage, and the multi-process preemption sync point.

Saves are asynchronous (the arrays are copied off the devices, then written in the background);
`keep` most recent steps are kept. Restoring builds the state onto the current mesh, so a run
saved on 8 devices resumes on 1 and vice versa.
"""
from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp


class RunCheckpoints:
    """The run checkpoints under `workdir/checkpoints`, the `keep` most recent steps."""

    def __init__(self, workdir: str, keep: int, num_workers: int = 0):
        self.num_workers = num_workers  # of the run's data iterators
        self.manager = ocp.CheckpointManager(
                Path(workdir).absolute() / 'checkpoints',
                options=ocp.CheckpointManagerOptions(
                        max_to_keep=keep, enable_async_checkpointing=True, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def progress(self, step: int, stage: int) -> dict:
        """What goes beside the state at `step`: the step, and the layout its iterator position
        belongs to (stage, process count, grain workers)."""
        return {'step': step, 'stage': stage, 'process_count': jax.process_count(),
                'num_workers': self.num_workers}

    def save(self, step: int, state, data_iterator, stage: int):
        """Starts an asynchronous save of `state`, the iterator position and `progress` at
        `step` (nothing if `step` is saved already)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                progress=ocp.args.JsonSave(self.progress(step, stage))))

    def restore_progress(self, step: int) -> dict:
        """The `progress` saved with the checkpoint at `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(
                progress=ocp.args.JsonRestore()))['progress']

    def restore_state(self, step: int, abstract_state):
        """The state at `step`, placed with the shardings of `abstract_state`'s leaves
        (`jax.ShapeDtypeStruct`s with `.sharding`)."""
        return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))['state']

    def restore_iterator(self, step: int, data_iterator):
        """Moves `data_iterator` to the saved position (saved with the same layout)."""
        self.manager.restore(step, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(data_iterator)))

    def reached_preemption(self, step: int) -> bool:
        """Multi-process runs: whether every process is to stop and save at `step` (JAX's
        preemption sync point, agreed between the processes after a SIGTERM to any of them). True
        only at exactly that step, so to be asked at every step; always False in a single process
        or with `jax_enable_preemption_service` off."""
        return self.manager.reached_preemption(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
