"""Specification of the compilation cache's safety: it holds compiled code that JAX runs, so it is
used only where nobody else can write."""
from __future__ import annotations

import os
import stat

import jax
import pytest

from effnetv2_jax.cache import enable_compilation_cache


@pytest.fixture(autouse=True)
def jax_cache_settings():
    """Each test starts without a cache directory and leaves JAX's settings as it found them."""
    saved = (jax.config.jax_compilation_cache_dir,
             jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update('jax_compilation_cache_dir', None)
    yield
    jax.config.update('jax_compilation_cache_dir', saved[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', saved[1])


def test_a_new_cache_directory_is_private(tmp_path):
    path = tmp_path / 'new' / 'xla'
    assert enable_compilation_cache(path) == path
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert jax.config.jax_compilation_cache_dir == str(path)


@pytest.mark.parametrize('mode', [0o777, 0o770, 0o702])
def test_a_cache_others_can_write_to_is_refused_with_a_one_line_warning(tmp_path, capsys, mode):
    path = tmp_path / 'shared'
    path.mkdir()
    os.chmod(path, mode)
    assert enable_compilation_cache(path) is None
    err = capsys.readouterr().err
    assert err.startswith('warning: ') and 'writable by other users' in err
    assert err.count('\n') == 1
    assert jax.config.jax_compilation_cache_dir is None


def test_a_cache_turned_off_by_the_environment_is_not_created(tmp_path, monkeypatch):
    monkeypatch.setenv('EFFNETV2_JAX_CACHE_DIR', 'off')
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
