"""Specification of what a model name passed to `create_model` implies.

A timm model name implies timm's padding and BN eps (`tf_efficientnetv2_*`: 'same', 1e-3;
`efficientnetv2_rw_*`: symmetric, 1e-5), as timm builds that model. `efficientnetv2_s` (m, l, xl)
is timm's model (eps 1e-5) and also the function of WZMIAOMIAO's model.py (eps 1e-3): refused
unless `bn_eps` says which. Other spellings ('s', the paper's 'EfficientNetV2-S', torchvision's
'efficientnet_v2_s') take the defaults, symmetric and 1e-3. Explicit `padding=` and `bn_eps=`
always win. timm's models are built on the meta device: only their structure is read.
"""
from __future__ import annotations

import pytest
import timm
import torch

import effnetv2_jax
from effnetv2_jax.configs import TIMM_FAMILIES

# Every EfficientNetV2 timm has, but the one this package does not build
TIMM_NAMES = [n for n in timm.list_models('*efficientnetv2*') if not n.startswith('gc_')]
AMBIGUOUS = [f'efficientnetv2_{v}' for v in ('s', 'm', 'l', 'xl')]


def conventions(model) -> tuple[str, float]:
    return model.padding, model.bn_eps


def test_the_timm_names_are_those_of_timms_families():
    assert sorted(TIMM_NAMES) == sorted(f.prefix + v for f in TIMM_FAMILIES for v in f.variants)


@pytest.mark.parametrize('name', [n for n in TIMM_NAMES if n not in AMBIGUOUS])
def test_a_timm_name_builds_timms_padding_and_eps(name):
    with torch.device('meta'):
        reference = timm.create_model(name)
    # timm pads stride-2 convs with Conv2dSame for 'same', with the conv's own padding otherwise
    padding = 'same' if type(reference.conv_stem).__name__ == 'Conv2dSame' else 'symmetric'
    assert conventions(effnetv2_jax.create_model(name)) == (padding, reference.bn1.eps)


@pytest.mark.parametrize('name', ['s', 'EfficientNetV2-S', 'efficientnet_v2_s', 'b0'])
def test_other_names_take_the_defaults(name):
    assert conventions(effnetv2_jax.create_model(name)) == ('symmetric', 1e-3)


@pytest.mark.parametrize('name', AMBIGUOUS)
def test_a_name_of_both_timm_and_wzmiaomiao_is_refused_naming_the_choices(name):
    variant = name.removeprefix('efficientnetv2_')
    with pytest.raises(ValueError) as raised:
        effnetv2_jax.create_model(name)
    message = str(raised.value)
    assert '\n' not in message
    for choice in (repr(variant), repr(f'tf_efficientnetv2_{variant}'), 'bn_eps=1e-5'):
        assert choice in message


@pytest.mark.parametrize('bn_eps', [1e-5, 1e-3])
def test_bn_eps_settles_a_name_of_both(bn_eps):
    assert conventions(effnetv2_jax.create_model('efficientnetv2_s', bn_eps=bn_eps)) == (
        'symmetric', bn_eps)


def test_explicit_padding_and_eps_win_over_the_name():
    model = effnetv2_jax.create_model('tf_efficientnetv2_b0', padding='symmetric', bn_eps=1e-5)
    assert conventions(model) == ('symmetric', 1e-5)


@pytest.mark.parametrize('name', ['tf_efficientnetv2_rw_t', 'efficientnetv2_b0'])
def test_a_timm_spelled_name_timm_has_no_model_of_is_refused(name):
    with pytest.raises(ValueError, match=f"timm has no EfficientNetV2 called '{name}'"):
        effnetv2_jax.create_model(name)
