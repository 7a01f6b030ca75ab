"""Fixtures shared by several test files (plain helpers are in helpers.py)."""
from __future__ import annotations

import pytest

from train.digits import materialize_digits


@pytest.fixture(scope='session')
def digits(tmp_path_factory) -> str:
    """scikit-learn's digits as an image folder (train/, val/, test/), written once per session."""
    return materialize_digits(str(tmp_path_factory.mktemp('data') / 'digits'))


@pytest.fixture(scope='session')
def small_variables():
    """Random variables of EfficientNetV2-B0 with 3 classes (helpers.SMALL_METADATA), numpy."""
    import jax
    import numpy as np

    import effnetv2_jax
    from helpers import random_variables
    model = effnetv2_jax.create_model('b0', num_classes=3)
    return jax.device_get(random_variables(model, np.zeros((1, 32, 32, 3), np.float32)))
