"""Model zoo (architectures from the literature) and the embedded default model."""

from .layers import LastLayerNormalizedLinear, MinMax
from .zoo import (
    ARCHITECTURES,
    DEFAULT_INPUT_SHAPE,
    ScaledResidualConv,
    build,
    c2f2,
    c4f3,
    c6f2,
    c8f2,
    default_model,
    default_samples,
    liresnet,
    mlp,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_INPUT_SHAPE",
    "LastLayerNormalizedLinear",
    "MinMax",
    "ScaledResidualConv",
    "build",
    "c2f2",
    "c4f3",
    "c6f2",
    "c8f2",
    "default_model",
    "default_samples",
    "liresnet",
    "mlp",
]
