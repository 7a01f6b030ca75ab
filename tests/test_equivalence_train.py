"""Train mode (drop rates 0): one step gives PyTorch's logits, BN statistics and gradients.

Sources as in test_equivalence.py, converted through the CLI. Tolerances:
- logits: as in eval mode, max |Δ| <= 1e-5 x max |logit|.
- updated running statistics: rtol 1e-4, atol 1e-5 (means of the activations above).
- gradients: per tensor, max |Δ| <= 1e-4 x max |grad of that tensor| + 1e-6 x max |any grad|.
  Measured: <= 1.9e-5 relative for every tensor with a real gradient. The absolute floor is for
  the biases of BNs whose output only reaches later train-mode BNs: their gradient is exactly 0
  in exact arithmetic, ~1e-8 of the largest gradient in both frameworks, and ~100 % apart.
"""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import timm
import torch
import torchvision

from helpers import TIMM_TF_SYMMETRIC, assert_logits_close, convert, noise
from convert import torch_reference
from effnetv2_jax import converter
from convert.torch_reference import randomize_
from effnetv2_jax import kernels

GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-4, 1e-6

TRAIN_SOURCES = {  # id -> (factory with drop rates 0, converter flags, size)
    'wzmiaomiao-s': (lambda: torch_reference.create('s', dropout_rate=0.0, drop_path_rate=0.0), (), 65),
    'torchvision-s': (lambda: torchvision.models.efficientnet_v2_s(
        dropout=0.0, stochastic_depth_prob=0.0), (), 64),
    'timm-tf-b0': (lambda: timm.create_model('tf_efficientnetv2_b0'), (), 64),
    'timm-s': (lambda: timm.create_model('efficientnetv2_s'), TIMM_TF_SYMMETRIC, 65),
}
# The default implementation on CPU runs the CPU paths (shifted depthwise multiply-adds and im2col
# kernel gradients, both with hand-written backwards); XLA's convolutions (GPU, TPU) are checked
# on two sources too.
CASES = [(source, 'auto') for source in TRAIN_SOURCES] + [
    ('timm-tf-b0', 'xla'), ('wzmiaomiao-s', 'xla')]


def torch_train_step(module, images, labels):
    module.train()
    module.zero_grad()
    logits = module(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    return logits.detach().numpy(), {k: v.numpy() for k, v in module.state_dict().items()}, grads


def flax_train_step(model, variables, images, labels):
    def loss_fn(params):
        logits, state = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                    images, train=True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, state['batch_stats'])
    grads, (logits, batch_stats) = jax.jit(jax.grad(loss_fn, has_aux=True))(variables['params'])
    return np.asarray(logits), grads, batch_stats


@pytest.fixture(scope='module', params=CASES, ids=[f'{s}-{i}' for s, i in CASES])
def train_step_results(request, tmp_path_factory):
    """One train step of both models on the same batch, results in torch names."""
    source, implementation = request.param
    factory, flags, size = TRAIN_SOURCES[source]
    module = randomize_(factory(), seed=3, calibration_size=size)
    model, variables, metadata = convert(module, tmp_path_factory.mktemp('train'), *flags)
    model = model.clone(dropout_rate=0.0, drop_path_rate=0.0)
    images = noise(size, batch=4, seed=5)
    labels = np.array([1, 5, 7, 3])
    torch_out = torch_train_step(module, images, labels)
    with kernels.use_implementation(implementation):
        logits, grads, batch_stats = flax_train_step(model, variables, images, labels)
    as_torch = converter.flax_to_torch({'params': grads, 'batch_stats': batch_stats}, metadata,
                                       metadata['source_layout'])
    return torch_out, (logits, as_torch)


def test_train_mode_logits_match_pytorch(train_step_results):
    (torch_logits_, _, _), (logits, _) = train_step_results
    assert_logits_close(logits, torch_logits_)


def test_train_step_updates_running_statistics_like_pytorch(train_step_results):
    (_, torch_state, _), (_, flax_state) = train_step_results
    keys = [k for k in torch_state if k.endswith(('running_mean', 'running_var'))]
    assert len(keys) > 100
    for key in keys:
        np.testing.assert_allclose(flax_state[key], torch_state[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)


def test_gradients_of_every_parameter_match_pytorch(train_step_results):
    (_, _, torch_grads), (_, flax_grads) = train_step_results
    assert set(torch_grads) <= set(flax_grads)
    atol = GRAD_ATOL_OF_MAX * max(np.max(np.abs(g)) for g in torch_grads.values())
    for key, expected in torch_grads.items():
        error = np.max(np.abs(flax_grads[key] - expected))
        assert error <= GRAD_RTOL * np.max(np.abs(expected)) + atol, (
            f'{key}: max |Δ grad| {error:.2e}, max |grad| {np.max(np.abs(expected)):.2e}')
