"""PyTorch oracles for parity tests: a tiny transformers Qwen2.5-VL, and a Gated DeltaNet layer with the release's
parameter names whose recurrence is transformers' own (qwen3_next ``torch_recurrent_gated_delta_rule``), so the oracle
cannot share a misreading of the math with our JAX code."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TorchGatedDeltaNet(nn.Module):
    """Gated DeltaNet with the release's state-dict names (all under ``self_attn``)."""

    def __init__(self, hidden: int, heads: int, head_k: int, expand_v: int = 2, conv: int = 4, norm_eps: float = 1e-5):
        super().__init__()
        self.h, self.dk, self.dv = heads, head_k, head_k * expand_v
        key_dim, value_dim = heads * head_k, heads * self.dv
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, heads, bias=False)
        self.b_proj = nn.Linear(hidden, heads, bias=False)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(torch.randn(heads) * 0.5)
        self.q_conv1d = nn.Conv1d(key_dim, key_dim, conv, groups=key_dim, padding=conv - 1, bias=False)
        self.k_conv1d = nn.Conv1d(key_dim, key_dim, conv, groups=key_dim, padding=conv - 1, bias=False)
        self.v_conv1d = nn.Conv1d(value_dim, value_dim, conv, groups=value_dim, padding=conv - 1, bias=False)
        self.o_norm = nn.Module()
        self.o_norm.weight = nn.Parameter(torch.ones(self.dv))
        self.norm_eps = norm_eps

    def _conv(self, conv, x):
        T = x.shape[1]
        return F.silu(conv(x.transpose(1, 2))[..., :T].transpose(1, 2))

    def forward(self, hidden_states, **kwargs):
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

        B, T, _ = hidden_states.shape
        x = hidden_states
        q = self._conv(self.q_conv1d, self.q_proj(x)).view(B, T, self.h, self.dk)
        k = self._conv(self.k_conv1d, self.k_proj(x)).view(B, T, self.h, self.dk)
        v = self._conv(self.v_conv1d, self.v_proj(x)).view(B, T, self.h, self.dv)
        beta = self.b_proj(x).float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)
        o, _ = torch_recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
        o = o.float()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.o_norm.weight
        o = o * F.silu(self.g_proj(x).float().view(B, T, self.h, self.dv))
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype)), None


def hf_qwen_config(cfg, *, layer_types=None, tie=True):
    """A transformers Qwen2_5_VLConfig mirroring our tiny InfiniteVLConfig."""
    from transformers import Qwen2_5_VLConfig

    t, v = cfg.text, cfg.vision
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
        tie_word_embeddings=tie, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )
    if layer_types is not None:
        text.update(layer_types=list(layer_types), use_sliding_window=True, sliding_window=t.sliding_window)
    vision = dict(
        depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
        out_hidden_size=v.out_hidden_size, window_size=v.window_size, tokens_per_second=int(v.tokens_per_second),
        fullatt_block_indexes=list(v.fullatt_block_indexes), patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=tie,
    )


def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Perturbs every parameter (weights, biases, norm scales) so no parameter keeps a trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_hf_model(cfg, *, layer_types=None, tie=True, gdn_layers=(), seed=0):
    """A float32 eager transformers Qwen2.5-VL; layers in ``gdn_layers`` get a TorchGatedDeltaNet mixer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = hf_qwen_config(cfg, layer_types=layer_types, tie=tie)
    hf_cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).float().eval()
    t = cfg.text
    for i in gdn_layers:
        model.model.language_model.layers[i].self_attn = TorchGatedDeltaNet(
            t.hidden_size, t.num_linear_heads, t.linear_head_dim, t.expand_v, t.conv_size, t.linear_norm_eps)
    randomize_(model, seed)
    return model


def to_torch(x, dtype=None):
    t = torch.from_numpy(np.array(x))
    return t if dtype is None else t.to(dtype)
