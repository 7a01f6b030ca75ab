"""`python -m effnetv2_jax.predict IMAGE... --weights W [--top-k 5] [--json]`: top-k classes of
images, through the eval transform the weights' source expects (`Predictor`).

Exit status: 0 done; 2 bad input (an unreadable image or weights, a bad flag, weights or a
transform that could only give NaN: one line on stderr); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import jax.numpy as jnp

from effnetv2_jax import cli
from effnetv2_jax.predictor import Predictor
from effnetv2_jax.transforms import MAX_IMAGE_SIZE, RESAMPLING, image_size

EXAMPLES = """\
  python -m effnetv2_jax.predict cat.jpg --weights hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k
  python -m effnetv2_jax.predict cat.jpg --weights efficientnetv2_s.msgpack
  python -m effnetv2_jax.predict photos/*.jpg --weights flowers.msgpack --labels class_indices.json
  python -m effnetv2_jax.predict cat.jpg --weights s.msgpack --size 320 --json
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser('effnetv2_jax.predict', 'Classify images with EfficientNetV2 weights, through '
                   'the eval transform their source expects (stored in the weights file; flags '
                   'override it).', EXAMPLES)
    p.add_argument('images', nargs='+', type=Path, metavar='IMAGE', help='image files')
    p.add_argument('--weights', required=True, type=cli.weights_source,
                   help='a file written by python -m convert, python -m train or effnetv2_jax.save, '
                   'or a pretrained name: hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k, '
                   'torchvision:efficientnet_v2_s, local-dir:FOLDER')
    p.add_argument('--top-k', type=cli.positive_int, default=5,
                   help='classes per image (default 5)')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.add_argument('--labels', type=Path, help='class names: one per line, or JSON (a list or '
                   '{"0": "daisy", ...}); default: the weights\' own, else ImageNet\'s for 1000')
    p.add_argument('--batch-size', type=cli.positive_int, default=32,
                   help='images per forward (default 32)')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='compute dtype (default float32)')
    spec = p.add_argument_group('eval transform overrides (default: the weights\' metadata)')
    spec.add_argument('--size', type=image_size, help=f'crop size (1 to {MAX_IMAGE_SIZE})')
    spec.add_argument('--resize', choices=('shorter', 'squash'),
                      help='shorter: the short side to size / crop_pct, squash: both sides; then '
                      'a center crop')
    spec.add_argument('--crop-pct', type=float, help='resize to size / crop_pct, then crop')
    spec.add_argument('--interpolation', choices=sorted(RESAMPLING), help='resampling filter')
    spec.add_argument('--mean', type=float, nargs=3, metavar=('R', 'G', 'B'),
                      help='per channel, subtracted from pixels scaled to [0, 1]')
    spec.add_argument('--std', type=float, nargs=3, metavar=('R', 'G', 'B'),
                      help='per channel, divides the pixels next')
    return p.parse_args(argv)


@cli.entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in ('size', 'resize', 'crop_pct', 'interpolation',
                                               'mean', 'std') if getattr(args, k) is not None}
    try:
        predictor = Predictor(args.weights, preprocessing=overrides, labels=args.labels,
                              batch_size=args.batch_size, dtype=jnp.dtype(args.dtype))
    except (OSError, ValueError, KeyError) as e:
        torch_suffix = Path(args.weights).suffix in ('.pth', '.pt', '.bin', '.safetensors')
        hint = f' (convert PyTorch weights first: python -m convert {args.weights})'
        return cli.fail(f'{e}{hint if torch_suffix else ""}')
    try:
        results = predictor.predict(args.images, min(args.top_k, len(predictor.labels)),
                                    progress=len(args.images) > args.batch_size)
    except ValueError as e:  # an unreadable image, or logits that overflow
        return cli.fail(str(e))
    if args.json:
        print(json.dumps([{'image': str(path), 'predictions': [p._asdict() for p in top]}
                          for path, top in zip(args.images, results)], indent=2,
                         allow_nan=False))  # `predict` gives no NaN; JSON has none
        return cli.EXIT_OK
    width = max(len(p.label) for top in results for p in top)
    for path, top in zip(args.images, results):
        print(path)
        for rank, p in enumerate(top, 1):
            print(f'  {rank}. {p.label:<{width}}  {100 * p.probability:6.2f} %  (class {p.index})')
    return cli.EXIT_OK


if __name__ == '__main__':
    if hasattr(signal, 'SIGPIPE'):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly, as Unix tools do
    sys.exit(main())
