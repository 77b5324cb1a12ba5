"""Pallas kernels (TPU and GPU) with pure-JAX references."""
