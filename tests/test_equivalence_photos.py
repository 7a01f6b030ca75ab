"""EfficientNetV2-S at its eval size 384 on real photos (scikit-image samples), three layouts.

Tolerance and method as in test_equivalence.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import (SOURCES, assert_logits_close, convert, jitted_apply, noise,
                      real_photos, torch_logits)
from convert.torch_reference import randomize_


@pytest.mark.parametrize('source', ['seed-s', 'torchvision-s', 'timm-tf-s'])
def test_s_at_eval_size_384_matches_pytorch_on_real_photos(source, tmp_path, record_property):
    factory, flags = SOURCES[source]
    module = randomize_(factory(), seed=7, calibration_size=384)
    model, variables, _ = convert(module, tmp_path, *flags)
    images = np.concatenate([real_photos(384), noise(384, batch=1)])
    record_property('logit_error', assert_logits_close(
        np.asarray(jitted_apply(model)(variables, images)), torch_logits(module, images)))


