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
import os
import textwrap
from typing import Any, Optional

from effnetv2_jax import cli


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


def _field(default, group: str, help: str, metavar: Optional[str] = None):
    """A `TrainConfig` field with its `--help` line and argument group (`GROUPS`) beside it."""
    return dataclasses.field(default=default,
                             metadata={'group': group, 'help': help, 'metavar': metavar})


# The argument groups of `python -m train --help`, in order.
GROUPS = {
        'data': 'data',
        'model': 'model and starting weights',
        'schedule': 'schedule (progressive learning: image size and regularisation grow by stage)',
        'augmentation': 'augmentation and regularisation (first stage -> last stage)',
        'optimizer': 'optimizer',
        'checkpoints': 'logging, evaluation, checkpoints and outputs',
        'distributed': 'distributed (multi-host)',
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data_dir: Optional[str] = _field(
            None, 'data', 'image folder (one subfolder per class, or train/ and val/ of such), '
            'or a folder python -m train.pack wrote (local or gs://); none: scikit-learn digits '
            'written under --workdir', 'DIR')
    val_split: float = _field(0.1, 'data', 'fraction held out when --data-dir has no val/ folder')
    num_workers: int = _field(
            0, 'data', 'grain worker processes per host decoding images (0: in the main '
            "process); a preset's value is capped at the CPU cores this process may use")

    variant: str = _field('b0', 'model', 's, m, l, xl, b0..b3', 'NAME')
    init: Optional[str] = _field(
            None, 'model', 'weights to start from: a file python -m convert or python -m train '
            'wrote, or a pretrained name (hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k, '
            'torchvision:efficientnet_v2_s); none: random', 'WEIGHTS')
    freeze_backbone: bool = _field(
            False, 'model', 'train only the classifier; BN statistics stay fixed too')
    drop_path_rate: float = _field(0.2, 'model', 'stochastic depth, from 0 at the first block to '
                                    'this at the last')
    dtype: str = _field(
            'float32', 'model', "compute dtype; 'bfloat16' keeps float32 params and BN statistics")
    remat: bool = _field(False, 'model', 'recompute activations in the backward pass (less memory)')
    eval_only: bool = _field(
            False, 'model', 'evaluate --init on the validation set and exit (the eval transform '
            "follows the weights' metadata unless --preset is given)")

    epochs: float = _field(12, 'schedule', 'length of the run')
    batch_size: int = _field(64, 'schedule', 'global batch, over all devices and processes')
    num_stages: int = _field(3, 'schedule', 'progressive-learning stages the epochs split into')
    min_image_size: int = _field(24, 'schedule', 'train image size of the first stage')
    image_size: int = _field(32, 'schedule', "train image size of the last stage (0: the "
                             "variant's train size)")
    eval_image_size: int = _field(
            0, 'schedule', "eval image size (0: the variant's eval size; with --eval-only: the "
            "size the weights' metadata gives)")
    seed: int = _field(0, 'schedule', 'initialisation, data order and augmentation')

    min_scale: float = _field(
            0.7, 'augmentation', 'random-resized-crop area lower bound (a digit cut to 35%% is '
            'ambiguous)')
    flip: bool = _field(False, 'augmentation', 'horizontal flips (off for digits, on for '
                        'natural images)')
    randaug_layers: int = _field(2, 'augmentation', 'RandAugment operations per image')
    min_randaug: float = _field(0, 'augmentation', 'RandAugment magnitude of the first stage')
    randaug: float = _field(5, 'augmentation', 'RandAugment magnitude of the last stage')
    min_mixup: float = _field(0, 'augmentation', 'mixup alpha of the first stage (0: off)')
    mixup: float = _field(0, 'augmentation', 'mixup alpha of the last stage (0: off)')
    cutmix: float = _field(0, 'augmentation', 'cutmix alpha (0: off); with mixup on, each batch '
                           'picks one of the two')
    min_dropout: float = _field(0.1, 'augmentation', 'classifier dropout of the first stage')
    dropout: float = _field(0.2, 'augmentation', 'classifier dropout of the last stage')

    # 'sgd' is WZMIAOMIAO's deep-learning-for-image-processing train.py.
    optimizer: str = _field('adamw', 'optimizer', "'rmsprop' (TF-style, the paper's), 'sgd', "
                            "'adamw'")
    base_lr: float = _field(2e-3, 'optimizer', 'learning rate at --base-batch-size')
    base_batch_size: int = _field(
            64, 'optimizer', 'learning rate = base_lr * batch_size / base_batch_size')
    lr_schedule: str = _field('cosine', 'optimizer', "'cosine' (to --final-lr-fraction) or "
                              "'exponential' (staircase)")
    final_lr_fraction: float = _field(0.01, 'optimizer', 'cosine: the last learning rate over '
                                      'the peak')
    decay_rate: float = _field(0.97, 'optimizer', 'exponential: lr *= decay_rate every '
                               '--decay-epochs')
    decay_epochs: float = _field(2.4, 'optimizer', 'exponential: epochs between decays')
    warmup_epochs: float = _field(1, 'optimizer', 'linear warm-up from 0')
    momentum: float = _field(0.9, 'optimizer', 'sgd and rmsprop momentum (adamw: unused)')
    weight_decay: float = _field(0.05, 'optimizer', 'not applied to BN parameters or biases')
    label_smoothing: float = _field(0.1, 'optimizer', 'of the cross-entropy targets')
    grad_clip: float = _field(0, 'optimizer', 'global-norm gradient clipping (0: off)')
    ema_decay: float = _field(0.99, 'optimizer', 'EMA of params and BN statistics, evaluated and '
                              'saved (0: off)')

    workdir: str = _field('runs/digits', 'checkpoints', 'checkpoints, metrics, curves and the '
                          'final weights; a run there resumes', 'DIR')
    log_every: int = _field(10, 'checkpoints', 'steps between training log lines')
    eval_every: float = _field(1, 'checkpoints', 'epochs between evaluations')
    checkpoint_every: int = _field(500, 'checkpoints', 'steps between checkpoints (also at every '
                                   'stage end and at the end)')
    keep_checkpoints: int = _field(2, 'checkpoints', 'checkpoints kept in --workdir')
    save_pretrained: Optional[str] = _field(
            None, 'checkpoints', "also write the final weights as a folder in timm's Hub format",
            'DIR')
    tensorboard: bool = _field(False, 'checkpoints', 'also write TensorBoard event files')

    distributed: str = _field('auto', 'distributed', "'auto': jax.distributed.initialize() where "
                              "a cluster is detected; 'on': always; 'off'")
    coordinator_address: Optional[str] = _field(
            None, 'distributed', 'manual multi-process: the coordinator, with --num-processes '
            'and --process-id', 'HOST:PORT')
    num_processes: Optional[int] = _field(None, 'distributed', 'manual multi-process: how many')
    process_id: Optional[int] = _field(None, 'distributed', 'manual multi-process: this one')

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


# What each preset is for; `python -m train --help` adds its main settings.
PRESET_PURPOSES = {
        'digits': 'a B0 from scratch on scikit-learn digits in a few minutes on a '
                  'CPU, to see the whole loop work',
        'imagenet-s': "the paper's ImageNet recipe for S: 4 stages from 128 px to the "
                      "variant's train size",
        'imagenet-m': "the paper's ImageNet recipe for M",
        'imagenet-l': "the paper's ImageNet recipe for L",
        'finetune': 'fine-tune pretrained S weights (--init, required) on a small folder such as '
                    "flowers, as WZMIAOMIAO's train.py does",
}
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


# The settings `--help` names for each preset.
PRESET_SUMMARY = ('variant', 'epochs', 'batch_size', 'optimizer', 'base_lr', 'num_workers')

DESCRIPTION = """\
Train or fine-tune EfficientNetV2 on an image folder (default: scikit-learn digits), with
progressive learning; --eval-only evaluates weights instead. A preset sets the defaults, flags
override them.

examples:
  python -m train                                   # digits, B0 from scratch
  python -m train --preset finetune --data-dir flowers \\
      --init hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k
  python -m train --preset imagenet-s --data-dir /data/imagenet --epochs 90
  python -m train --eval-only --init runs/finetune/model.msgpack --data-dir flowers
"""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def preset(name: str) -> dict[str, Any]:
    """The settings of preset `name` on this machine. Its worker count is an upper bound: more
    decoding processes than cores only take turns with each other and the training step
    (finetune's 4 workers on 2 cores: 9 img/s, 57% of each step waiting for data)."""
    settings = PRESETS[name]
    if 'num_workers' in settings:
        settings = {**settings, 'num_workers': min(settings['num_workers'], available_cores())}
    return settings


def _describe_presets() -> str:
    """Each preset's purpose and main settings, wrapped for `--help`."""
    paragraphs = []
    for name, purpose in PRESET_PURPOSES.items():
        settings = {**dataclasses.asdict(TrainConfig()), **preset(name)}
        main = ', '.join(f'{flag(k)} {settings[k]}' for k in PRESET_SUMMARY)
        paragraphs.append(textwrap.fill(f'{name}: {purpose} ({main})', 88,
                                        initial_indent='  ', subsequent_indent='      '))
    return '\n'.join(paragraphs)


def _range(name: str) -> str:
    """The values field `name` accepts, as `--help` says them ('' for any)."""
    if name in CHOICES:
        return 'one of ' + ', '.join(CHOICES[name])
    for names, text in ((AT_LEAST_ONE, '>= 1'), (AT_LEAST_ZERO, '>= 0'), (POSITIVE, '> 0'),
                        (BELOW_ONE, 'in [0, 1)')):
        if name in names:
            return text
    return {'min_scale': 'in (0, 1]', 'val_split': 'in [0, 1)'}.get(name, '')


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


def _init_weights(text: str) -> str:
    """--init as given, once `cli.weights_source` has found it plausible (argparse type)."""
    cli.weights_source(text)
    return text


def _help(field: dataclasses.Field) -> str:
    """The `--help` line of a field: what it does, the values it takes, its default (without
    --preset: digits')."""
    default = preset('digits').get(field.name, field.default)
    default = 'none' if default is None else default
    accepted = _range(field.name)
    return f"{field.metadata['help']} ({accepted + '; ' if accepted else ''}default: {default})"


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m train`: `--preset` and one flag per `TrainConfig` field, in the
    field's group; every default is None, so that only the flags given override the preset."""
    parser = cli.parser('train', DESCRIPTION, parser_class=_Parser,
                        usage='%(prog)s [--preset NAME] [--FLAG VALUE ...]')
    presets = parser.add_argument_group(
            'presets', 'each sets the defaults of the flags below (main settings in brackets):\n'
            + _describe_presets())
    presets.add_argument('--preset', choices=PRESETS, metavar='NAME',
                         help='one of ' + ', '.join(PRESETS) + ' (default: digits)')
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for field in dataclasses.fields(TrainConfig):
        group = groups[field.metadata['group']]
        if str(field.type) == 'bool':
            # `--freeze-backbone` alone means true; `--flip false` turns a preset's flag off.
            group.add_argument(flag(field.name), type=_flag_type(field), nargs='?', const=True,
                               default=None, metavar='BOOL', help=_help(field))
            continue
        metavar = field.metadata['metavar'] or (
                '{' + ','.join(CHOICES[field.name]) + '}' if field.name in CHOICES
                else {int: 'N', float: 'X'}.get(_flag_type(field), 'TEXT'))
        kind = _init_weights if field.name == 'init' else _flag_type(field)
        group.add_argument(flag(field.name), type=kind, default=None, metavar=metavar,
                           help=_help(field))
    return parser


def _pretrained_weights_for(variant: str) -> str:
    """timm's ImageNet weights of `variant` (21k-pretrained where there are such)."""
    tag = 'in21k_ft_in1k' if variant in ('s', 'm', 'l', 'xl') else 'in1k'
    return f'hf-hub:timm/tf_efficientnetv2_{variant}.{tag}'


def parse_args(argv=None) -> TrainConfig:
    """`--preset NAME` plus one flag per `TrainConfig` field. Unknown flags, values of the wrong
    type and invalid configurations raise `ConfigError`."""
    args = vars(build_parser().parse_args(argv))
    name = args.pop('preset')
    # --eval-only follows the weights' own metadata unless a preset is asked for by name.
    defaults = preset(name or 'digits') if name or not args['eval_only'] else {}
    overrides = {k: v for k, v in args.items() if v is not None}
    config = dataclasses.replace(TrainConfig(), **{**defaults, **overrides})
    if name == 'finetune' and not config.init:
        raise ConfigError(f'--preset finetune needs the weights to start from: add --init '
                          f'{_pretrained_weights_for(config.variant)} (or a file python -m '
                          f'convert wrote)')
    return config
