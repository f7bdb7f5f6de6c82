"""Heads handling: validate ComfyUI-layout q/k/v and move between layouts.

ComfyUI passes q (B, N, H*D), k (B, M, Hkv*D), v (B, M, Hkv*Dv), or with
``skip_reshape=True`` the split form q (B, H, N, D), k/v (B, Hkv, M, D|Dv).
Every backend works on the split form.
"""
from __future__ import annotations

import torch

HEADS_MISSING = "Number of heads (n_heads) must be specified in options"


def _mismatch(what: str, q, k, v, heads, expected: str) -> ValueError:
    return ValueError(
        f"Mismatch in tensor dimensions: {what}. Got q {tuple(q.shape)}, k {tuple(k.shape)}, "
        f"v {tuple(v.shape)}, heads={heads}; expected {expected}."
    )


def split_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads, *, skip_reshape: bool = False,
                enable_gqa: bool = False):
    """Validate q/k/v and return them as (B, H, N, D), (B, Hkv, M, D), (B, Hkv, M, Dv) views.

    Hkv == H unless ``enable_gqa`` is set, in which case H must be a multiple of Hkv.
    Raises ValueError naming the shapes and what was expected.
    """
    _check_inputs(q, k, v, heads, skip_reshape)
    qh, kh, vh = _check_split(q, k, v, heads) if skip_reshape else _split_packed(q, k, v, heads)
    h, hkv = qh.shape[1], kh.shape[1]
    if hkv != h:
        if not enable_gqa:
            raise _mismatch(f"k/v carry {hkv} heads but q carries {h}", q, k, v, heads,
                            "the same head count for q, k and v (pass enable_gqa=True for grouped-query attention)")
        if h % hkv:
            raise _mismatch(f"q's {h} heads are not a multiple of k/v's {hkv} heads", q, k, v, heads,
                            "heads divisible by the k/v head count for grouped-query attention")
    return qh, kh, vh


def _check_inputs(q, k, v, heads, skip_reshape: bool) -> None:
    """heads, the tensors' kinds, ranks, batch sizes and device."""
    if heads is None or isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        if heads is None or heads == 0:
            raise ValueError(HEADS_MISSING)
        raise ValueError(f"{HEADS_MISSING}: got heads={heads!r}, expected a positive integer")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    rank = 4 if skip_reshape else 3
    layout = "(B, H, N, D)" if skip_reshape else "(B, N, heads*D)"
    if q.ndim != rank or k.ndim != rank or v.ndim != rank:
        raise _mismatch(f"q, k and v must all be {rank}-D", q, k, v, heads,
                        f"{layout} tensors (skip_reshape={skip_reshape})")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise _mismatch("batch sizes differ", q, k, v, heads, "the same batch size B for q, k and v")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_split(q, k, v, heads: int):
    """(B, H, N, D) inputs, already split: checked, returned as they are."""
    if q.shape[1] != heads:
        raise _mismatch("q's head axis differs from heads", q, k, v, heads, f"q of shape (B, {heads}, N, D)")
    if k.shape[2] != v.shape[2]:
        raise _mismatch("k and v token counts differ", q, k, v, heads, "k (B, Hkv, M, D) and v (B, Hkv, M, Dv)")
    if k.shape[1] != v.shape[1]:
        raise _mismatch("k and v head counts differ", q, k, v, heads, "the same head count for k and v")
    if q.shape[3] != k.shape[3]:
        raise _mismatch("q and k head dims differ", q, k, v, heads, "q (..., D) and k (..., D)")
    return q, k, v


def _split_packed(q, k, v, heads: int):
    """(B, N, heads*D) inputs: split into heads (k/v may carry fewer heads of the same dim)."""
    b, n, channels = q.shape
    if channels % heads:
        raise _mismatch(f"q's {channels} channels are not divisible by heads={heads}", q, k, v, heads,
                        "q channels = heads * dim_head")
    dim_head = channels // heads
    if k.shape[1] != v.shape[1]:
        raise _mismatch("k and v token counts differ", q, k, v, heads, "k (B, M, C) and v (B, M, Cv)")
    if k.shape[2] % dim_head:
        raise _mismatch(f"k's {k.shape[2]} channels are not a multiple of dim_head={dim_head}", q, k, v, heads,
                        "k channels = kv_heads * dim_head")
    kv_heads = k.shape[2] // dim_head
    if v.shape[2] % kv_heads:
        raise _mismatch(f"v's {v.shape[2]} channels are not divisible by {kv_heads} heads", q, k, v, heads,
                        "v channels = kv_heads * dim_head_v")
    return (q.view(b, n, heads, dim_head).transpose(1, 2), k.view(b, k.shape[1], kv_heads, dim_head).transpose(1, 2),
            v.view(b, v.shape[1], kv_heads, v.shape[2] // kv_heads).transpose(1, 2))


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dv) -> (B, N, H*Dv)."""
    b, h, n, dv = out.shape
    return out.transpose(1, 2).reshape(b, n, h * dv)


def repeat_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, M, D) -> (B, heads, M, D) for grouped-query attention (a no-op when Hkv == heads)."""
    hkv = t.shape[1]
    return t if hkv == heads else t.repeat_interleave(heads // hkv, dim=1)


def qk_layernorm(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters over the last (head) dim, in fp32, cast back."""
    return torch.nn.functional.layer_norm(t.float(), (t.shape[-1],), eps=eps).to(t.dtype)
