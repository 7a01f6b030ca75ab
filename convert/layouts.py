"""Moved to `effnetv2_jax.layouts` (torch-free, so the model package stands alone); this name keeps
old imports working and is the same module."""
import sys

from effnetv2_jax import layouts

sys.modules[__name__] = layouts
