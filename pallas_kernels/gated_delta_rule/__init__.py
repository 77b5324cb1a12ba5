"""Gated delta rule (Gated DeltaNet): chunked training/prefill form, recurrent decode form, fp32 oracle."""

from .chunk import chunk_gated_delta_rule
from .fused_recurrent import fused_recurrent_gated_delta_rule
from .naive import naive_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "naive_recurrent_gated_delta_rule"]
