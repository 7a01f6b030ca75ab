"""The converted Flax model computes what the PyTorch model computes: the project's core claim.

Every source is a real PyTorch model (our reference of WZMIAOMIAO's model.py, torchvision, timm)
with randomized weights, BN affine parameters and BN running statistics (conftest.randomize_),
saved to disk and converted by the real CLI path (save -> `python -m convert` -> `effnetv2_jax.load`).

Tolerances (fp32 on CPU):
- logits: max |Δ| <= 1e-5 x max |logit|. The two frameworks sum in different orders, so each op
  differs by ~1 ulp and 40-100 blocks accumulate that to 1e-6..3e-6 (measured); a wrong padding,
  a swapped statistic or a transposed kernel gives 1e-2..1 (see test_convert_cli).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import timm

import effnetv2_jax
from helpers import (SOURCES, assert_logits_close, convert, jitted_apply, noise,
                      torch_logits)
from convert import torch_reference
from effnetv2_jax import converter
from convert.torch_reference import randomize_
from effnetv2_jax import kernels
from effnetv2_jax.configs import OFFICIAL_VARIANTS
from effnetv2_jax.model import abstract_variables

# TF 'same' padding differs from symmetric only on even sizes: test both. 96 px (3x3 in the
# last stage) rather than 64: at 2x2 the BN statistics of a random network are too noisy.
SIZES = (96, 97)
PUBLISHED_PARAMETERS = {'s': 21_458_488, 'm': 54_139_356, 'l': 118_515_272, 'xl': 208_119_808,
                        'b0': 7_139_704, 'b1': 8_141_052, 'b2': 10_096_086, 'b3': 14_358_406}
# timm's own variants: the counts timm 1.0.31 builds (its model cards: 13.6M, 23.9M, 53.2M)
TIMM_PARAMETERS = {'rw_t': 13_649_388, 'rw_s': 23_941_296, 'rw_m': 53_236_442}


@pytest.fixture(scope='module', params=list(SOURCES))
def converted(request, tmp_path_factory):
    factory, flags = SOURCES[request.param]
    module = randomize_(factory(), seed=len(request.param), calibration_size=SIZES[0])
    model, variables, metadata = convert(module, tmp_path_factory.mktemp(request.param), *flags)
    yield module, model, variables, metadata
    del module, variables


@pytest.mark.parametrize('size', SIZES)
def test_eval_logits_match_pytorch(converted, size, record_property):
    module, model, variables, _ = converted
    images = noise(size)
    record_property('logit_error', assert_logits_close(
        np.asarray(jitted_apply(model)(variables, images)), torch_logits(module, images)))


# On CPU the default implementation ('auto') runs the CPU paths (shifted depthwise multiply-adds,
# the stem as im2col), so the tests above check those; XLA's convolutions (what GPUs and TPUs run)
# are checked here.
@pytest.mark.parametrize('source', ['wzmiaomiao-b0', 'timm-tf-b0'])
@pytest.mark.parametrize('size', SIZES)
def test_eval_logits_match_pytorch_with_xla_convolutions(source, size, tmp_path):
    factory, flags = SOURCES[source]
    module = randomize_(factory(), seed=len(source), calibration_size=SIZES[0])
    model, variables, _ = convert(module, tmp_path, *flags)
    images = noise(size)
    with kernels.use_implementation('xla'):
        logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    assert_logits_close(np.asarray(logits), torch_logits(module, images))


def test_exporting_to_the_source_layout_gives_back_its_state_dict_exactly(converted):
    module, _, variables, metadata = converted
    back = converter.flax_to_torch(variables, metadata, metadata['source_layout'])
    expected = {k: v.numpy() for k, v in module.state_dict().items()
                if not k.endswith('num_batches_tracked')}
    assert [k for k in back if not k.endswith('num_batches_tracked')] == list(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def parameter_count(name: str) -> int:
    shapes = abstract_variables(effnetv2_jax.create_model(name))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('variant', OFFICIAL_VARIANTS)
def test_parameter_count_equals_pytorch_and_the_published_figure(variant):
    model = torch_reference.create(variant)
    torch_count = sum(p.numel() for p in model.parameters())
    assert parameter_count(variant) == torch_count == PUBLISHED_PARAMETERS[variant]


@pytest.mark.parametrize('variant', list(TIMM_PARAMETERS))
def test_parameter_count_of_timms_own_variants_equals_timms(variant):
    model = timm.create_model(f'efficientnetv2_{variant}')
    torch_count = sum(p.numel() for p in model.parameters())
    assert parameter_count(variant) == torch_count == TIMM_PARAMETERS[variant]


