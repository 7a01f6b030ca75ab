"""A persistent XLA compilation cache, so that a second run skips compiling (minutes on CPU for
the larger variants). On by default in `python -m train`, `python -m effnetv2_jax.predict` and
`Predictor`; the location is `$EFFNETV2_JAX_CACHE_DIR`, else a cache directory the user already
gave JAX (`jax_compilation_cache_dir`), else `~/.cache/effnetv2_jax/xla`;
`EFFNETV2_JAX_CACHE_DIR=off` disables it."""
from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = 'EFFNETV2_JAX_CACHE_DIR'


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at `path` (default: see module docstring);
    returns the directory used, or None when disabled."""
    path = path or os.environ.get(ENV_VAR)
    if path is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)  # the user's own choice stands
    path = path or Path.home() / '.cache' / 'effnetv2_jax' / 'xla'
    if str(path).lower() in ('off', '0', 'none', 'false'):
        return None
    path = Path(path).expanduser()
    jax.config.update('jax_compilation_cache_dir', str(path))
    # Cache everything that took a noticeable time to compile, not only very slow programs.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    return path
