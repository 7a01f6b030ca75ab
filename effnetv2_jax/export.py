"""Serving exports: the eval-mode forward pass as one self-contained StableHLO artifact, or as an
ONNX model.

The artifact (`jax.export.Exported.serialize()`) holds the lowered computation with the weights
baked in as constants, so a server needs only `jax` (plus `flatbuffers`), neither Flax nor this
package, nor the model's Python code, and it is one file to ship:

    exported = jax.export.deserialize(open(path, 'rb').read())
    logits = exported.call(images)  # float32 [B, S, S, 3], normalised NHWC -> float32 [B, classes]

`python -m effnetv2_jax.export WEIGHTS` writes it, with a JSON sidecar describing the input;
`--format onnx` writes an ONNX model instead (through jax2onnx, an optional dependency), which
carries that description in its own metadata_props:

    session = onnxruntime.InferenceSession(path)
    logits, = session.run(None, {'images': images})
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

import effnetv2_jax
from effnetv2_jax import checkpoint, cli, configs, kernels, transforms
from effnetv2_jax.messages import first_line
from effnetv2_jax.files import OutputKind, atomic_write, atomic_write_bytes, check_output

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jax.export accepts any string; these lower & run
SIDECAR_KEYS = ('input_shape', 'input_dtype', 'output', 'platforms')
FORMATS = ('jaxexport', 'onnx')
ONNX_PRODUCER = 'effnetv2-jax'  # the producer_name by which an existing ONNX output is recognised
# The lowest opset jax2onnx 0.13.0 writes valid graphs for (below 18 it still gives ReduceMean its
# axes as an input); onnxruntime runs it from 1.14 on.
ONNX_OPSET = 18
ONNX_MISSING = "--format onnx needs jax2onnx and onnx: pip install 'effnetv2-jax[onnx]'"


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


def _is_onnx_export(path: Path) -> bool:
    try:
        import onnx
        return onnx.load_model(path, load_external_data=False).producer_name == ONNX_PRODUCER
    except Exception:  # noqa: BLE001 - unreadable (or no onnx to read it): not ours
        return False


EXPORT_KIND = OutputKind('a jax.export artifact', _is_export)
ONNX_KIND = OutputKind('an ONNX model written by effnetv2-jax', _is_onnx_export)
SIDECAR_KIND = OutputKind("a jax.export artifact's JSON description", _is_sidecar)


def _eval_forward(model, variables, image_size: int, batch_size: int | None):
    """`images -> model.apply(variables, images, train=False)`, after checking the sizes and
    that the weights are finite."""
    transforms.check_image_size(image_size, 'image size')
    if batch_size is not None and batch_size < 1:
        raise ValueError(f'batch size must be >= 1 (or None: any), got {batch_size}')
    # Closed over rather than passed as arguments: they lower to constants inside the module.
    variables = {k: variables[k] for k in ('params', 'batch_stats')}
    checkpoint.check_finite(variables, 'the weights')
    return lambda images: model.apply(variables, images, train=False)


def export(model, variables, image_size: int, *, batch_size: int | None = None,
           platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """Exports `images float32 [B, image_size, image_size, 3] (normalised NHWC, as `model.apply`
    takes) -> logits float32 [B, num_classes]` in eval mode (running BatchNorm statistics, no
    dropout). B is symbolic (any batch size >= 1) when `batch_size` is None. `platforms` is a
    subset of PLATFORMS (default: the current backend); lowering needs none of those devices."""
    forward = _eval_forward(model, variables, image_size, batch_size)
    if platforms is not None:
        bad = [p for p in platforms if p not in PLATFORMS]
        if bad or not platforms or len(set(platforms)) != len(platforms):
            raise ValueError(f'platforms must be distinct names out of {", ".join(PLATFORMS)}; '
                             f'got {",".join(platforms)!r}')
    batch = jax.export.symbolic_shape('b')[0] if batch_size is None else batch_size
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return jax.export.export(jax.jit(forward), platforms=platforms)(images)


def export_onnx(model, variables, image_size: int, *, batch_size: int | None = None,
                metadata: dict | None = None):
    """The same forward as `export`, as an `onnx.ModelProto` with the weights inside: input
    `images` float32 [B, image_size, image_size, 3] (normalised NHWC), output `logits` float32
    [B, num_classes] (`features` [B, head channels] when num_classes is 0); B is a dynamic
    dimension ('B') when `batch_size` is None. Each `metadata` item becomes a metadata_props
    entry whose value is JSON. Needs jax2onnx and onnx (ImportError without them)."""
    import onnx
    from jax2onnx import to_onnx
    forward = _eval_forward(model, variables, image_size, batch_size)
    output = 'logits' if model.num_classes else 'features'
    # XLA's convolutions map onto ONNX Conv; the CPU paths of 'auto' (platform_dependent, custom
    # multiply-adds) have no ONNX counterpart and would be slower under onnxruntime anyway.
    # jax2onnx 0.13.0 prints debugging lines for every nn.Conv and logs a traceback for a plugin
    # that does not import under this jax; neither concerns the model, so they are kept quiet.
    jax2onnx_log = logging.getLogger('jax2onnx')
    level = jax2onnx_log.level
    jax2onnx_log.setLevel(logging.CRITICAL)
    try:
        with kernels.use_implementation('xla'), contextlib.redirect_stdout(io.StringIO()):
            proto = to_onnx(forward, [('B' if batch_size is None else batch_size,
                                       image_size, image_size, 3)],
                            model_name=f"efficientnetv2_{model.variant.name}",
                            opset=ONNX_OPSET, input_names=['images'], output_names=[output])
    finally:
        jax2onnx_log.setLevel(level)
    proto.producer_name, proto.producer_version = ONNX_PRODUCER, effnetv2_jax.__version__
    onnx.helper.set_model_props(proto, {k: json.dumps(v, allow_nan=False)
                                        for k, v in (metadata or {}).items()})
    return proto


def _write_onnx(output: Path, model, variables, size: int, batch_size: int | None,
                info: dict) -> int:
    """Writes the ONNX model with `info` as its metadata; returns its size in bytes."""
    data = export_onnx(model, variables, size, batch_size=batch_size,
                       metadata=info).SerializeToString()
    atomic_write_bytes(output, data, ONNX_KIND)
    return len(data)


def _write_jaxexport(output: Path, model, variables, size: int, batch_size: int | None,
                     info: dict, platforms: Sequence[str] | None) -> tuple[int, list[str]]:
    """Writes the artifact and its JSON sidecar (`info` plus the platforms), both or neither;
    returns the artifact's size in bytes and the platforms it was lowered for."""
    exported = export(model, variables, size, batch_size=batch_size, platforms=platforms)
    data = exported.serialize()  # a bytearray; no copy (XL: 836 MB)
    lowered_for = list(exported.platforms)
    sidecar = json.dumps({**info, 'platforms': lowered_for}, indent=2, allow_nan=False).encode()

    def write_artifact_then_sidecar(tmp: Path):
        # The artifact's temporary is written and flushed (a full disk fails here, where it is
        # likeliest) before the sidecar is put in place; after that only the artifact's rename
        # is left, so that a failure leaves neither new, and only a crash in the instant between
        # the two renames could leave one. The artifact appears last: whoever finds it finds its
        # description beside it.
        with open(tmp, 'wb') as f:
            f.write(data)
            os.fsync(f.fileno())
        atomic_write_bytes(_sidecar(output), sidecar, SIDECAR_KIND)
    atomic_write(output, write_artifact_then_sidecar, EXPORT_KIND)
    return len(data), lowered_for


def _sidecar(output: Path) -> Path:
    return output.with_name(output.name + '.json')


@cli.entry_point
def main(argv=None) -> int:
    p = cli.parser('effnetv2_jax.export', 'Export converted weights for serving without Flax: '
                   'a serialized jax.export artifact (StableHLO) or an ONNX model, weights '
                   'inside.')
    p.add_argument('weights', type=cli.weights_source, help='a file effnetv2_jax.save wrote '
                   '(msgpack or Orbax), or a pretrained name (hf-hub:..., torchvision:...)')
    p.add_argument('-o', '--output', type=Path, help='default: WEIGHTS with suffix .jaxexport '
                   '(.onnx for --format onnx)')
    p.add_argument('--format', choices=FORMATS, default='jaxexport',
                   help='jaxexport (default; with a JSON sidecar) or onnx (through jax2onnx; '
                   'the description in its metadata_props)')
    p.add_argument('--batch-size', type=int, help='fixed batch size (default: any)')
    p.add_argument('--image-size', type=transforms.image_size,
                   help=f"1 to {transforms.MAX_IMAGE_SIZE}; default: metadata['preprocessing']"
                   "['size'], else the variant's eval size")
    p.add_argument('--platforms', help=f'comma-separated, out of {",".join(PLATFORMS)} '
                   f'(default: {jax.export.default_export_platform()}; jaxexport only)')
    args = p.parse_args(argv)
    onnx_format = args.format == 'onnx'
    if onnx_format:
        if args.platforms is not None:
            return cli.fail('--platforms applies to --format jaxexport only')
        try:
            import jax2onnx, onnx  # noqa: F401, E401 - present before anything is read
        except ImportError:
            return cli.fail(ONNX_MISSING)
    output = args.output or cli.output_for(args.weights, '.onnx' if onnx_format else '.jaxexport')
    platforms = args.platforms.split(',') if args.platforms is not None else None
    inputs = [args.weights]  # a local-dir: folder included; a remote name reads nothing here
    try:
        if onnx_format:
            check_output(output, ONNX_KIND, inputs=inputs)
        else:
            check_output(output, EXPORT_KIND, inputs=inputs)
            check_output(_sidecar(output), SIDECAR_KIND, inputs=inputs)
        variables, metadata = checkpoint.read(args.weights)
        model = checkpoint.build_model(metadata)
        size = args.image_size if args.image_size is not None else (
            (metadata.get('preprocessing') or {}).get('size')
            or configs.get_variant(metadata['variant']).eval_size)
        info = {**metadata, 'input_shape': [args.batch_size, size, size, 3],
                'input_dtype': 'float32', 'output': 'logits' if model.num_classes else 'features'}
        if onnx_format:
            written = _write_onnx(output, model, variables, size, args.batch_size, info)
            spec_place, target = 'its metadata_props', 'ONNX input "images"'
        else:
            written, lowered_for = _write_jaxexport(output, model, variables, size,
                                                    args.batch_size, info, platforms)
            spec_place, target = _sidecar(output).name, f'platforms {",".join(lowered_for)}'
    except (OSError, ValueError) as e:  # unreadable or invalid weights, bad flags, unusable -o
        return cli.fail(first_line(e))
    print(f'{args.weights} -> {output} ({written / 1e6:.1f} MB; input spec in {spec_place})\n'
          f'  float32 [{args.batch_size or "any"}, {size}, {size}, 3] -> {info["output"]}, '
          f'{target}')
    return cli.EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
