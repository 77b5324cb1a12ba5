"""Flax NNX modules of InfiniteVL and of its Qwen2.5-VL teacher (the same modules, another layer pattern)."""
