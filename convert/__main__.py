"""`python -m convert`: PyTorch EfficientNetV2 checkpoints and pretrained names to Flax, back to
PyTorch with --to-torch, or to timm's Hugging Face Hub format with --save-pretrained.

Exit status: 0 done, 1 --verify found the outputs apart, 2 bad input or unusable output (one-line
error, nothing written).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from convert import torch_io
from effnetv2_jax import checkpoint, cli, converter, hub, layouts, transforms
from effnetv2_jax.converter import CheckpointError
from effnetv2_jax.files import OutputKind, check_output
from effnetv2_jax.layers import PADDINGS
from effnetv2_jax.messages import first_line

EXAMPLES = """  python -m convert efficientnetv2_s.pth                 # -> efficientnetv2_s.msgpack
  python -m convert ckpt.pth --ema --verify -o s_ema.msgpack
  python -m convert tf_efficientnetv2_b0.safetensors --format orbax
  python -m convert hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k    # -> tf_efficientnetv2_s.in21k_ft_in1k.msgpack
  python -m convert --to-torch weights.msgpack --layout wzmiaomiao -o model.pth
  python -m convert efficientnetv2_s.pth --padding symmetric   # timm's efficientnetv2_s, not tf_
  python -m convert runs/flowers/model.msgpack --save-pretrained flowers --push-to-hub me/flowers
"""
# Flags that describe how to read a PyTorch checkpoint: meaningless for Flax weights and names.
TORCH_INPUT_FLAGS = ('variant', 'padding', 'bn_eps', 'ema')


def layout_name(name: str) -> str:
    """The canonical name of a layout name or alias (argparse type)."""
    try:
        return layouts.get_layout(name).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser('convert', 'Convert EfficientNetV2 weights between PyTorch (WZMIAOMIAO '
                   'model.py, torchvision, timm) and Flax (effnetv2_jax).', EXAMPLES)
    p.add_argument('input', type=cli.weights_source, help='.pth/.pt/.bin/.safetensors, a Flax weights file '
                   'this converter or python -m train wrote, or a pretrained name: '
                   'hf-hub:OWNER/REPO[@REVISION], torchvision:efficientnet_v2_s[:WEIGHTS], '
                   'local-dir:FOLDER')
    p.add_argument('-o', '--output', type=Path, help='output path (default: beside the input; '
                   'for a name, its last part in the current folder)')
    p.add_argument('--to-torch', action='store_true', help='convert Flax weights to a PyTorch '
                   'state_dict in --layout (.safetensors by suffix, else torch.save)')
    p.add_argument('--layout', type=layout_name, metavar='{' + ','.join(layouts.NAMES) + '}',
                   help='source layout (default: detected); with --to-torch, the target layout '
                   "(default: the weights' source layout; seed is an alias of wzmiaomiao)")
    p.add_argument('--variant', help='s, m, l, xl, b0..b3, or timm\'s rw_t, rw_s, rw_m '
                   '(default: detected from shapes); a model name such as efficientnetv2_s '
                   'also says which of its layout\'s models the weights are of')
    p.add_argument('--padding', choices=PADDINGS, help="the padding of the weights' models "
                   "(default: that of the source's models; timm's S, M, L and XL exist as "
                   "tf_efficientnetv2_* with 'same' padding and as efficientnetv2_* with "
                   'symmetric: unless the file says which, this flag must)')
    p.add_argument('--bn-eps', type=cli.positive_float,
                   help="BatchNorm epsilon (default: that of the source's models: 1e-3, 1e-5 for "
                   "timm's efficientnetv2_*)")
    p.add_argument('--ema', action='store_true', help='take the EMA weights of the checkpoint')
    p.add_argument('--format', choices=('msgpack', 'orbax'), default='msgpack',
                   help='Flax msgpack file (default) or an Orbax checkpoint directory')
    p.add_argument('--save-pretrained', type=Path, metavar='DIR', help="write DIR in timm's "
                   'Hugging Face Hub format instead (model.safetensors, config.json with the eval '
                   'transform and class names): timm.create_model("local-dir:DIR") loads it')
    p.add_argument('--push-to-hub', metavar='REPO_ID', help='with --save-pretrained: upload DIR '
                   'to this Hub repository (created if missing; log in with hf auth login)')
    p.add_argument('--allow-nonfinite', action='store_true', help='convert weights that hold NaN '
                   'or Inf (refused by default: exit 2)')
    p.add_argument('--verify', action='store_true', help='run the PyTorch and the Flax model on '
                   'one random batch and fail (exit 1) if max |Δ logit| exceeds the tolerance')
    p.add_argument('--verify-size', type=transforms.image_size, default=224,
                   help=f'image size for --verify, 1 to {transforms.MAX_IMAGE_SIZE} (default 224)')
    p.add_argument('--tolerance', type=cli.positive_float, default=None,
                   help='allowed max |Δ logit| / max |logit| (default 1e-5)')
    args = p.parse_args(argv)
    if args.save_pretrained and (args.to_torch or args.output):
        p.error('--save-pretrained DIR is the output: it goes with neither --to-torch nor -o')
    if args.push_to_hub and not args.save_pretrained:
        p.error('--push-to-hub needs --save-pretrained DIR')
    # Recognising a weights file reads it: once, here.
    args.flax_input = is_flax_input(args)
    if args.flax_input:
        given = [f'--{k.replace("_", "-")}' for k in TORCH_INPUT_FLAGS if getattr(args, k)]
        given += ['--layout'] if args.layout and not args.to_torch else []
        if given:
            p.error(f'{", ".join(given)} read PyTorch checkpoints; {args.input} holds converted '
                    'weights')
    return args


def is_flax_input(args) -> bool:
    """Whether the input is converted weights (a name, a folder: PyTorch checkpoints are files,
    or a file this package wrote), not a PyTorch checkpoint."""
    return args.to_torch or isinstance(args.input, str) or args.input.is_dir() or any(
        kind.recognise(args.input) for kind in checkpoint.OUTPUT_KINDS.values())


def default_output(args) -> Path:
    return cli.output_for(args.input, '.pth' if args.to_torch else '.orbax' if (
        args.format == 'orbax') else '.msgpack')


def run_verify(layout: layouts.Layout, family: layouts.Family, assumption: str, metadata,
               state_dict, variables, size, tolerance) -> bool:
    from convert import verify
    tolerance = verify.TOLERANCE if tolerance is None else tolerance
    print(f'verify: assumed {assumption}')
    flax_model = checkpoint.build_model(metadata)
    torch_module = verify.torch_model(layout, family, metadata, state_dict)
    result = verify.compare(torch_module, flax_model, variables, verify.random_images(2, size))
    ok = result.relative <= tolerance and result.same_top1
    print(f'verify ({family.model_name(metadata["variant"])} in PyTorch vs Flax, 2 random '
          f'{size}x{size} images): max |Δ logit| '
          f'{result.max_abs_diff:.3g} = {result.relative:.3g} of max |logit| '
          f'(tolerance {tolerance:g}), same top-1: {result.same_top1} -> '
          f'{"OK" if ok else "FAILED"}')
    return ok


def target_layout(args, metadata) -> str:
    """The PyTorch side of Flax weights: the --to-torch target (--layout, else the layout the
    weights came from), timm's for the Hub format, else the source layout for --verify."""
    if args.save_pretrained:
        return 'timm'
    if args.to_torch and not (args.layout or metadata.get('source_layout')):
        raise CheckpointError(f'{args.input} does not say which layout its weights came from; '
                              f'say which to write with --layout {"|".join(layouts.NAMES)}')
    return args.layout or metadata.get('source_layout', 'timm')


def direction(args) -> str:
    """'PyTorch -> Flax' and the like, for the summary line."""
    source = 'PyTorch' if isinstance(args.input, str) or not args.flax_input else 'Flax'
    target = ('PyTorch' if args.to_torch else "timm's Hub format" if args.save_pretrained
              else 'Flax')
    return f'{source} -> {target}'


def output_kind(args) -> OutputKind:
    if args.save_pretrained:
        return hub.PRETRAINED_KIND
    return torch_io.EXPORT_KIND if args.to_torch else checkpoint.OUTPUT_KINDS[args.format]


@cli.entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    output = args.save_pretrained or args.output or default_output(args)
    try:
        check_output(output, output_kind(args), inputs=[args.input])
        if args.flax_input:
            try:
                variables, metadata = checkpoint.read(args.input)
            except (OSError, ValueError) as e:
                raise CheckpointError(first_line(e)) from None
            layout = layouts.get_layout(target_layout(args, metadata))
            where = metadata.get('source', 'Flax weights')
            state_dict = converter.flax_to_torch(variables, metadata, layout.name)
            family = layout.family_for(metadata['variant'], metadata['padding'])
            if args.to_torch and family.padding != metadata['padding']:
                print(f"warning: these weights expect {metadata['padding']!r} padding; "
                      f"{layout.name}'s models pad {family.padding!r}, so their outputs will "
                      'differ')
            assumption = (f'{layout.name} {family.model_name(metadata["variant"])}: '
                          f'{layouts.padding_words(metadata["padding"])}, '
                          f"{layouts.eps_words(metadata['bn_eps'])} (from the weights' metadata)")
        else:
            state_dict, where, description = torch_io.read_state_dict(args.input, ema=args.ema)
            try:
                reading = converter.resolve(state_dict, args.layout, args.variant, args.padding,
                                            args.bn_eps, description)
            except CheckpointError as e:
                raise CheckpointError(f'{args.input}: {e}') from None
            variables, metadata = converter.to_flax(state_dict, reading)
            layout, family, assumption = reading.layout, reading.family, reading.assumption
        if not args.allow_nonfinite:
            converter.check_finite(state_dict)
        if args.verify and not run_verify(layout, family, assumption, metadata, state_dict,
                                          variables, args.verify_size, args.tolerance):
            return cli.fail('verification failed; nothing written', cli.EXIT_MISMATCH)
        if args.to_torch:
            torch_io.write_state_dict(output, state_dict, model={
                'layout': layout.name, **{k: metadata[k] for k in ('variant', 'padding',
                                                                   'bn_eps')}})
        elif args.save_pretrained:
            hub.save_pretrained(output, variables, metadata)
        else:
            checkpoint.save(output, variables, metadata, fmt=args.format)
    except (CheckpointError, OSError, ValueError) as e:  # bad input; unusable or unwritable output
        return cli.fail(first_line(e))
    num_params = sum(v.size for k, v in state_dict.items() if 'running_' not in k
                     and not k.endswith('num_batches_tracked'))
    print(f'{direction(args)}: {args.input} [{where}] -> {output}\n'
          f'  EfficientNetV2-{metadata["variant"].upper()}, {layout.name} layout, '
          f'{metadata["num_classes"]} classes, {num_params:,} parameters, padding '
          f'{metadata["padding"]}, BN eps {metadata["bn_eps"]:g}, '
          f'{time.perf_counter() - start:.1f} s')
    if args.push_to_hub:
        try:
            print(f'uploaded: {hub.push_to_hub(output, args.push_to_hub)}')
        except Exception as e:  # noqa: BLE001 - the network, a login, a permission: for the user
            return cli.fail(f'{output} was written, but the upload failed: {first_line(e)}')
    return cli.EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
