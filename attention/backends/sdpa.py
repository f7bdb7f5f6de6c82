"""Exact attention through torch.nn.functional.scaled_dot_product_attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..heads import repeat_kv_heads
from ..masks import restrict_mask, rows_without_keys
from .base import AttentionCall, Backend, compute_dtype


def causal_mask(n: int, m: int, device) -> torch.Tensor:
    """(N, M) boolean lower-triangular mask aligned at the top-left, as torch SDPA's is_causal."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()


def sdpa_dense(q, k, v, mask, scale=None, is_causal=False, enable_gqa=False) -> torch.Tensor:
    """torch SDPA on (B, H, N, D) tensors with a 4-D dense mask or None; rows with no key give zeros."""
    dtype = q.dtype
    work = compute_dtype(q)
    if work != dtype:
        q, k, v = q.to(work), k.to(work), v.to(work)
    if mask is not None and is_causal:
        mask = restrict_mask(mask, causal_mask(q.shape[2], k.shape[2], q.device))
        is_causal = False
    if mask is not None and mask.dtype != torch.bool and mask.dtype != work:
        mask = mask.to(work)
    if enable_gqa:
        k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)
    if mask is not None:
        # Query rows with no allowed key come out of SDPA as 0 or NaN, depending on kernel and version:
        # zero them, scanning whichever is smaller, the mask or the output (then the mask only on a NaN).
        if mask.numel() <= out.numel():
            empty_rows = rows_without_keys(mask)
            if bool(empty_rows.any()):
                out.masked_fill_(empty_rows, 0.0)
        elif bool(torch.isnan(out).any()):
            out.masked_fill_(rows_without_keys(mask), 0.0)
    return out if out.dtype == dtype else out.to(dtype)


class SDPABackend(Backend):
    name = "sdpa"
    description = "exact; torch scaled_dot_product_attention (flash / memory-efficient / math kernels)"

    def not_supported_reasons(self, call: AttentionCall):
        reasons = super().not_supported_reasons(call)
        if call.mask.region is not None:
            reasons.append("region masks need a dense N x M mask here; the masked backend serves them by "
                           "grouping tokens")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        return sdpa_dense(call.q, call.k, call.v, call.mask.dense, call.scale, call.is_causal, call.enable_gqa)
