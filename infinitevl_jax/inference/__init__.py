"""Inference: caches, generation, streaming video, loading a converted checkpoint."""

from infinitevl_jax.inference.cache import AttentionCache, Cache, GDNCache, init_cache
from infinitevl_jax.inference.engine import InferenceModel, prepare
from infinitevl_jax.inference.generate import SamplingParams, default_stop_tokens, generate

__all__ = ["AttentionCache", "Cache", "GDNCache", "InferenceModel", "SamplingParams", "default_stop_tokens",
           "generate", "init_cache", "prepare"]
