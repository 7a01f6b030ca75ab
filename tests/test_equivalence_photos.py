"""End to end on real photos: each PyTorch model through its own library's eval transform vs the
converted weights through `effnetv2_jax.Predictor`, which reads the transform from the converted
file's metadata. S at its eval size 384 in the three layouts, and timm's B0 (crop_pct 0.875,
ImageNet mean/std) at 224.

Tolerance and method as in test_equivalence.py: max |Δ logit| <= 1e-5 of max |logit| and the same
top-1 on every photo. The inputs themselves agree exactly (tests/test_predict.py).
"""
from __future__ import annotations

import pytest

from helpers import (SOURCES, assert_logits_close, convert, photos, wzmiaomiao_transform,
                      timm_transform, torch_logits, torch_preprocess, torchvision_transform)
from convert.torch_reference import randomize_
from effnetv2_jax import Predictor

TRANSFORMS = {
    'wzmiaomiao-s': lambda: wzmiaomiao_transform(384),
    'torchvision-s': lambda: torchvision_transform('s'),
    'timm-tf-s': lambda: timm_transform('tf_efficientnetv2_s'),
    'timm-tf-b0': lambda: timm_transform('tf_efficientnetv2_b0'),
}


@pytest.mark.parametrize('source', list(TRANSFORMS))
def test_predictor_matches_pytorch_with_its_own_transform_on_real_photos(
        source, tmp_path, record_property):
    factory, flags = SOURCES[source]
    size = 224 if source.endswith('b0') else 384
    module = randomize_(factory(), seed=7, calibration_size=size)
    convert(module, tmp_path, *flags)
    expected = torch_logits(module, torch_preprocess(TRANSFORMS[source](), photos()))
    predictor = Predictor(tmp_path / 'ckpt.msgpack', compilation_cache=False)
    assert predictor.spec['size'] == size
    got = predictor.logits(photos())
    record_property('image_size', size)
    record_property('logit_error', assert_logits_close(got, expected))
    assert len(set(expected.argmax(-1))) > 1, 'the photos should not all get the same class'
