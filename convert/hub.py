"""Moved to `effnetv2_jax.hub` (torch-free, so the model package stands alone); this name keeps
old imports working and is the same module."""
import sys

from effnetv2_jax import hub

sys.modules[__name__] = hub
