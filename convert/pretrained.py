"""Moved to `effnetv2_jax.pretrained` (torch-free, so the model package stands alone); this name keeps
old imports working and is the same module."""
import sys

from effnetv2_jax import pretrained

sys.modules[__name__] = pretrained
