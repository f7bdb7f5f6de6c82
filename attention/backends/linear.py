"""Efficient Attention (Shen et al., WACV 2021): linear in tokens, an approximation of softmax attention.

Per head: out = softmax_D(q · scale) · (softmax_M(k)ᵀ v), where softmax_D normalises over the
feature dim and softmax_M over the tokens. O(N·D·Dv) time, O((N + M)·D) memory; everything is
accumulated in fp32, so fp16/bf16 inputs cannot overflow.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..masks import NormalizedMask, RegionMask
from .base import AttentionCall, Backend


# |k| <= 60: exp(k) lies in [8.7e-27, 1.2e26], so its sum over fewer than 1e12 tokens fits fp32 without
# subtracting the max first. Saves a full pass over k on CPU (one min/max pass instead).
EXP_SAFE_BOUND = 60.0


def _within(t: torch.Tensor, bound: float) -> bool:
    low, high = torch.aminmax(t)
    return max(-float(low), float(high)) <= bound


def key_bias_from_mask(mask: NormalizedMask) -> Optional[torch.Tensor]:
    """(B|1, M, 1, 1) additive fp32 bias per key from a key-padding mask, or None."""
    if mask.dense is None:
        return None
    dense = mask.dense[:, 0, 0, :, None, None]  # (B|1, M, 1, 1)
    if dense.dtype == torch.bool:
        return torch.zeros(dense.shape, device=dense.device).masked_fill(~dense, float("-inf"))
    return dense.float()


def linear_context(k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax_M(k + key_bias)ᵀ v per head: k (B, M, H, D), v (B, M, H, Dv) fp32 -> (B, H, D, Dv) fp32.

    Masked keys (bias -inf) get weight exactly 0; a head with no allowed key gets a zero context.
    """
    if key_bias is None and k.device.type == "cpu" and _within(k, EXP_SAFE_BOUND):
        k_exp = torch.exp(k)  # softmax is shift-invariant, and here neither exp nor its sum can overflow
    else:
        logits = k if key_bias is None else k + key_bias
        k_max = logits.amax(dim=1, keepdim=True)
        if key_bias is not None:
            k_max = torch.nan_to_num(k_max, neginf=0.0)  # all keys masked: exp(-inf - 0) = 0 below
        k_exp = torch.sub(logits, k_max).exp_()
    norm = k_exp.sum(dim=1)  # (B, H, D)
    batch, _, heads, dim = k.shape
    context = k.new_empty(batch, heads, dim, v.shape[-1])
    for h in range(heads):  # one (D, M) @ (M, Dv) product per head, on strided views: no copies
        torch.bmm(k_exp[:, :, h].transpose(1, 2), v[:, :, h], out=context[:, h])
    return context.div_(norm.clamp_min(torch.finfo(torch.float32).tiny)[..., None])


def apply_context(q_soft: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """q_soft (B, N, H, D) @ context (B, H, D, Dv) per head -> (B, N, H, Dv)."""
    batch, n, heads, _ = q_soft.shape
    out = q_soft.new_empty(batch, n, heads, context.shape[-1])
    for h in range(heads):
        torch.bmm(q_soft[:, :, h], context[:, h], out=out[:, :, h])
    return out


def linear_attention(q, k, v, mask: NormalizedMask = NormalizedMask(), scale: Optional[float] = None):
    """q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> (B, H, N, Dv) in q's dtype.

    ``mask`` may hold a key-padding dense mask (B|1, 1, 1, M) and/or a RegionMask. Works on
    (B, N, H, D) views internally, so ComfyUI's (B, N, H*D) tensors are never transposed in memory.
    """
    dtype = q.dtype
    q_tokens = q.transpose(1, 2).float()
    q_soft = torch.softmax(q_tokens if scale is None else q_tokens * scale, dim=-1)
    k_tokens, v_tokens = k.transpose(1, 2).float(), v.transpose(1, 2).float()
    key_bias = key_bias_from_mask(mask)
    if mask.region is None:
        out = apply_context(q_soft, linear_context(k_tokens, v_tokens, key_bias))
    else:
        out = _region_linear(q_soft, k_tokens, v_tokens, mask.region, key_bias)
    return out.transpose(1, 2).to(dtype)


def _region_linear(q_soft, k, v, region: RegionMask, key_bias):
    """One context per query label: keys of that label plus the -1 keys; -1 queries see every key."""
    query_labels = region.query_labels[:, :, None, None]  # (B|1, N, 1, 1)
    key_labels = region.key_labels[:, :, None, None]  # (B|1, M, 1, 1)
    out = None
    for label in torch.unique(region.query_labels).tolist():
        bias = key_bias
        if label != -1:
            outside = torch.zeros(key_labels.shape, device=k.device).masked_fill(
                (key_labels != label) & (key_labels != -1), float("-inf"))
            bias = outside if bias is None else bias + outside
        group_out = apply_context(q_soft, linear_context(k, v, bias))
        out = group_out if out is None else torch.where(query_labels == label, group_out, out)
    return out


class LinearBackend(Backend):
    name = "linear"
    exact = False
    description = ("approximate; Efficient Attention (Shen et al. 2021), O(N) memory and time; key-padding "
                   "and region masks")

    def not_supported_reasons(self, call: AttentionCall):
        reasons = super().not_supported_reasons(call)
        if call.is_causal:
            reasons.append("is_causal is not supported: Efficient Attention has one context for all queries")
        if call.k.shape[1] != call.q.shape[1]:
            reasons.append("grouped-query attention (fewer k/v heads than q heads) is not supported")
        if call.mask.dense is not None and not call.mask.is_key_padding:
            reasons.append(f"dense mask of shape {tuple(call.mask.dense.shape)} is not a key-padding mask "
                           "(B or 1, 1, 1, M); only key-padding masks and RegionMasks are supported")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        return linear_attention(call.q, call.k, call.v, call.mask, call.scale)
