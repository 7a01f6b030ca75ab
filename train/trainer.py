"""The train and eval steps and their state, jitted with explicit shardings over a device mesh.

The batch is sharded over the mesh's `data` axis and the state is replicated; XLA partitions the
step, so BatchNorm means and variances are over the global batch (an all-reduce), exactly as one
device would compute them. `state_shardings` is the one place to change for an FSDP axis.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effnetv2_jax import EfficientNetV2
from effnetv2_jax.model import abstract_variables
from effnetv2_jax.transforms import normalize
from train.config import ConfigError, TrainConfig

DATA_AXIS = 'data'


class TrainState(struct.PyTreeNode):
    """What a train step updates (and a run checkpoint holds)."""
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    # The moving average of the model variables {'params', 'batch_stats'}; None (an empty
    # pytree: nothing stored, saved or sharded) when EMA is off.
    ema: Optional[dict] = None

    def weights(self) -> dict[str, dict]:
        """The named variable sets to evaluate: {'raw': {'params', 'batch_stats'}, and 'ema'
        with EMA on}. Of a state of shardings or of shapes, the same tree of those."""
        raw = {'params': self.params, 'batch_stats': self.batch_stats}
        return {'raw': raw} if self.ema is None else {'raw': raw, 'ema': self.ema}


class StepConfig(NamedTuple):
    """What `train_step` reads of the run's configuration; hashable, so it can be a static
    argument of a jitted step."""
    label_smoothing: float
    mixup: float  # alpha of this progressive stage (0: off)
    cutmix: float  # alpha (0: off)
    ema_decay: float  # 0: off
    freeze_backbone: bool

    @classmethod
    def of(cls, config: TrainConfig, mixup: float) -> StepConfig:
        """The step configuration of `config` in a stage with mixup alpha `mixup`."""
        return cls(label_smoothing=config.label_smoothing, mixup=mixup, cutmix=config.cutmix,
                   ema_decay=config.ema_decay, freeze_backbone=config.freeze_backbone)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices`, by default every device of every process, in process order (how
    `jax.make_array_from_process_local_data` lays out process-local batches); ahead-of-time
    compilation passes the compile-only devices of a described topology."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(mesh: Mesh, state) -> Any:
    """Shardings of a train state, or of its variables (`TrainState.weights()`): replicated; an
    FSDP variant would shard large kernels over a second axis here."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), state)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global arrays sharded over `data` (rows in process order)."""
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in local_batch.items()}


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup, then cosine to `final_lr_fraction` or staircase exponential decay."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    total = max(int(config.epochs * steps_per_epoch), warmup + 1)
    if config.lr_schedule == 'cosine':
        return optax.warmup_cosine_decay_schedule(
                0.0, config.lr, warmup, total, end_value=config.lr * config.final_lr_fraction)
    if config.lr_schedule == 'exponential':
        decay = optax.exponential_decay(
                config.lr, max(1, int(config.decay_epochs * steps_per_epoch)),
                config.decay_rate, staircase=True)
        if warmup == 0:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay],
                                    [warmup])
    raise ConfigError(f"lr_schedule must be 'cosine' or 'exponential', got "
                      f'{config.lr_schedule!r}')


def _is_head(path) -> bool:
    return path[0].key == 'classifier'


def make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The configured optimizer; weight decay skips BN parameters and biases (rank < 2)."""
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1)
    if config.optimizer == 'adamw':
        tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
    elif config.optimizer in ('rmsprop', 'sgd'):
        if config.optimizer == 'rmsprop':
            # TF's RMSProp as in the paper's code: epsilon inside the square root, momentum.
            core = optax.rmsprop(schedule, decay=0.9, eps=1e-3, eps_in_sqrt=True,
                                 momentum=config.momentum)
        else:
            core = optax.sgd(schedule, momentum=config.momentum)
        # L2 added to the gradient, as TF's loss term and torch's SGD(weight_decay=) do.
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask), core)
    else:
        raise ConfigError(f"optimizer must be 'rmsprop', 'sgd' or 'adamw', got "
                          f'{config.optimizer!r}')
    if config.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    if config.freeze_backbone:
        labels = functools.partial(jax.tree_util.tree_map_with_path,
                                   lambda path, _: 'head' if _is_head(path) else 'frozen')
        tx = optax.multi_transform({'head': tx, 'frozen': optax.set_to_zero()}, labels)
    return tx


def create_state(tx: optax.GradientTransformation, variables, *, ema: bool) -> TrainState:
    """A fresh state from model variables `{'params', 'batch_stats'}`; with `ema`, their moving
    average starts as the variables."""
    params, batch_stats = variables['params'], variables['batch_stats']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params),
                      ema={'params': params, 'batch_stats': batch_stats} if ema else None)


def abstract_state(mesh: Mesh, tx: optax.GradientTransformation, model: EfficientNetV2, *,
                   ema: bool) -> tuple[TrainState, Any]:
    """(the train state of `model` as `jax.ShapeDtypeStruct`s carrying their shardings on `mesh`,
    those shardings): what restoring a checkpoint or compiling ahead of time needs, nothing
    allocated."""
    state = jax.eval_shape(functools.partial(create_state, tx, ema=ema), abstract_variables(model))
    sharding = state_shardings(mesh, state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, sharding), sharding


def _mix(key, images, targets, mixup_alpha: float, cutmix_alpha: float):
    """Mixup or CutMix of the batch with its reverse (one of the two per batch when both are on).

    images float32 [B, H, W, 3], targets float32 [B, C] -> same shapes.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_choice, k_mixup, k_cutmix, k_y, k_x = jax.random.split(key, 5)
    reversed_images, reversed_targets = images[::-1], targets[::-1]
    results = []
    if mixup_alpha > 0:
        lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
        results.append((lam * images + (1 - lam) * reversed_images, lam))
    if cutmix_alpha > 0:
        lam = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha)
        height, width = images.shape[1:3]
        cut_h, cut_w = height * jnp.sqrt(1 - lam), width * jnp.sqrt(1 - lam)
        center_y = jax.random.uniform(k_y, (), maxval=height)
        center_x = jax.random.uniform(k_x, (), maxval=width)
        rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
        inside = ((rows >= jnp.round(center_y - cut_h / 2))
                  & (rows < jnp.round(center_y + cut_h / 2))
                  & (cols >= jnp.round(center_x - cut_w / 2))
                  & (cols < jnp.round(center_x + cut_w / 2)))
        lam = 1 - jnp.mean(inside)  # the area actually pasted
        results.append((jnp.where(inside[None, :, :, None], reversed_images, images), lam))
    if len(results) == 2:
        use_cutmix = jax.random.bernoulli(k_choice)
        (mixed_a, lam_a), (mixed_b, lam_b) = results
        images, lam = jnp.where(use_cutmix, mixed_b, mixed_a), jnp.where(use_cutmix, lam_b, lam_a)
    else:
        images, lam = results[0]
    return images, lam * targets + (1 - lam) * reversed_targets


def train_step(state: TrainState, batch, *, model: EfficientNetV2, tx, schedule, spec: dict,
               base_key, step_config: StepConfig) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch {'image': uint8 [B, H, W, 3], 'label': int32 [B]}.

    Randomness (mixing, dropout, drop path) is `fold_in(base_key, step)`: a resumed run draws
    the same numbers as an uninterrupted one.
    """
    key = jax.random.fold_in(base_key, state.step)
    k_mix, k_dropout, k_drop_path = jax.random.split(key, 3)
    images = normalize(batch['image'], spec)
    targets = jax.nn.one_hot(batch['label'], model.num_classes, dtype=jnp.float32)
    images, targets = _mix(k_mix, images, targets, step_config.mixup, step_config.cutmix)
    targets = optax.smooth_labels(targets, step_config.label_smoothing)

    def loss_fn(params):
        logits, updates = model.apply(
                {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
                mutable=['batch_stats'], rngs={'dropout': k_dropout, 'drop_path': k_drop_path})
        return optax.softmax_cross_entropy(logits, targets).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    # A frozen backbone keeps its BN statistics too: its features must not drift.
    batch_stats = state.batch_stats if step_config.freeze_backbone else updates['batch_stats']
    ema = None
    if step_config.ema_decay > 0:
        # TF's ExponentialMovingAverage(num_updates=step): short warm-up of the decay.
        decay = jnp.minimum(step_config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        average = lambda ema, new: decay * ema + (1 - decay) * new  # noqa: E731
        ema = jax.tree.map(average, state.ema, {'params': params, 'batch_stats': batch_stats})
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state, ema=ema)
    metrics = {'loss': loss, 'top1': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
               'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
    return new_state, metrics


def eval_step(weights: dict[str, dict], batch, *, model: EfficientNetV2, spec: dict) -> dict:
    """Sums over a padded global batch {'image', 'label', 'mask': float32 [B]} for each named
    variable set of `weights` ({name: {'params', 'batch_stats'}}, e.g. `TrainState.weights()`):
    {'<name>/loss', '<name>/top1', '<name>/top5' for each name, 'count'} (float32)."""
    images, labels, mask = normalize(batch['image'], spec), batch['label'], batch['mask']
    sums = {'count': jnp.sum(mask)}
    for name, variables in weights.items():
        logits = model.apply(variables, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        sums[f'{name}/loss'] = jnp.sum(loss * mask)
        sums[f'{name}/top1'] = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
        sums[f'{name}/top5'] = jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask)
    return sums


# Generous: a barrier only waits for the slowest process's compilation; a process that dies is
# noticed sooner by the coordination service's heartbeats.
COMPILE_BARRIER_TIMEOUT_SECONDS = 3600


def compiled_together(jitted: Callable, name: str) -> Callable:
    """`jitted`, except that with several processes each new input signature is compiled ahead
    of its first run, which starts only once every process has compiled it. The CPU collectives
    (gloo) give up after 30 s, and processes that share a machine can finish compiling further
    apart than that."""
    if jax.process_count() == 1:
        return jitted
    barrier = ocp.multihost.get_barrier_sync_fn()
    executables = {}

    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        signature = (tree, tuple((x.shape, x.dtype) for x in leaves))
        if signature not in executables:
            executables[signature] = jitted.lower(*args).compile()
            barrier(key=f'{name} compiled ({len(executables)})',
                    timeout_ms=COMPILE_BARRIER_TIMEOUT_SECONDS * 1000)
        return executables[signature](*args)
    return call


def jit_train_step(mesh: Mesh, state_sharding, *, model: EfficientNetV2, tx, schedule,
                   spec: dict, base_key, step_config: StepConfig,
                   name: str = 'train step') -> Callable:
    """`train_step` with these settings, jitted for the mesh (state replicated and donated,
    batch over `data`) and compiled together across processes under `name` (unique per run)."""
    replicated = NamedSharding(mesh, P())
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, spec=spec,
                             base_key=base_key, step_config=step_config)
    return compiled_together(jax.jit(step, in_shardings=(state_sharding, data_sharding(mesh)),
                                     out_shardings=(state_sharding, replicated),
                                     donate_argnums=0), name)


def jit_eval_step(mesh: Mesh, weights_sharding, *, model: EfficientNetV2, spec: dict) -> Callable:
    """`eval_step` for `model` and `spec`, jitted for the mesh (weights as `weights_sharding`,
    batch over `data`)."""
    replicated = NamedSharding(mesh, P())
    step = functools.partial(eval_step, model=model, spec=spec)
    return compiled_together(jax.jit(step, in_shardings=(weights_sharding, data_sharding(mesh)),
                                     out_shardings=replicated), 'eval step')
