"""Fused Efficient Attention (the ``linear`` backend's maths) in two Triton kernels.

Phase 1 streams the keys once per (batch, head) and writes a (B, H, D, Dv) fp32 context; phase 2
writes softmax_D(q) @ context straight into a (B, N, H, Dv) buffer, so ComfyUI's (B, N, H*Dv) output
needs no transpose copy. Triton is imported only when a kernel first runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..attention.backends.base import KEY_PADDING, AttentionCall, Backend
from ..attention.backends.linear import key_bias_from_mask
from . import triton_support
from .triton_support import ceil_div, dot_precision, padded_dim, runs_interpreted


@dataclass(frozen=True)
class LinearLaunch:
    """Phase 1: key tokens per step and key features per program; phase 2: queries per program and
    features per chunk of the product."""

    block_tokens: int
    block_d: int
    block_n: int
    block_d_chunk: int
    num_warps: int
    num_stages: int


# Small blocks keep the numpy interpreter quick, and still split D (and walk it in chunks) for D > 32.
INTERPRETER_LAUNCH = LinearLaunch(block_tokens=32, block_d=32, block_n=32, block_d_chunk=32, num_warps=1,
                                  num_stages=1)


def linear_launch(dim_pad: int, dim_v_pad: int, element_size: int) -> LinearLaunch:
    """GPU block sizes that keep the tl.dot operands within ~100 KB of shared memory."""
    wide_v = dim_v_pad * element_size > 256
    return LinearLaunch(block_tokens=32 if wide_v else 64, block_d=min(dim_pad, 64), block_n=64,
                        block_d_chunk=min(dim_pad, 32 if dim_v_pad > 128 else 64),
                        num_warps=8 if max(dim_pad, dim_v_pad) >= 128 else 4, num_stages=2)


def _key_bias_rows(call: AttentionCall) -> Optional[torch.Tensor]:
    """(B|1, M) fp32 additive key bias from a key-padding mask, or None."""
    bias = key_bias_from_mask(call.mask)  # (B|1, M, 1, 1)
    return None if bias is None else bias[:, :, 0, 0].contiguous()


def linear_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor],
                            scale: Optional[float]) -> torch.Tensor:
    """q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv), key_bias (B|1, M) fp32 or None -> (B, H, N, Dv).

    The result is a (B, H, N, Dv) view of a (B, N, H, Dv)-contiguous tensor in q's dtype.
    """
    kernels = triton_support.load_kernels("linear_triton_kernels")
    batch, heads, n, dim = q.shape
    m, dim_v = k.shape[2], v.shape[-1]
    out = torch.empty(batch, n, heads, dim_v, dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    interpreted = runs_interpreted(kernels.linear_context_kernel)
    dim_pad, dim_v_pad = padded_dim(dim), padded_dim(dim_v)
    launch = INTERPRETER_LAUNCH if interpreted else linear_launch(dim_pad, dim_v_pad, q.element_size())
    context = torch.empty(batch, heads, dim, dim_v, dtype=torch.float32, device=q.device)
    bias_strides = (0, 0) if key_bias is None else (key_bias.stride(0) if key_bias.shape[0] > 1 else 0,
                                                     key_bias.stride(1))
    kernels.linear_context_kernel[(batch * heads, ceil_div(dim, launch.block_d))](
        k, v, k if key_bias is None else key_bias, context,
        heads, m, dim, dim_v,
        *k.stride(), *v.stride(), *bias_strides, *context.stride(),
        HAS_KEY_BIAS=key_bias is not None, UPCAST=interpreted or q.dtype == torch.float32,
        DOT_PRECISION=dot_precision(q.dtype, interpreted),
        BLOCK_TOKENS=launch.block_tokens, BLOCK_D=launch.block_d, BLOCK_DV=dim_v_pad,
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    for part in triton_support.batch_parts(batch, heads):  # batch * heads is the grid's y axis
        kernels.linear_output_kernel[(ceil_div(n, launch.block_n), (part.stop - part.start) * heads)](
            q[part], context[part], out[part],
            heads, n, dim, dim_v, 1.0 if scale is None else float(scale),
            *q.stride(), *context.stride(), *out.stride(),
            DOT_PRECISION=dot_precision(torch.float32, interpreted),
            BLOCK_N=launch.block_n, BLOCK_D=launch.block_d_chunk, BLOCK_DV=dim_v_pad,
            num_warps=launch.num_warps, num_stages=1)
    return out


class LinearTritonBackend(Backend):
    name = "linear_triton"
    exact = False
    description = ("approximate; Efficient Attention (Shen et al. 2021) fused in two Triton kernels, O(N); "
                   "key-padding masks")
    causal = False
    gqa = False
    dense_masks = KEY_PADDING
    region_masks = "region masks are not fused; backend 'linear' serves them with one context per label"

    def unavailable_reason(self) -> Optional[str]:
        return triton_support.triton_unavailable_reason()

    def slow_reason(self) -> Optional[str]:
        return triton_support.interpreted_reason()

    def not_supported_reasons(self, call: AttentionCall) -> List[str]:
        reasons = super().not_supported_reasons(call)
        reasons += triton_support.call_reasons(call)
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        return linear_attention_triton(call.q, call.k, call.v, _key_bias_rows(call), call.scale)
