"""Plain reference implementations: obviously right, slow, computed in float64.

Shapes: q (B, H, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv) -> out (B, H, N, Dv) in q's dtype.
Masks are the 4-D boolean or additive float masks of ``masks.py`` (broadcasting to (B, H, N, M)).
"""
from __future__ import annotations

from typing import Optional

import torch


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)


def naive_attention(q, k, v, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    is_causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ * scale + mask) v with the full (B, H, N, M) score matrix; rows that may attend
    no key give zeros."""
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * scale
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.double()
            allowed = allowed & ~torch.isneginf(mask)
    if is_causal:
        n, m = scores.shape[-2:]
        allowed = allowed & torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows -> NaN -> 0
    return torch.einsum("bhnm,bhmd->bhnd", weights, v.double()).to(q.dtype)


def naive_linear_attention(q, k, v, allowed: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None) -> torch.Tensor:
    """Efficient Attention (Shen et al., WACV 2021) with an optional (B|1, 1, N, M) boolean ``allowed``.

    Per head: softmax of q over its feature dim (after multiplying by ``scale`` if given), softmax of
    k over the tokens query i may attend, out_i = softmax(q_i) · Σ_j softmax(k)_j ⊗ v_j.
    Materialises a (B, H, N, M, D) weight tensor: only for small test shapes.
    """
    qd = q.double() * (1.0 if scale is None else scale)
    q_soft = torch.softmax(qd, dim=-1)
    b, h, n, _ = q.shape
    m = k.shape[2]
    if allowed is None:
        allowed = torch.ones(1, 1, n, m, dtype=torch.bool, device=q.device)
    logits = k.double()[:, :, None, :, :].expand(b, h, n, m, k.shape[-1])  # (B, H, N, M, D)
    logits = logits.masked_fill(~allowed[..., None], float("-inf"))
    key_weights = torch.softmax(logits, dim=3).nan_to_num(0.0)  # over the keys each query may see
    return torch.einsum("bhnd,bhnmd,bhme->bhne", q_soft, key_weights, v.double()).to(q.dtype)
