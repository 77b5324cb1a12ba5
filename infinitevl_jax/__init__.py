"""InfiniteVL in JAX / Flax NNX."""

from infinitevl_jax.config import InfiniteVLConfig, TextConfig, VisionConfig

__all__ = ["InfiniteVLConfig", "TextConfig", "VisionConfig"]
__version__ = "0.1.0"
