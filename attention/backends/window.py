"""Local windows at full resolution plus pooled distant keys (in the spirit of HiDiffusion's MSW-MSA and ToDo).

The image grid is cut into window x window blocks. A query of a block attends, in one softmax, to
- the keys of its own block at full resolution,
- the keys of every other block pooled downsample x downsample, each with the log-count bias of todo.py
  (the own block's pooled keys are left out: its tokens are already there at full resolution),
- the tokens outside the grid (text, reference images), as they are.
Trained diffusion models attend sharply to their neighbourhood and broadly further away: the neighbourhood
stays exact, the rest is summarised. Queries outside the grid attend to every key exactly (they are few).
Cost per image query: window² + M_grid / downsample² + M_other keys.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from .base import AttentionCall, Backend, compute_dtype
from .sdpa import sdpa_dense
from .todo import grid_backend_limits, key_padding_bias, pool_grid

WINDOW_SIZES = (8, 16, 32)
DOWNSAMPLE_FACTORS = (2, 4)
# Blocks per SDPA call: their keys (the shared pooled and text keys are repeated for every block) stay below this.
CHUNK_KEY_BYTES = 64 << 20


def _blocks(t: torch.Tensor, layout: TokenLayout, window: int) -> torch.Tensor:
    """Grid tokens (B, H, F*h*w, D), zero-padded to whole windows -> (B, F*bh*bw, H, window², D)."""
    batch, heads, _, dim = t.shape
    blocks_h, blocks_w = math.ceil(layout.height / window), math.ceil(layout.width / window)
    grid = t.reshape(batch, heads, layout.frames, layout.height, layout.width, dim)
    grid = F.pad(grid, (0, 0, 0, blocks_w * window - layout.width, 0, blocks_h * window - layout.height))
    grid = grid.view(batch, heads, layout.frames, blocks_h, window, blocks_w, window, dim)
    return grid.permute(0, 2, 3, 5, 1, 4, 6, 7).reshape(batch, -1, heads, window * window, dim)


def _unblock(blocks: torch.Tensor, layout: TokenLayout, window: int) -> torch.Tensor:
    """(B, F*bh*bw, H, window², D) -> the grid's tokens (B, H, F*h*w, D), padding dropped."""
    batch, _, heads, _, dim = blocks.shape
    blocks_h, blocks_w = math.ceil(layout.height / window), math.ceil(layout.width / window)
    grid = blocks.view(batch, layout.frames, blocks_h, blocks_w, heads, window, window, dim)
    grid = grid.permute(0, 4, 1, 2, 5, 3, 6, 7).reshape(batch, heads, layout.frames, blocks_h * window,
                                                       blocks_w * window, dim)
    return grid[:, :, :, :layout.height, :layout.width].reshape(batch, heads, layout.image_tokens, dim)


def window_attention(call: AttentionCall, layout: TokenLayout, window: int, downsample: int) -> torch.Tensor:
    """(B, H, N, Dv) in q's dtype; queries and keys on the same layout (self-attention)."""
    work = compute_dtype(call.q)
    q, k, v = call.q.to(work), call.k.to(work), call.v.to(work)
    batch, heads, m, _ = k.shape
    grid = slice(layout.before, layout.before + layout.image_tokens)
    key_bias = key_padding_bias(call)
    bias = torch.zeros(1, m, device=q.device) if key_bias is None else key_bias
    bias_batch = bias.shape[0]

    # pooled keys of the whole grid, weighted by exp(key bias) as todo pools them
    shift = bias[:, grid].amax(dim=1, keepdim=True).nan_to_num(neginf=0.0)
    weights = torch.exp(bias[:, grid] - shift)[:, None, :, None]  # (B|1, 1, G, 1)
    window_weight = pool_grid(weights, layout, downsample)  # (B|1, 1, P, 1)
    normaliser = window_weight.clamp_min(torch.finfo(torch.float32).tiny)
    pooled_k = (pool_grid(k[:, :, grid] * weights, layout, downsample) / normaliser).to(work)
    pooled_v = (pool_grid(v[:, :, grid] * weights, layout, downsample) / normaliser).to(work)
    pooled_bias = torch.log(window_weight[:, 0, :, 0]) + shift  # (B|1, P)

    # which block each pooled key lies in (window is a multiple of downsample, so each lies in exactly one)
    pooled_h, pooled_w = math.ceil(layout.height / downsample), math.ceil(layout.width / downsample)
    blocks_h, blocks_w = math.ceil(layout.height / window), math.ceil(layout.width / window)
    ratio = window // downsample
    rows = torch.arange(pooled_h, device=q.device) // ratio
    columns = torch.arange(pooled_w, device=q.device) // ratio
    frames = torch.arange(layout.frames, device=q.device)
    pooled_block = ((frames[:, None, None] * blocks_h + rows[None, :, None]) * blocks_w
                    + columns[None, None, :]).flatten()  # (P,)
    blocks = layout.frames * blocks_h * blocks_w

    others = torch.cat([torch.arange(layout.before, device=q.device), torch.arange(grid.stop, m, device=q.device)])
    shared_k = torch.cat([k[:, :, others], pooled_k.expand(batch, -1, -1, -1)], dim=2)  # (B, H, S, D)
    shared_v = torch.cat([v[:, :, others], pooled_v.expand(batch, -1, -1, -1)], dim=2)
    shared_bias = torch.cat([bias[:, others], pooled_bias.expand(bias_batch, -1)], dim=1)  # (B|1, S)
    own_block = torch.arange(blocks, device=q.device)[:, None] == pooled_block[None, :]  # (blocks, P)

    local_k, local_v, local_q = (_blocks(t[:, :, grid], layout, window) for t in (k, v, q))
    local_bias = _blocks(bias[:, None, grid, None], layout, window)[..., 0]  # (B|1, blocks, 1, window²)
    padded = _blocks(torch.ones(1, 1, layout.image_tokens, 1, device=q.device), layout, window)[..., 0] == 0
    local_bias = local_bias.masked_fill(padded, float("-inf"))  # padding keys outside the grid

    out_blocks = torch.empty(batch, blocks, heads, window * window, v.shape[-1], dtype=work, device=q.device)
    keys_per_block = shared_k.shape[2] + window * window
    chunk = max(1, CHUNK_KEY_BYTES // max(1, batch * heads * keys_per_block * k.shape[-1] * 4))
    for start in range(0, blocks, chunk):
        stop = min(blocks, start + chunk)
        count = stop - start
        keys = torch.cat([shared_k[:, None].expand(-1, count, -1, -1, -1), local_k[:, start:stop]], dim=3)
        values = torch.cat([shared_v[:, None].expand(-1, count, -1, -1, -1), local_v[:, start:stop]], dim=3)
        mask = torch.cat([shared_bias[:, None, None, :].expand(-1, count, 1, -1).clone(),
                          local_bias[:, start:stop].expand(bias_batch, -1, -1, -1)], dim=3)
        pooled_part = mask[..., others.numel():others.numel() + own_block.shape[1]]
        pooled_part.masked_fill_(own_block[start:stop, None, :], float("-inf"))
        mask = mask.expand(batch, -1, -1, -1)
        flat = batch * count
        out_blocks[:, start:stop] = sdpa_dense(
            local_q[:, start:stop].reshape(flat, heads, window * window, -1), keys.reshape(flat, heads, keys_per_block, -1),
            values.reshape(flat, heads, keys_per_block, -1), mask.reshape(flat, 1, 1, keys_per_block), call.scale
        ).view(batch, count, heads, window * window, -1)

    out = torch.empty(batch, heads, q.shape[2], v.shape[-1], dtype=work, device=q.device)
    out[:, :, grid] = _unblock(out_blocks, layout, window)
    if others.numel():  # queries outside the grid: exact over every key
        mask = None if key_bias is None else key_bias[:, None, None, :].to(work)
        out[:, :, others] = sdpa_dense(q[:, :, others], k, v, mask, call.scale)
    return out.to(call.q.dtype)


class WindowBackend(Backend):
    name = "window"
    exact = False
    description = ("approximate; exact attention within each query's window x window block of the image grid plus "
                   "the rest pooled downsample x downsample (log-count bias), text kept; needs a layout and "
                   "self-attention")
    option_defaults = {"window": 16, "downsample": 4}
    benchmark_options = ({"window": 8, "downsample": 2}, {"window": 16, "downsample": 4},
                         {"window": 32, "downsample": 4})

    def not_supported_reasons(self, call: AttentionCall) -> List[str]:
        reasons = super().not_supported_reasons(call) + grid_backend_limits(call, "pooling keys")
        if call.q.shape[2] != call.k.shape[2]:
            reasons.append(f"needs self-attention with the queries on the keys' layout; got {call.q.shape[2]} queries "
                           f"and {call.k.shape[2]} keys")
        window, downsample = self.option(call, "window"), self.option(call, "downsample")
        if window not in WINDOW_SIZES:
            reasons.append(f"window={window!r}; expected one of {WINDOW_SIZES}")
        if downsample not in DOWNSAMPLE_FACTORS:
            reasons.append(f"downsample={downsample!r}; expected one of {DOWNSAMPLE_FACTORS}")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        return window_attention(call, call.layout, self.option(call, "window"), self.option(call, "downsample"))
