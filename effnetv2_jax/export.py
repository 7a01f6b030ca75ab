"""A serving export: the eval-mode forward pass as one self-contained StableHLO artifact.

The artifact (`jax.export.Exported.serialize()`) holds the lowered computation with the weights
baked in as constants, so a server needs only `jax` (plus `flatbuffers`), neither Flax nor this
package, nor the model's Python code, and it is one file to ship:

    exported = jax.export.deserialize(open(path, 'rb').read())
    logits = exported.call(images)  # float32 [B, S, S, 3], normalised NHWC -> float32 [B, classes]

`python -m effnetv2_jax.export WEIGHTS` writes it, with a JSON sidecar describing the input.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from effnetv2_jax import checkpoint, cli, configs
from effnetv2_jax.cli import first_line
from effnetv2_jax.files import OutputKind, atomic_write_bytes, check_output

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jax.export accepts any string; these lower & run
SIDECAR_KEYS = ('input_shape', 'input_dtype', 'output', 'platforms')


def _is_export(path: Path) -> bool:
    try:
        jax.export.deserialize(bytearray(path.read_bytes()))
        return True
    except Exception:  # noqa: BLE001 - unreadable: not an export
        return False


def _is_sidecar(path: Path) -> bool:
    try:
        info = json.loads(path.read_text())
        return isinstance(info, dict) and all(k in info for k in SIDECAR_KEYS)
    except (OSError, ValueError):
        return False


EXPORT_KIND = OutputKind('a jax.export artifact', _is_export)
SIDECAR_KIND = OutputKind("a jax.export artifact's JSON description", _is_sidecar)


def export(model, variables, image_size: int, *, batch_size: int | None = None,
           platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """Exports `images float32 [B, image_size, image_size, 3] (normalised NHWC, as `model.apply`
    takes) -> logits float32 [B, num_classes]` in eval mode (running BatchNorm statistics, no
    dropout). B is symbolic (any batch size >= 1) when `batch_size` is None. `platforms` is a
    subset of PLATFORMS (default: the current backend); lowering needs none of those devices."""
    if image_size < 1:
        raise ValueError(f'image size must be >= 1, got {image_size}')
    if batch_size is not None and batch_size < 1:
        raise ValueError(f'batch size must be >= 1 (or None: any), got {batch_size}')
    if platforms is not None:
        bad = [p for p in platforms if p not in PLATFORMS]
        if bad or not platforms or len(set(platforms)) != len(platforms):
            raise ValueError(f'platforms must be distinct names out of {", ".join(PLATFORMS)}; '
                             f'got {",".join(platforms)!r}')
    # Closed over rather than passed as arguments: they lower to constants inside the module.
    variables = {k: variables[k] for k in ('params', 'batch_stats')}

    def forward(images):
        return model.apply(variables, images, train=False)

    batch = jax.export.symbolic_shape('b')[0] if batch_size is None else batch_size
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return jax.export.export(jax.jit(forward), platforms=platforms)(images)


def main(argv=None) -> int:
    p = cli.parser('effnetv2_jax.export', 'Export converted weights as a serialized jax.export '
                   'artifact (StableHLO, weights inside) for serving without Flax.')
    p.add_argument('weights', type=Path, help='a file effnetv2_jax.save wrote (msgpack or Orbax)')
    p.add_argument('-o', '--output', type=Path, help='default: WEIGHTS with suffix .jaxexport')
    p.add_argument('--batch-size', type=int, help='fixed batch size (default: any)')
    p.add_argument('--image-size', type=int, help="default: metadata['preprocessing']['size'], "
                   "else the variant's eval size")
    p.add_argument('--platforms', help=f'comma-separated, out of {",".join(PLATFORMS)} '
                   f'(default: {jax.export.default_export_platform()})')
    args = p.parse_args(argv)
    output = args.output or args.weights.with_suffix('.jaxexport')
    sidecar = output.with_name(output.name + '.json')
    platforms = args.platforms.split(',') if args.platforms is not None else None
    try:
        check_output(output, EXPORT_KIND, inputs=[args.weights])
        check_output(sidecar, SIDECAR_KIND, inputs=[args.weights])
        variables, metadata = checkpoint.read(args.weights)
        model = checkpoint.build_model(metadata)
        size = args.image_size if args.image_size is not None else (
            (metadata.get('preprocessing') or {}).get('size')
            or configs.get_variant(metadata['variant']).eval_size)
        exported = export(model, variables, size, batch_size=args.batch_size,
                          platforms=platforms)
        data = exported.serialize()  # a bytearray; no copy (XL: 836 MB)
        info = {**metadata, 'input_shape': [args.batch_size, size, size, 3],
                'input_dtype': 'float32', 'output': 'logits' if model.num_classes else 'features',
                'platforms': list(exported.platforms)}
        atomic_write_bytes(output, data, EXPORT_KIND)
        atomic_write_bytes(sidecar, json.dumps(info, indent=2).encode(), SIDECAR_KIND)
    except (OSError, ValueError) as e:  # unreadable or invalid weights, bad flags, unusable -o
        return cli.fail(first_line(e))
    print(f'{args.weights} -> {output} ({len(data) / 1e6:.1f} MB; input spec in {sidecar.name})\n'
          f'  float32 [{args.batch_size or "any"}, {size}, {size}, 3] -> {info["output"]}, '
          f'platforms {",".join(exported.platforms)}')
    return cli.EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
