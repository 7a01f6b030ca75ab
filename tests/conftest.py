"""Fixtures shared by several test files (plain helpers are in helpers.py)."""
from __future__ import annotations

import pytest

from train.digits import materialize_digits


@pytest.fixture(scope='session')
def digits(tmp_path_factory) -> str:
    """scikit-learn's digits as an image folder (train/, val/, test/), written once per session."""
    return materialize_digits(str(tmp_path_factory.mktemp('data') / 'digits'))
