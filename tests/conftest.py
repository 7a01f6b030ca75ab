"""Fixtures shared by several test files (plain helpers are in helpers.py)."""
from __future__ import annotations

import subprocess

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


@pytest.fixture
def full_disk(tmp_path):
    """A factory: `full_disk(n_bytes)` mounts a tmpfs of `n_bytes` (whole pages) on a new folder
    and returns it, a disk that fills up for real (ENOSPC); unmounted after the test. Skips the
    test where mounting is not allowed (it needs root, as here and in CI)."""
    mounted = []

    def mount(n_bytes: int):
        folder = tmp_path / f'disk-{len(mounted)}'
        folder.mkdir()
        try:
            result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={n_bytes}', 'tmpfs',
                                     str(folder)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f'cannot mount a tmpfs: {e}')
        if result.returncode != 0:
            pytest.skip(f'cannot mount a tmpfs: {result.stderr.strip()}')
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(['umount', '--lazy', str(folder)], capture_output=True, timeout=30)
