"""Local windows at full resolution plus pooled distant keys (in the spirit of HiDiffusion's MSW-MSA and ToDo).

The image grid is cut into window x window blocks. A query of a block attends, in one softmax, to
- the keys of its neighbourhood at full resolution: its block and a halo of window / 4 tokens around it (so
  no query sits at the edge of its own neighbourhood's block),
- the rest of the grid pooled downsample x downsample, each pooled key with the log-count bias of todo.py
  (the pooled keys inside the neighbourhood are left out: those tokens are already there at full resolution),
- the tokens outside the grid (text, reference images), as they are.
Trained diffusion models attend sharply to their neighbourhood and broadly further away: the neighbourhood
stays exact, the rest is summarised. Queries outside the grid attend to every key exactly (they are few).
Cost per image query: (window + 2 halo)² + M_grid / downsample² + M_other keys. A single-frame grid that fits
in one window is exact attention, and is computed as such.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from .base import KEY_PADDING, AttentionCall, Backend, compute_dtype
from .sdpa import sdpa_dense
from .todo import grid_region_reason, key_padding_bias, layout_reasons, pool_keys, self_attention_reasons

WINDOW_SIZES = (8, 16, 32)
DOWNSAMPLE_FACTORS = (2, 4)
# Blocks per SDPA call (whole block rows where they fit): their keys and values, the shared pooled and text keys
# repeated for every block, stay below this.
CHUNK_BYTES = 64 << 20


def halo_for(window: int, downsample: int) -> int:
    """The neighbourhood's margin around a block: window / 4, rounded up to whole pooling windows (so every
    pooling window is either inside a neighbourhood or outside it)."""
    return downsample * math.ceil(window / 4 / downsample)


def _padded_grid(t: torch.Tensor, layout: TokenLayout, window: int, halo: int) -> torch.Tensor:
    """Grid tokens (B, H, F*h*w, D) -> (B, H, F, halo + bh*window + halo, same for the width, D), zeros outside."""
    blocks_h, blocks_w = math.ceil(layout.height / window), math.ceil(layout.width / window)
    grid = t.reshape(t.shape[0], t.shape[1], layout.frames, layout.height, layout.width, t.shape[-1])
    padding = (0, 0, halo, blocks_w * window - layout.width + halo, halo, blocks_h * window - layout.height + halo)
    return F.pad(grid, padding) if any(padding) else grid


def _chunk_blocks(padded: torch.Tensor, frame: int, rows: slice, columns: slice, window: int, halo: int
                  ) -> torch.Tensor:
    """The blocks of block rows ``rows`` and block columns ``columns`` of one frame, each with ``halo`` tokens
    around it: (B, rows*columns, H, (window + 2 halo)², D), copied from the padded grid (B, H, F, Hp, Wp, D)."""
    side = window + 2 * halo
    region = padded[:, :, frame, rows.start * window:rows.stop * window + 2 * halo,
                    columns.start * window:columns.stop * window + 2 * halo]
    blocks = region.unfold(2, side, window).unfold(3, side, window)  # (B, H, rows, columns, D, side, side)
    batch, heads, _, _, dim = blocks.shape[:5]
    return blocks.permute(0, 2, 3, 1, 5, 6, 4).reshape(batch, -1, heads, side * side, dim)


def pooled_neighbourhood(layout: TokenLayout, window: int, downsample: int, halo: int, device) -> torch.Tensor:
    """(blocks, pooled keys) boolean: which pooled keys lie in each window block's neighbourhood (its own frame, the
    block and its halo; halo and window are whole pooling windows), so the block reads them exactly instead."""
    blocks_h, blocks_w = math.ceil(layout.height / window), math.ceil(layout.width / window)

    def inside(pooled_count, block_count, size):  # (blocks along one axis, pooled windows along it)
        start = torch.arange(pooled_count, device=device) * downsample
        stop = (start + downsample).clamp_max(size)
        low = torch.arange(block_count, device=device)[:, None] * window - halo
        return (start[None] >= low) & (stop[None] <= low + window + 2 * halo)

    rows = inside(math.ceil(layout.height / downsample), blocks_h, layout.height)
    columns = inside(math.ceil(layout.width / downsample), blocks_w, layout.width)
    frames = torch.eye(layout.frames, dtype=torch.bool, device=device)
    neighbourhood = (frames[:, None, None, :, None, None] & rows[None, :, None, None, :, None]
                     & columns[None, None, :, None, None, :])  # (F, bh, bw, F, ph, pw)
    return neighbourhood.reshape(layout.frames * blocks_h * blocks_w, -1)


def _block_chunks(frames: int, blocks_h: int, blocks_w: int, rows_per_chunk: int, columns_per_chunk: int):
    """(frame, block rows, block columns) of each chunk of window blocks, in order."""
    for frame in range(frames):
        for row_start in range(0, blocks_h, rows_per_chunk):
            for column_start in range(0, blocks_w, columns_per_chunk):
                yield (frame, slice(row_start, min(blocks_h, row_start + rows_per_chunk)),
                       slice(column_start, min(blocks_w, column_start + columns_per_chunk)))


def window_attention(call: AttentionCall, layout: TokenLayout, window: int, downsample: int) -> torch.Tensor:
    """(B, H, N, Dv) in q's dtype; queries and keys on the same layout (self-attention)."""
    work = compute_dtype(call.q)
    q, k, v = call.q.to(work), call.k.to(work), call.v.to(work)
    batch, heads, m, _ = k.shape
    grid = slice(layout.before, layout.before + layout.image_tokens)
    key_bias = key_padding_bias(call)
    key_mask = None if key_bias is None else key_bias[:, None, None, :].to(work)  # for exact attention over all keys
    if layout.frames == 1 and window >= max(layout.height, layout.width):
        # one block holds the whole grid: its neighbourhood is every key, i.e. exact attention
        return sdpa_dense(q, k, v, key_mask, call.scale).to(call.q.dtype)
    bias = torch.zeros(1, m, device=q.device) if key_bias is None else key_bias

    pooled_k, pooled_v, pooled_bias = pool_keys(k, v, key_bias, layout, downsample)  # the whole grid, as todo
    others = torch.cat([torch.arange(layout.before, device=q.device), torch.arange(grid.stop, m, device=q.device)])
    shared = (torch.cat([k[:, :, others], pooled_k.to(work).expand(batch, -1, -1, -1)], dim=2),  # (B, H, S, D)
              torch.cat([v[:, :, others], pooled_v.to(work).expand(batch, -1, -1, -1)], dim=2),
              torch.cat([bias[:, others], pooled_bias.expand(bias.shape[0], -1)], dim=1))  # (B|1, S)
    out = torch.empty(batch, heads, q.shape[2], v.shape[-1], dtype=work, device=q.device)
    _grid_attention(out[:, :, grid], q[:, :, grid], k[:, :, grid], v[:, :, grid], bias[:, grid], shared,
                    others.numel(), layout, window, downsample, call.scale)
    if others.numel():  # queries outside the grid: exact over every key
        out[:, :, others] = sdpa_dense(q[:, :, others], k, v, key_mask, call.scale)
    return out.to(call.q.dtype)


def _grid_attention(out, q, k, v, bias, shared, others: int, layout: TokenLayout, window: int, downsample: int,
                    scale) -> None:
    """Fill ``out`` (B, H, I, Dv) for the grid's queries q (B, H, I, D), block by block: each block attends to the
    ``shared`` keys, values and bias (the ``others`` tokens beside the grid, then the pooled grid) less the pooled
    keys of its own neighbourhood, and exactly to its neighbourhood's k, v (B, H, I, ·) with their bias (B|1, I)."""
    batch, heads = q.shape[:2]
    shared_k, shared_v, shared_bias = shared
    halo = halo_for(window, downsample)
    blocks_h, blocks_w = math.ceil(layout.height / window), math.ceil(layout.width / window)
    neighbourhood = pooled_neighbourhood(layout, window, downsample, halo, q.device)
    # the grid padded once (not at all where the windows tile it); each chunk of blocks copies out its own blocks
    padded_q = _padded_grid(q, layout, window, 0)
    padded_k, padded_v = (_padded_grid(t, layout, window, halo) for t in (k, v))
    padded_bias = _padded_grid(bias[:, None, :, None], layout, window, halo)  # (B|1, 1, F, Hp, Wp, 1)
    inside_grid = _padded_grid(torch.ones(1, 1, layout.image_tokens, 1, device=q.device), layout, window, halo) > 0
    tiled = blocks_h * window == layout.height and blocks_w * window == layout.width
    out_grid = _padded_grid(out if tiled else torch.empty_like(out), layout, window, 0)  # a view of out if tiled
    keys_per_block = shared_k.shape[2] + (window + 2 * halo) ** 2
    block_bytes = 2 * batch * heads * keys_per_block * k.shape[-1] * torch.finfo(q.dtype).bits // 8  # its k and v
    blocks_per_chunk = max(1, CHUNK_BYTES // block_bytes)
    for frame, chunk_rows, chunk_columns in _block_chunks(layout.frames, blocks_h, blocks_w,
                                                          max(1, blocks_per_chunk // blocks_w),
                                                          min(blocks_w, blocks_per_chunk)):
        row_count, column_count = chunk_rows.stop - chunk_rows.start, chunk_columns.stop - chunk_columns.start
        count = row_count * column_count
        block_index = ((frame * blocks_h + torch.arange(chunk_rows.start, chunk_rows.stop))[:, None] * blocks_w
                       + torch.arange(chunk_columns.start, chunk_columns.stop)).flatten()

        def blocks_of(padded, margin):  # this chunk's blocks
            return _chunk_blocks(padded, frame, chunk_rows, chunk_columns, window, margin)

        local_bias = blocks_of(padded_bias, halo)[..., 0]  # (B|1, count, 1, side²)
        local_bias = local_bias.masked_fill(~blocks_of(inside_grid, halo)[..., 0], float("-inf"))
        keys = torch.cat([shared_k[:, None].expand(-1, count, -1, -1, -1), blocks_of(padded_k, halo)], dim=3)
        values = torch.cat([shared_v[:, None].expand(-1, count, -1, -1, -1), blocks_of(padded_v, halo)], dim=3)
        mask = torch.cat([shared_bias[:, None, None, :].expand(-1, count, 1, -1).clone(),
                          local_bias.expand(shared_bias.shape[0], -1, -1, -1)], dim=3)
        mask[..., others:others + neighbourhood.shape[1]].masked_fill_(neighbourhood[block_index.to(q.device), None, :],
                                                                        float("-inf"))
        flat = batch * count
        chunk_out = sdpa_dense(blocks_of(padded_q, 0).reshape(flat, heads, window * window, -1),
                               keys.reshape(flat, heads, keys_per_block, -1),
                               values.reshape(flat, heads, keys_per_block, -1),
                               mask.expand(batch, -1, -1, -1).reshape(flat, 1, 1, keys_per_block), scale)
        chunk_out = chunk_out.view(batch, row_count, column_count, heads, window, window, -1)
        out_grid[:, :, frame, chunk_rows.start * window:chunk_rows.stop * window,
                 chunk_columns.start * window:chunk_columns.stop * window] = chunk_out.permute(
            0, 3, 1, 4, 2, 5, 6).reshape(batch, heads, row_count * window, column_count * window, -1)
    if not tiled:
        out.copy_(out_grid[:, :, :, :layout.height, :layout.width].reshape(out.shape))


class WindowBackend(Backend):
    name = "window"
    exact = False
    description = ("approximate; exact attention within each query's neighbourhood (its window x window block of the "
                   "image grid and a window/4 halo) plus the rest pooled downsample x downsample (log-count bias), "
                   "text kept; needs a layout and self-attention")
    option_defaults = {"window": 16, "downsample": 4}
    benchmark_options = ({"window": 8, "downsample": 2}, {"window": 8, "downsample": 4},
                         {"window": 16, "downsample": 2}, {"window": 16, "downsample": 4},
                         {"window": 32, "downsample": 4})
    causal = False
    dense_masks = KEY_PADDING
    region_masks = grid_region_reason("pooling keys")

    def not_supported_reasons(self, call: AttentionCall) -> List[str]:
        reasons = super().not_supported_reasons(call) + layout_reasons(call) + self_attention_reasons(call)
        window, downsample = self.option(call, "window"), self.option(call, "downsample")
        if window not in WINDOW_SIZES:
            reasons.append(f"window={window!r}; expected one of {WINDOW_SIZES}")
        if downsample not in DOWNSAMPLE_FACTORS:
            reasons.append(f"downsample={downsample!r}; expected one of {DOWNSAMPLE_FACTORS}")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        return window_attention(call.with_kv_heads_repeated(), call.layout, self.option(call, "window"),
                                self.option(call, "downsample"))
