"""EfficientNetV2 in JAX/Flax, with weights converted from PyTorch (see `python -m convert`)."""
__version__ = '0.1.0'

from effnetv2_jax.cache import enable_compilation_cache
from effnetv2_jax.checkpoint import load, save
from effnetv2_jax.configs import VARIANTS, Stage, Variant, get_variant
from effnetv2_jax.hub import push_to_hub, save_pretrained
from effnetv2_jax.layers import BatchNorm, ConvBNAct, DropPath, SqueezeExcite
from effnetv2_jax.model import EfficientNetV2, FusedMBConv, MBConv, create_model, list_models
from effnetv2_jax.predictor import Prediction, Predictor
from effnetv2_jax.transforms import preprocess

__all__ = [
    'BatchNorm', 'ConvBNAct', 'DropPath', 'EfficientNetV2', 'FusedMBConv', 'MBConv', 'Prediction',
    'Predictor', 'Stage', 'SqueezeExcite', 'VARIANTS', 'Variant', 'create_model',
    'enable_compilation_cache', 'get_variant', 'list_models', 'load', 'preprocess',
    'push_to_hub', 'save', 'save_pretrained',
]
