"""ToDo (Smith et al. 2024, "ToDo: Token Downsampling for Efficient Generation of High-Resolution Images"):
exact softmax attention of every query over keys and values pooled f x f on the image-token grid.

A pooled key stands for the keys of its window: it gets the logit bias log(sum of the window's key weights)
(log f² without a mask), so its softmax mass against the unpooled tokens (text, reference images) is the
window's, not one token's. With a key-padding mask the weights are exp(bias) per key: masked keys drop out
of their window's average, and a window with no allowed key drops out entirely. Tokens outside the grid are
kept as they are. The cost falls with the key count: N x (M_grid / f² + M_other).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from .base import KEY_PADDING, AttentionCall, Backend, compute_dtype
from .sdpa import sdpa_dense

DOWNSAMPLE_FACTORS = (2, 3, 4)


def grid_windows(layout: TokenLayout, downsample: int) -> Tuple[int, int]:
    """Pooled grid height and width (partial windows at the edges count as windows)."""
    return math.ceil(layout.height / downsample), math.ceil(layout.width / downsample)


def pool_grid(tokens: torch.Tensor, layout: TokenLayout, downsample: int) -> torch.Tensor:
    """Window sums on the grid: tokens (B, H, F*h*w, D) -> (B, H, F*ph*pw, D) in fp32.

    The grid is zero-padded to whole windows, so edge windows sum fewer tokens."""
    batch, heads, _, dim = tokens.shape
    frames, height, width = layout.frames, layout.height, layout.width
    pooled_h, pooled_w = grid_windows(layout, downsample)
    grid = tokens.float().reshape(batch * heads * frames, height, width, dim)
    pad_h, pad_w = pooled_h * downsample - height, pooled_w * downsample - width
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    windows = grid.view(batch * heads * frames, pooled_h, downsample, pooled_w, downsample, dim)
    return windows.sum(dim=(2, 4)).view(batch, heads, frames * pooled_h * pooled_w, dim)


def key_padding_bias(call: AttentionCall) -> Optional[torch.Tensor]:
    """(B|1, M) fp32 additive bias per key from a key-padding mask (-inf where masked), or None."""
    dense = call.mask.dense
    if dense is None:
        return None
    dense = dense[:, 0, 0, :]
    return torch.zeros(dense.shape, device=dense.device).masked_fill(~dense, float("-inf")) if (
        dense.dtype == torch.bool) else dense.float()


def pool_keys(k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor], layout: TokenLayout,
              downsample: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid's keys and values averaged per window with weights exp(key bias) (1 without a mask), and each
    pooled key's bias log(sum of its weights): log(count) without a mask, -inf for a window of masked keys.

    k (B, H, M, D), v (B, H, M, Dv), key_bias (B|1, M) or None -> (B, H, P, D), (B, H, P, Dv) fp32, (B|1, P).
    """
    grid = slice(layout.before, layout.before + layout.image_tokens)
    if key_bias is None:
        shift = torch.zeros(1, 1, device=k.device)
        weights = torch.ones(1, 1, layout.image_tokens, 1, device=k.device)
    else:  # exp(bias - shift) stays finite for large biases; the shift comes back in the pooled keys' bias
        shift = key_bias[:, grid].amax(dim=1, keepdim=True).nan_to_num(neginf=0.0)
        weights = torch.exp(key_bias[:, grid] - shift)[:, None, :, None]
    window_weight = pool_grid(weights, layout, downsample)  # (B|1, 1, P, 1)
    normaliser = window_weight.clamp_min(torch.finfo(torch.float32).tiny)

    def pooled_mean(t):
        return pool_grid(t[:, :, grid] if key_bias is None else t[:, :, grid] * weights, layout, downsample) / normaliser

    return pooled_mean(k), pooled_mean(v), torch.log(window_weight[:, 0, :, 0]) + shift


def todo_attention(call: AttentionCall, layout: TokenLayout, downsample: int) -> torch.Tensor:
    """(B, H, N, Dv) in q's dtype: q attends to [before tokens, pooled grid, after tokens] with pooling biases
    (pool_keys)."""
    q, k, v = call.q, call.k, call.v
    work = compute_dtype(q)
    grid = slice(layout.before, layout.before + layout.image_tokens)
    key_bias = key_padding_bias(call)
    pooled_k, pooled_v, pooled_bias = pool_keys(k, v, key_bias, layout, downsample)
    pooled = pooled_k.shape[2]
    keys = torch.cat([k[:, :, :layout.before].to(work), pooled_k.to(work), k[:, :, grid.stop:].to(work)], dim=2)
    values = torch.cat([v[:, :, :layout.before].to(work), pooled_v.to(work), v[:, :, grid.stop:].to(work)], dim=2)
    bias = torch.zeros(pooled_bias.shape[0], keys.shape[2], device=q.device)
    if key_bias is not None:
        bias[:, :layout.before] = key_bias[:, :layout.before]
        bias[:, layout.before + pooled:] = key_bias[:, grid.stop:]
    bias[:, layout.before:layout.before + pooled] = pooled_bias
    bias = bias[:, None, None, :].to(work)
    if key_bias is None:  # every key finite: no row can be empty, so no scan for one
        return F.scaled_dot_product_attention(q.to(work), keys, values, attn_mask=bias, scale=call.scale).to(q.dtype)
    return sdpa_dense(q.to(work), keys, values, bias, call.scale).to(q.dtype)


def layout_reasons(call: AttentionCall) -> List[str]:
    """Why a call's keys cannot be placed on its layout's grid (shared by the grid-based backends)."""
    layout = call.layout
    if layout is None:
        return ["needs the token layout of the keys (layout=TokenLayout(frames, height, width, before, after))"]
    m = call.k.shape[2]
    if layout.before + layout.image_tokens + layout.after != m:
        return [f"the layout {layout} accounts for {layout.before + layout.image_tokens + layout.after} tokens, but "
                f"the keys are {m} tokens"]
    return []


def self_attention_reasons(call: AttentionCall) -> List[str]:
    """Why a backend that needs the queries on the keys' layout (window, agent) cannot serve the call."""
    if call.q.shape[2] == call.k.shape[2]:
        return []
    return [f"needs self-attention with the queries on the keys' layout; got {call.q.shape[2]} queries and "
            f"{call.k.shape[2]} keys"]


def grid_region_reason(what: str) -> str:
    """Why a grid-based approximation (todo, agent, window) refuses region masks."""
    return (f"region masks are not supported: {what} mixes the tokens of neighbouring regions, so the regions could "
            "not be kept apart exactly")


class ToDoBackend(Backend):
    name = "todo"
    exact = False
    description = ("approximate; ToDo (Smith et al. 2024): exact softmax over keys/values average-pooled "
                   "downsample x downsample on the image grid (log-count bias per pooled key), text kept; needs "
                   "a layout")
    option_defaults = {"downsample": 2}
    benchmark_options = tuple({"downsample": f} for f in DOWNSAMPLE_FACTORS)
    causal = False
    dense_masks = KEY_PADDING
    region_masks = grid_region_reason("pooling keys")

    def not_supported_reasons(self, call: AttentionCall):
        reasons = super().not_supported_reasons(call) + layout_reasons(call)
        downsample = self.option(call, "downsample")
        if downsample not in DOWNSAMPLE_FACTORS:
            reasons.append(f"downsample={downsample!r}; expected one of {DOWNSAMPLE_FACTORS}")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        return todo_attention(call.with_kv_heads_repeated(), call.layout, self.option(call, "downsample"))
