"""Training configuration: one validated dataclass, named presets, and the command line built from
both.

Every field is a flag (`batch_size` -> `--batch-size`); a preset only changes the defaults, so
`python -m train --preset imagenet-s --data-dir /data/imagenet --epochs 90` is the preset with two
overrides. Presets are plain Python below, in the spirit of big_vision's configs. A mistake in the
configuration is a `ConfigError` with a one-line message.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional


class ConfigError(ValueError):
    """A mistake in the configuration (a flag's value, or flags that do not go together); the
    message is one line."""


# The values a string field takes.
CHOICES = {
        'dtype': ('float32', 'bfloat16', 'float16'),
        'optimizer': ('rmsprop', 'sgd', 'adamw'),
        'lr_schedule': ('cosine', 'exponential'),
        'distributed': ('auto', 'on', 'off'),
}
AT_LEAST_ONE = ('batch_size', 'base_batch_size', 'log_every', 'checkpoint_every', 'num_stages',
                'min_image_size', 'keep_checkpoints')
AT_LEAST_ZERO = ('image_size', 'eval_image_size', 'num_workers', 'randaug_layers', 'min_randaug',
                 'randaug', 'min_mixup', 'mixup', 'cutmix', 'warmup_epochs', 'weight_decay',
                 'grad_clip')
POSITIVE = ('epochs', 'eval_every', 'base_lr', 'decay_rate', 'decay_epochs')
BELOW_ONE = ('min_dropout', 'dropout', 'momentum', 'label_smoothing', 'ema_decay')  # in [0, 1)


def flag(name: str) -> str:
    """The command-line flag of a `TrainConfig` field: `batch_size` -> `--batch-size`."""
    return '--' + name.replace('_', '-')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Data: an image folder (one subfolder per class, or train/ and val/ of such), or None for
    # scikit-learn's digits written as an image folder under `workdir`.
    data_dir: Optional[str] = None
    val_split: float = 0.1  # fraction held out when data_dir has no val/ folder
    workdir: str = 'runs/digits'
    num_workers: int = 0  # grain worker processes per host (0: decode in the main process)

    # Model.
    variant: str = 'b0'
    init: Optional[str] = None  # converted weights (`python -m convert`) to start from
    freeze_backbone: bool = False  # train only the classifier; BN statistics stay fixed too
    drop_path_rate: float = 0.2
    dtype: str = 'float32'  # compute dtype; 'bfloat16' keeps float32 params and BN statistics
    remat: bool = False

    # Schedule: epochs split into `num_stages` progressive-learning stages.
    epochs: float = 12
    batch_size: int = 64  # global, over all devices and processes
    num_stages: int = 3
    min_image_size: int = 24
    image_size: int = 32  # size of the last stage (0: the variant's train size)
    # 0: the variant's eval size (with --eval-only: the size the weights' metadata gives)
    eval_image_size: int = 0
    min_scale: float = 0.7  # random-resized-crop area lower bound (a digit cut to 35% is ambiguous)
    flip: bool = False  # horizontal flips (off for digits, on for natural images)
    randaug_layers: int = 2
    min_randaug: float = 0  # RandAugment magnitude, first stage -> last stage
    randaug: float = 5
    min_mixup: float = 0  # mixup alpha, first -> last stage (0: off)
    mixup: float = 0
    cutmix: float = 0  # cutmix alpha (0: off); with mixup on, each batch picks one of the two
    min_dropout: float = 0.1  # classifier dropout, first -> last stage
    dropout: float = 0.2

    # Optimisation.
    # 'rmsprop' (TF-style, the paper), 'sgd' (WZMIAOMIAO's deep-learning-for-image-processing
    # train.py), 'adamw'
    optimizer: str = 'adamw'
    base_lr: float = 2e-3
    base_batch_size: int = 64  # learning rate = base_lr * batch_size / base_batch_size
    lr_schedule: str = 'cosine'  # 'cosine' (to final_lr_fraction) or 'exponential' (staircase)
    final_lr_fraction: float = 0.01
    decay_rate: float = 0.97  # exponential: lr *= decay_rate every decay_epochs
    decay_epochs: float = 2.4
    warmup_epochs: float = 1
    momentum: float = 0.9
    weight_decay: float = 0.05  # not applied to BN parameters or biases
    label_smoothing: float = 0.1
    grad_clip: float = 0  # global-norm clipping (0: off)
    ema_decay: float = 0.99  # EMA of params and BN statistics (0: off)

    # Bookkeeping.
    seed: int = 0
    log_every: int = 10  # steps
    eval_every: float = 1  # epochs
    checkpoint_every: int = 500  # steps; also at every stage end and at the end
    keep_checkpoints: int = 2
    # Also write the final weights as a folder in timm's Hub format (effnetv2_jax.save_pretrained)
    save_pretrained: Optional[str] = None
    eval_only: bool = False
    tensorboard: bool = False
    # 'auto': jax.distributed.initialize() where a cluster is detected; 'on': always; 'off'
    distributed: str = 'auto'
    coordinator_address: Optional[str] = None  # manual multi-process: host:port, count, id
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self):
        """Raises `ConfigError` for a value no run can use."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f'{flag(name)} must be one of {", ".join(allowed)}, got '
                                  f'{getattr(self, name)!r}')
        for names, least in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
            for name in names:
                if not getattr(self, name) >= least:  # NaN too
                    raise ConfigError(f'{flag(name)} must be at least {least}, got '
                                      f'{getattr(self, name)}')
        for name in POSITIVE:
            if not getattr(self, name) > 0:
                raise ConfigError(f'{flag(name)} must be positive, got {getattr(self, name)}')
        for name in BELOW_ONE:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f'{flag(name)} must be in [0, 1), got {getattr(self, name)}')
        if not 0 < self.min_scale <= 1:
            raise ConfigError(f'--min-scale must be in (0, 1], got {self.min_scale}')
        if not 0 <= self.val_split < 1:
            raise ConfigError(f'--val-split must be in [0, 1), got {self.val_split}')
        if self.eval_only and not self.init:
            raise ConfigError('--eval-only needs --init WEIGHTS')
        if self.eval_only and self.save_pretrained:
            raise ConfigError('--save-pretrained writes the weights a training run ends with; '
                              '--eval-only trains nothing')

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / self.base_batch_size


def _imagenet(variant, randaug, mixup, dropout, epochs=350, batch_size=4096) -> dict[str, Any]:
    """The ImageNet recipe of the EfficientNetV2 paper (arXiv:2104.00298, Table 7 and the
    appendix) and of the official TF code's hparams (google/automl efficientnetv2): 4 progressive
    stages from 128 px."""
    return dict(
            variant=variant, workdir=f'runs/imagenet-{variant}', epochs=epochs,
            batch_size=batch_size, num_stages=4, min_image_size=128, image_size=0,
            eval_image_size=0, min_scale=0.08, flip=True, min_randaug=5, randaug=randaug,
            min_mixup=0, mixup=mixup, min_dropout=0.1, dropout=dropout, optimizer='rmsprop',
            base_lr=0.016, base_batch_size=256, lr_schedule='exponential', warmup_epochs=5,
            weight_decay=1e-5, label_smoothing=0.1, ema_decay=0.9999, dtype='bfloat16',
            num_workers=16, val_split=0, checkpoint_every=2000, keep_checkpoints=3,
            log_every=100)


PRESETS: dict[str, dict[str, Any]] = {
        'digits': {'eval_image_size': 32},
        'imagenet-s': _imagenet('s', randaug=10, mixup=0, dropout=0.2),
        'imagenet-m': _imagenet('m', randaug=15, mixup=0.2, dropout=0.3),
        'imagenet-l': _imagenet('l', randaug=20, mixup=0.5, dropout=0.4),
        # WZMIAOMIAO's deep-learning-for-image-processing train.py: fine-tune converted weights
        # on a small folder (e.g. flowers).
        'finetune': dict(
                variant='s', workdir='runs/finetune', epochs=30, batch_size=8, num_stages=1,
                min_image_size=300, image_size=300, eval_image_size=384, min_scale=0.08,
                flip=True, min_randaug=0, randaug=0, min_dropout=0.2, dropout=0.2,
                optimizer='sgd', base_lr=0.01, base_batch_size=8, lr_schedule='cosine',
                warmup_epochs=0, weight_decay=1e-4, label_smoothing=0.0, ema_decay=0,
                val_split=0.1, num_workers=4, log_every=20, checkpoint_every=1000),
}


BOOLEANS = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}


def _boolean(text: str) -> bool:
    try:
        return BOOLEANS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
                f'{text!r} is not a boolean ({", ".join(BOOLEANS)})') from None


def _flag_type(field: dataclasses.Field):
    kind = str(field.type)
    if 'bool' in kind:
        return _boolean
    if 'int' in kind:
        return int
    if 'float' in kind:
        return float
    return str


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A `ConfigError` (one line, no usage block) instead of printing and exiting."""
        raise ConfigError(f'{message} (see {self.prog} --help)')


def parse_args(argv=None) -> TrainConfig:
    """`--preset NAME` plus one flag per `TrainConfig` field. Unknown flags, values of the wrong
    type and invalid configurations raise `ConfigError`."""
    parser = _Parser(
            prog='python -m train',
            description='Train or fine-tune EfficientNetV2 on an image folder (default: '
                        'scikit-learn digits). Flags override the preset.')
    parser.add_argument('--preset', choices=sorted(PRESETS), help='default: digits')
    for field in dataclasses.fields(TrainConfig):
        if str(field.type) == 'bool':
            # `--freeze-backbone` alone means true; `--flip false` turns a preset's flag off.
            parser.add_argument(flag(field.name), type=_flag_type(field), nargs='?', const=True,
                                default=None, metavar='BOOL')
        else:
            parser.add_argument(flag(field.name), type=_flag_type(field), default=None)
    parser.set_defaults(preset=None)
    args = vars(parser.parse_args(argv))
    name = args.pop('preset')
    # --eval-only follows the weights' own metadata unless a preset is asked for by name.
    preset = PRESETS[name or 'digits'] if name or not args['eval_only'] else {}
    overrides = {k: v for k, v in args.items() if v is not None}
    return dataclasses.replace(TrainConfig(), **{**preset, **overrides})
