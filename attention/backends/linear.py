"""Efficient Attention (Shen et al., WACV 2021): linear in tokens, an approximation of softmax attention.

Per head: out = softmax_D(q · scale) · (softmax_M(k)ᵀ v), where softmax_D normalises over the
feature dim and softmax_M over the tokens. O(N·D·Dv) time, O((N + M)·D) memory; everything is
accumulated in fp32, so fp16/bf16 inputs cannot overflow.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..masks import NormalizedMask, RegionMask
from .base import KEY_PADDING, AttentionCall, Backend, tracing


# Without subtracting the max, exp(k) is used only when the normaliser shows it was safe: finite (no
# overflow) and above this floor (the largest terms are normal floats, so nothing of weight was lost).
DIRECT_EXP_MIN_NORM = 1e-20
# Tokens per step: the fp32 temporaries are (B, TOKEN_CHUNK, H, D), small enough to stay in cache and
# be reused by the allocator, whatever N is.
TOKEN_CHUNK = 2048


def key_bias_from_mask(mask: NormalizedMask) -> Optional[torch.Tensor]:
    """(B|1, M, 1, 1) additive fp32 bias per key from a key-padding mask, or None."""
    if mask.dense is None:
        return None
    dense = mask.dense[:, 0, 0, :, None, None]  # (B|1, M, 1, 1)
    if dense.dtype == torch.bool:
        return torch.zeros(dense.shape, device=dense.device).masked_fill(~dense, float("-inf"))
    return dense.float()


def linear_context(k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax_M(k + key_bias)ᵀ v per head: k (B, M, H, D), v (B, M, H, Dv) -> (B, H, D, Dv) fp32.

    Streams the tokens in chunks (fp32 temporaries of TOKEN_CHUNK tokens, not of M). Masked keys
    (bias -inf) get weight exactly 0; a head with no allowed key gets a zero context. On CPU without a
    mask, exp(k) is tried first without the max pass (softmax is shift-invariant) and redone with it
    only if that overflowed or underflowed (not while torch.compile traces: that check reads the tensor).
    """
    if key_bias is None and k.device.type == "cpu" and not tracing():
        context, norm = _context_sums(k, v, None, None)
        if bool(torch.isfinite(norm).all()) and bool((norm > DIRECT_EXP_MIN_NORM).all()):
            return context.div_(norm[..., None])
    k_max = torch.stack([_logits(k, key_bias, start, stop).amax(dim=1) for start, stop in _chunks(k.shape[1])])
    k_max = torch.nan_to_num(k_max.amax(dim=0), neginf=0.0)[:, None]  # all keys masked: exp(-inf - 0) = 0
    context, norm = _context_sums(k, v, key_bias, k_max)
    return context.div_(norm.clamp_min(torch.finfo(torch.float32).tiny)[..., None])


def _chunks(tokens: int):
    return [(start, min(tokens, start + TOKEN_CHUNK)) for start in range(0, tokens, TOKEN_CHUNK)]


def _logits(k, key_bias, start, stop):
    chunk = k[:, start:stop].float()
    return chunk if key_bias is None else chunk + key_bias[:, start:stop]


def _context_sums(k, v, key_bias, k_max):
    """Σ_m exp(k_m + bias_m - k_max) v_m per head (B, H, D, Dv), and Σ_m exp(...) (B, H, D); fp32."""
    batch, m, heads, dim = k.shape
    context = torch.zeros(heads, batch, dim, v.shape[-1], device=k.device)  # head-major: context[h] contiguous
    norm = torch.zeros(batch, heads, dim, device=k.device)
    for start, stop in _chunks(m):
        k_exp = _logits(k, key_bias, start, stop)
        k_exp = torch.exp(k_exp) if k_max is None else torch.sub(k_exp, k_max).exp_()
        v_chunk = v[:, start:stop].float()
        norm += k_exp.sum(dim=1)
        for h in range(heads):  # one (D, chunk) @ (chunk, Dv) product per head, on strided views: no copies
            context[h].baddbmm_(k_exp[:, :, h].transpose(1, 2), v_chunk[:, :, h])
    return context.transpose(0, 1), norm


def apply_context(q: torch.Tensor, context: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax_D(q · scale) @ context per head: q (B, N, H, D), context (B, H, D, Dv) fp32 -> (B, N, H, Dv)
    in q's dtype, computed in fp32 in chunks of TOKEN_CHUNK queries."""
    batch, n, heads, _ = q.shape
    out = torch.empty(batch, n, heads, context.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(batch):
        for start in range(0, n, TOKEN_CHUNK):
            stop = min(n, start + TOKEN_CHUNK)
            q_chunk = q[b, start:stop].float()
            q_soft = torch.softmax(q_chunk if scale is None else q_chunk * scale, dim=-1)
            out[b, start:stop] = torch.bmm(q_soft.transpose(0, 1), context[b]).transpose(0, 1)
    return out


def linear_attention(q, k, v, mask: NormalizedMask = NormalizedMask(), scale: Optional[float] = None):
    """q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> (B, H, N, Dv) in q's dtype.

    ``mask`` may hold a key-padding dense mask (B|1, 1, 1, M) and/or a RegionMask. Works on
    (B, N, H, D) views internally, so ComfyUI's (B, N, H*D) tensors are never transposed in memory.
    """
    q_tokens, k_tokens, v_tokens = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    key_bias = key_bias_from_mask(mask)
    if mask.region is None:
        out = apply_context(q_tokens, linear_context(k_tokens, v_tokens, key_bias), scale)
    else:
        out = _region_linear(q_tokens, k_tokens, v_tokens, mask.region, key_bias, scale)
    return out.transpose(1, 2)


def _region_linear(q, k, v, region: RegionMask, key_bias, scale):
    """One context per query label: keys of that label plus the -1 keys; -1 queries see every key."""
    query_labels = region.query_labels[:, :, None, None]  # (B|1, N, 1, 1)
    key_labels = region.key_labels[:, :, None, None]  # (B|1, M, 1, 1)
    out = None
    for label in region.derived("query_label_values", lambda: torch.unique(region.query_labels).tolist()):
        bias = key_bias
        if label != -1:
            outside = torch.zeros(key_labels.shape, device=k.device).masked_fill(
                (key_labels != label) & (key_labels != -1), float("-inf"))
            bias = outside if bias is None else bias + outside
        group_out = apply_context(q, linear_context(k, v, bias), scale)
        out = group_out if out is None else torch.where(query_labels == label, group_out, out)
    return out


class LinearBackend(Backend):
    name = "linear"
    exact = False
    description = ("approximate; Efficient Attention (Shen et al. 2021), O(N) memory and time, one context for "
                   "all queries (so not causal); key-padding and region masks")
    causal = False
    dense_masks = KEY_PADDING

    def forward(self, call: AttentionCall) -> torch.Tensor:
        call = call.with_kv_heads_repeated()
        return linear_attention(call.q, call.k, call.v, call.mask, call.scale)
