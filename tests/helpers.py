"""What several test files share: the PyTorch sources and their transforms, real photos,
conversion through the CLI, random variables, and the logit tolerance with its check."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
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

TIMM_TF_SYMMETRIC = ('--padding', 'symmetric', '--bn-eps', '1e-5')  # timm's non-tf_ models

# id -> (PyTorch model factory, extra converter flags). Every variant in at least one layout;
# the large ones (M, L, XL: 30-70 s each on 2 cores) once or twice, to keep CI under 30 minutes.
SOURCES = {
    **{f'wzmiaomiao-{v}': (functools.partial(torch_reference.create, v), ())
       for v in ('s', 'b0', 'b1', 'b2', 'b3')},
    **{f'torchvision-{v}': (getattr(torchvision.models, f'efficientnet_v2_{v}'), ())
       for v in ('s', 'm', 'l')},
    **{f'timm-tf-{v}': (functools.partial(timm.create_model, f'tf_efficientnetv2_{v}'), ())
       for v in ('s', 'm', 'xl', 'b0')},
    'timm-s': (functools.partial(timm.create_model, 'efficientnetv2_s'), TIMM_TF_SYMMETRIC),
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
