"""A persistent XLA compilation cache, so that a second run skips compiling (minutes on CPU for
the larger variants). On by default in `python -m train`, `python -m effnetv2_jax.predict` and
`Predictor`; the location is `$EFFNETV2_JAX_CACHE_DIR`, else a cache directory the user already
gave JAX (`jax_compilation_cache_dir`), else `~/.cache/effnetv2_jax/xla`;
`EFFNETV2_JAX_CACHE_DIR=off` disables it.

The cache holds compiled native code that JAX loads and runs, so it is used only when nobody else
can write to it: a new directory is created private (0700), and one that another user owns or
that group or others can write to turns the cache off with a one-line warning.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import jax

ENV_VAR = 'EFFNETV2_JAX_CACHE_DIR'


def _unsafe(path: Path) -> str | None:
    """Why code loaded from the directory `path` could be someone else's, or None."""
    info = path.stat()
    if hasattr(os, 'getuid') and info.st_uid != os.getuid():
        return 'is owned by another user'
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return 'is writable by other users'
    return None


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at `path` (default: see module docstring);
    returns the directory used, or None when disabled or unsafe (see module docstring)."""
    users_own = jax.config.jax_compilation_cache_dir
    path = path or os.environ.get(ENV_VAR) or users_own
    path = path or Path.home() / '.cache' / 'effnetv2_jax' / 'xla'
    if str(path).lower() in ('off', '0', 'none', 'false'):
        return None
    path = Path(path).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        reason = _unsafe(path)
    except OSError as e:
        reason = f'cannot be created ({e.strerror})'
    if reason:
        print(f'warning: compilation cache {path} {reason}; compiling without a cache',
              file=sys.stderr)
        jax.config.update('jax_compilation_cache_dir', None)
        return None
    if str(path) != users_own:  # else the user's own settings stand
        jax.config.update('jax_compilation_cache_dir', str(path))
        # Cache everything that took a noticeable time to compile, not only very slow programs.
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    return path
