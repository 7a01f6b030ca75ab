"""What every command-line tool of this project shares: its argparse set-up, one-line errors and
exit statuses (0 done; 1 `--verify` found the outputs apart; 2 bad input or unusable output)."""
from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path


EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line and exit status 2, instead of argparse's usage block."""
        self.exit(EXIT_BAD_INPUT, f'error: {message} (see {self.prog} --help)\n')


def parser(prog: str, description: str, examples: str = '', *, usage: str | None = None,
           parser_class: type[argparse.ArgumentParser] = _Parser) -> argparse.ArgumentParser:
    """An ArgumentParser for `python -m <prog>` whose `--help` opens with what it does and
    `examples` (verbatim), then the flags; a bad command line exits with status 2 and one line on
    stderr (`parser_class` may handle it otherwise)."""
    return parser_class(
        prog=f'python -m {prog}', usage=usage,
        description=f'{description}\n\nexamples:\n{examples}' if examples else description,
        formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'expected a positive number, got {text!r}')
    return value


# Pretrained names given without their scheme. A timm name needs its tag (in1k, in21k_ft_in1k,
# ra2_in1k...) to name a Hub repository; the tag also tells it from a file (efficientnetv2_s.pth).
_TIMM_NAME = re.compile(r'(timm/)?((tf_)?efficientnetv2_\w+\.\w*in2?1k\w*)')
_TORCHVISION_NAME = re.compile(r'efficientnet_v2_[sml](:\w+)?')


def pretrained_name_like(text: str) -> str | None:
    """The pretrained name `text` probably meant, spelt with its scheme
    ('tf_efficientnetv2_b0.in1k' -> 'hf-hub:timm/tf_efficientnetv2_b0.in1k',
    'efficientnet_v2_s' -> 'torchvision:efficientnet_v2_s'), or None."""
    if match := _TIMM_NAME.fullmatch(text):
        return f'hf-hub:timm/{match[2]}'
    if _TORCHVISION_NAME.fullmatch(text):
        return f'torchvision:{text}'
    return None


def weights_source(text: str):
    """A pretrained name ('hf-hub:...', 'torchvision:...', 'local-dir:...') as given, anything
    else as a Path (argparse type for a weights argument). A path that does not exist but reads
    like a pretrained name without its scheme is an error naming the name meant."""
    from effnetv2_jax.checkpoint import PRETRAINED_SCHEMES
    if text.startswith(PRETRAINED_SCHEMES):
        return text
    meant = pretrained_name_like(text)
    if meant and not Path(text).exists():
        raise argparse.ArgumentTypeError(f'{text}: no such file; for the pretrained weights, '
                                         f'write {meant}')
    return Path(text)


def output_for(source, suffix: str) -> Path:
    """The default output of a command reading `source` (a `weights_source`): the input path with
    `suffix`, or for a pretrained name its last part (repository, model or folder) plus `suffix`
    in the current folder."""
    if isinstance(source, Path):
        return source.with_suffix(suffix)
    return Path(re.split(r'[/:]', source.rstrip('/').split('@')[0])[-1] + suffix)


def fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
    """Prints `error: <message>` as one line on stderr and returns `status` for `sys.exit`."""
    print(f'error: {message}', file=sys.stderr)
    return status


def entry_point(main):
    """Decorates a command's `main(argv=None) -> int`: Ctrl-C ends it with one line and status
    130 instead of a KeyboardInterrupt traceback (outputs are left whole by `files`)."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print('\ninterrupted; nothing half-written is left', file=sys.stderr)
            return EXIT_INTERRUPTED
    return wrapped
