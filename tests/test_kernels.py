"""`kernels.use_implementation` decides the convolutions a model traced inside it computes with."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from effnetv2_jax import kernels
from effnetv2_jax.layers import ConvBNAct

UNKNOWN_IMPLEMENTATION = r"implementation must be one of \('auto', 'xla', 'cpu'\), got"


def test_use_implementation_refuses_an_unknown_name_on_entry():
    with pytest.raises(ValueError, match=UNKNOWN_IMPLEMENTATION):
        with kernels.use_implementation('shifted'):
            pass


def traced_convbnact(in_ch, **layer):
    """The jaxpr, as text, of a ConvBNAct (8 outputs) applied to a (1, 8, 8, in_ch) input."""
    layer = ConvBNAct(features=8, **layer)
    x = jnp.zeros((1, 8, 8, in_ch))
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    return str(jax.make_jaxpr(lambda v, x: layer.apply(v, x))(variables, x))


@pytest.mark.parametrize('implementation', ['xla', 'cpu'])
@pytest.mark.parametrize('in_ch,groups', [(8, 8), (3, 1)], ids=['depthwise', 'dense'])
def test_use_implementation_decides_the_convolutions_traced_inside_it(implementation, in_ch,
                                                                      groups):
    with kernels.use_implementation(implementation):
        jaxpr = traced_convbnact(in_ch, kernel_size=3, groups=groups)
    assert 'platform_index' not in jaxpr  # no per-platform choice left to the compiler
    if implementation == 'xla':
        assert 'conv_general_dilated' in jaxpr and f'feature_group_count={groups}' in jaxpr
    else:  # shifted multiply-adds (depthwise) or the im2col matrix product (dense)
        assert 'conv_general_dilated' not in jaxpr


def test_use_implementation_gives_the_enclosing_choice_back_on_exit():
    def depthwise():
        return traced_convbnact(8, kernel_size=3, groups=8)
    with kernels.use_implementation('xla'):
        with kernels.use_implementation('cpu'):
            assert 'conv_general_dilated' not in depthwise()
        assert 'conv_general_dilated' in depthwise() and 'platform_index' not in depthwise()
    assert 'platform_index' in depthwise()  # 'auto': chosen per platform when compiled


@pytest.mark.parametrize('implementation', kernels.IMPLEMENTATIONS)
def test_1x1_stride1_conv_is_a_matrix_product_under_every_implementation(implementation):
    with kernels.use_implementation(implementation):
        jaxpr = traced_convbnact(6, kernel_size=1)
    assert 'dot_general' in jaxpr and 'conv_general_dilated' not in jaxpr
