"""What several test files share: the PyTorch sources and their transforms, real photos,
conversion through the CLI, random variables, and the logit tolerance with its check."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision

import effnetv2_jax
from convert import torch_reference
from convert.__main__ import main as convert_main


def convert(torch_model: torch.nn.Module, directory, *flags: str, name: str = 'ckpt'):
    """Saves `torch_model`'s state_dict, converts it with `python -m convert` (in process) and
    returns `(flax_model, variables, metadata)` loaded from the converter's output."""
    source = directory / f'{name}.pth'
    torch.save(torch_model.state_dict(), source)
    output = directory / f'{name}.msgpack'
    assert convert_main([str(source), '-o', str(output), *flags]) == 0
    variables, metadata = effnetv2_jax.checkpoint.read(output)
    return effnetv2_jax.checkpoint.build_model(metadata), variables, metadata


SMALL_METADATA = {'variant': 'b0', 'num_classes': 3, 'padding': 'symmetric', 'bn_eps': 1e-3}


def snapshot(folder) -> dict[str, bytes | None]:
    """Every path under `folder` (relative to it) with its content (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob('*'))}


def assert_one_line_error(err: str) -> str:
    """Asserts that `err` (stderr) is one line `error: ...` and no traceback; returns it."""
    assert 'Traceback' not in err
    lines = err.splitlines()
    assert len(lines) == 1, f'expected one line on stderr, got:\n{err}'
    assert lines[0].startswith('error: ')
    return lines[0]


def write_unchecked_weights(path, variables, metadata):
    """Writes a msgpack weights file as `effnetv2_jax.save` lays it out, without its checks:
    for files whose variables and metadata disagree."""
    from flax import serialization
    path.write_bytes(serialization.msgpack_serialize({
            'variables': jax.tree.map(np.asarray, variables),
            'metadata': {'format_version': 1, **metadata}}))


PHOTO_NAMES = ('chelsea', 'coffee', 'astronaut', 'rocket')


def photos() -> list[np.ndarray]:
    """scikit-image's sample photos (a cat, coffee, an astronaut, a rocket): uint8 [H, W, 3] of
    different sizes and aspect ratios, portrait and landscape."""
    from skimage import data
    return [getattr(data, name)() for name in PHOTO_NAMES]


def torchvision_transform(variant: str):
    """torchvision's own eval transform of its ImageNet weights (no download needed)."""
    weights = getattr(torchvision.models, f'EfficientNet_V2_{variant.upper()}_Weights')
    return weights.IMAGENET1K_V1.transforms()


def timm_transform(model_name: str):
    """timm's eval transform of the model's default pretrained tag, at its test size."""
    model = timm.create_model(model_name, pretrained=False)
    config = timm.data.resolve_data_config({}, model=model, use_test_size=True)
    return timm.data.create_transform(**config)


def wzmiaomiao_transform(size: int):
    """WZMIAOMIAO's predict.py: resize the short side (bilinear), center crop, mean = std = 0.5."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])


def torch_preprocess(transform, images) -> np.ndarray:
    """A torchvision/timm transform on uint8 [H, W, 3] arrays: float32 [N, size, size, 3]."""
    from PIL import Image
    return np.stack([transform(Image.fromarray(i)).numpy().transpose(1, 2, 0) for i in images])


def random_variables(model, x, seed=0):
    """Deterministic random variables for `model` without running its (slow on CPU) initialisers.

    Shapes come from `jax.eval_shape(model.init)`; kernels ~ N(0, 1/fan_in), BN scales and
    variances in [0.5, 1.5), the rest ~ N(0, 0.1).
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            values = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name in ('scale', 'var'):
            values = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            values = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


LOGIT_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-4, 1e-6

# timm's tf_ and own S, M, L and XL have the same tensors: the converter is told which.
TIMM_TF_SAME = ('--padding', 'same')  # timm's tf_ models (eps then 1e-3)
TIMM_TF_SYMMETRIC = ('--padding', 'symmetric')  # timm's non-tf_ models (eps then 1e-5)

# id -> (PyTorch model factory, extra converter flags). Every variant in at least one layout;
# the large ones (M, L, XL: 30-70 s each on 2 cores) once or twice, to keep CI under 30 minutes.
SOURCES = {
    **{f'wzmiaomiao-{v}': (functools.partial(torch_reference.create, v), ())
       for v in ('s', 'b0', 'b1', 'b2', 'b3')},
    **{f'torchvision-{v}': (getattr(torchvision.models, f'efficientnet_v2_{v}'), ())
       for v in ('s', 'm', 'l')},
    **{f'timm-tf-{v}': (functools.partial(timm.create_model, f'tf_efficientnetv2_{v}'),
                        TIMM_TF_SAME) for v in ('s', 'm', 'xl')},
    # timm has B0-B3 only as tf_ models: no flags needed.
    'timm-tf-b0': (functools.partial(timm.create_model, 'tf_efficientnetv2_b0'), ()),
    'timm-s': (functools.partial(timm.create_model, 'efficientnetv2_s'), TIMM_TF_SYMMETRIC),
    # timm's own variants exist only with symmetric padding and eps 1e-5: no flags needed.
    **{f'timm-{v}': (functools.partial(timm.create_model, f'efficientnetv2_{v}'), ())
       for v in ('rw_t', 'rw_s', 'rw_m')},
}


@functools.cache
def jitted_apply(model):
    """One compiled forward per model configuration, shared by the sources that convert to it."""
    return jax.jit(model.apply)


def torch_logits(module, images_nhwc):
    with torch.no_grad():
        return module(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def assert_logits_close(got, expected) -> float:
    """Asserts max |Δ| <= LOGIT_RTOL x max |logit| and equal top-1; returns that ratio."""
    error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    assert error <= LOGIT_RTOL, f'max |Δ logit| = {error:.2e} of max |logit|'
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    return error


def noise(size, batch=2, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32)


# --- layers and kernels against torch: layouts, cases, output tolerance --------------------

# Layer outputs (BatchNorm, ConvBNAct, SqueezeExcite) reach |y| ~ 5..18 here, and the two
# frameworks sum in different orders, so they differ by an ulp or two of the largest values:
# measured max |jax - torch| over 5 seeds was 2.4e-6 (BN train), 1.9e-6 (BN eval), 1.4e-6 (conv +
# BN + SiLU, dense and depthwise), 2.4e-7 (squeeze-excite). An elementwise relative bound alone
# fails on outputs near zero, hence the absolute term, ~4x the worst measured error.
OUT_RTOL, OUT_ATOL = 1e-5, 1e-5

# (kernel size, stride, (H, W)) of the depthwise cases: odd and even sizes, both strides
DEPTHWISE_CASES = [(3, 1, (9, 8)), (3, 2, (10, 10)), (5, 2, (9, 11)), (3, 2, (7, 6))]



def nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC numpy -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW torch -> NHWC numpy."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def to_hwio(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Torch conv weight OIHW (depthwise: (C, 1, k, k)) -> Flax kernel HWIO ((k, k, 1, C))."""
    weight = weight.detach().numpy() if isinstance(weight, torch.Tensor) else weight
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def f32(a) -> np.ndarray:
    return np.asarray(a, np.float32)


def random_conv_weight(rng, out_ch, in_ch_per_group, k):
    return f32(rng.normal(size=(out_ch, in_ch_per_group, k, k)) / np.sqrt(in_ch_per_group * k * k))


def assert_close(actual, desired, rtol=OUT_RTOL, atol=OUT_ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=rtol, atol=atol)


def assert_close_per_tensor(actual, desired, rtol: float, atol: float = 0.0) -> float:
    """Asserts max |actual - desired| <= rtol x max |desired| + atol for every tensor (leaf) of two
    trees of the same structure: each bound scales with its own tensor, so one wrong tensor fails
    however small it is next to the others. Returns the largest difference / bound."""
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    ratios = {}
    for (path, a), d in zip(jax.tree_util.tree_leaves_with_path(actual),
                            jax.tree.leaves(desired)):
        a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
        difference = np.max(np.abs(a - d), initial=0.0)
        bound = rtol * np.max(np.abs(d), initial=0.0) + atol
        ratios[jax.tree_util.keystr(path)] = difference / bound if bound else (
                0.0 if difference == 0 else np.inf)
    failures = sorted(((ratio, name) for name, ratio in ratios.items() if not ratio <= 1),
                      reverse=True)  # `not <=`: NaN fails too
    assert not failures, (f'{len(failures)} tensors past rtol {rtol:g} + atol {atol:g}, '
                          'difference / bound: '
                          + ', '.join(f'{name} {ratio:.3g}' for ratio, name in failures[:5]))
    return max(ratios.values(), default=0.0)


def tf_same_pad(x_nchw, k, stride):
    """TensorFlow SAME padding done explicitly: total = max((ceil(n/s) - 1) s + k - n, 0),
    split with the extra pixel at the bottom/right."""
    pads = []
    for n in (x_nchw.shape[-1], x_nchw.shape[-2]):  # F.pad lists the last dimension first
        total = max((-(-n // stride) - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x_nchw, pads)
