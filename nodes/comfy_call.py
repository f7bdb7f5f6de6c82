"""ComfyUI's attention calling convention, read once per call.

Every attention function of ComfyUI has the signature
``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)``
and its callers use it in every way it allows: ``heads`` positional (UNets, Flux) or keyword (Wan, SD3,
ACE-Step), ``mask`` positional, keyword or absent, ``transformer_options`` as a keyword, and newer
keywords (``scale``, ``enable_gqa``, ``low_precision_attention``) beside unknown future ones. Without
``skip_reshape`` a tensor may also come as (B, N, H, D): SD3 passes v so, and ComfyUI reads it as (B, N, H*D).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


@dataclass(frozen=True)
class ComfyAttentionCall:
    """One call's arguments. q (B, N, H*D) and k/v (B, M, ...), or (B, H, N, D) with ``skip_reshape``;
    ``mask`` as the caller passed it; ``low_precision_allowed`` False where the caller demands full-precision
    attention; ``transformer_options`` the caller's (empty where it passed none)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    mask: Optional[torch.Tensor] = None
    skip_reshape: bool = False
    skip_output_reshape: bool = False
    scale: Optional[float] = None
    enable_gqa: bool = False
    low_precision_allowed: bool = True
    transformer_options: dict = field(default_factory=dict)

    @property
    def token_axis(self) -> int:
        return 2 if self.skip_reshape else 1

    @property
    def query_tokens(self) -> int:
        return self.q.shape[self.token_axis]

    @property
    def key_tokens(self) -> int:
        return self.k.shape[self.token_axis]

    @property
    def channels(self) -> int:
        """q's channels, heads * dim_head."""
        return self.q.shape[1] * self.q.shape[3] if self.skip_reshape else self.q.shape[-1]


def read_call(args: tuple, kwargs: dict) -> Optional[ComfyAttentionCall]:
    """The call's arguments by name, or None when they are not a ComfyUI attention call this pack can read
    (missing q/k/v/heads, too many positional arguments, not tensors of the expected ranks)."""
    if len(args) > len(POSITIONAL):
        return None
    named = dict(zip(POSITIONAL, args))
    for name in POSITIONAL:
        if name in kwargs and name in named:
            return None  # given twice: the original function will say what is wrong
        if name in kwargs:
            named[name] = kwargs[name]
    q, k, v, heads = (named.get(name) for name in ("q", "k", "v", "heads"))
    skip_reshape = bool(named.get("skip_reshape", False))
    ranks = (4,) if skip_reshape else (3, 4)
    if not all(isinstance(t, torch.Tensor) and t.ndim in ranks and t.is_floating_point() for t in (q, k, v)):
        return None
    if not skip_reshape:  # (B, N, H, D) is read as (B, N, H*D), as ComfyUI's own functions do (SD3 passes v so)
        q, k, v = (t.flatten(2) if t.ndim == 4 else t for t in (q, k, v))
    if isinstance(heads, torch.Tensor) or isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        return None
    mask = named.get("mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        return None
    options = kwargs.get("transformer_options")
    return ComfyAttentionCall(
        q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
        skip_output_reshape=bool(named.get("skip_output_reshape", False)), scale=kwargs.get("scale"),
        enable_gqa=bool(kwargs.get("enable_gqa", False)),
        low_precision_allowed=kwargs.get("low_precision_attention", True) is not False,
        transformer_options=options if isinstance(options, dict) else {})
