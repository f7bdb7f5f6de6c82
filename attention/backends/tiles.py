"""Tile-aligned 3-D windows: the grid cut into frames x rows x columns tiles, each query tile attending exactly to
the key tiles of its neighbourhood, plus the rest pooled (in the spirit of Sliding Tile Attention, Zhang et al.
2025, and Radial Attention, 2025).

The grid (F x h x w tokens) is cut into tiles of tile_frames x tile x tile tokens. A query tile attends, in one
softmax, to
- whole key tiles: those within ``reach`` tiles along rows and columns and ``frame_reach`` tiles along frames (a
  box); with ``radial``, the spatial reach shrinks by one tile per tile of temporal distance (Radial Attention's
  observation: far frames matter only near the query's place). Near the grid's edges the box slides inwards,
  so every query tile reads as many key tiles as one in the middle (as STA does);
- with ``downsample`` > 0, the keys outside those tiles, averaged downsample x downsample within each frame
  (the log-count bias of todo.py);
- the tokens outside the grid (text, reference images), as they are.
Every block of the computation is a whole tile against whole tiles: no token-level mask inside a neighbourhood,
so the work is dense batched SDPA on gathered tiles, the same code on CPU and CUDA. Queries outside the grid
attend to every key exactly. Cost per image query: key tiles x tile size + pooled keys + other tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from .base import KEY_PADDING, AttentionCall, Backend, compute_dtype
from .sdpa import sdpa_dense
from .todo import grid_region_reason, key_padding_bias, layout_reasons, pool_keys, self_attention_reasons

TILE_SIDES = (4, 8, 16, 32)
DOWNSAMPLE_FACTORS = (0, 2, 4, 8)  # 0: no pooled keys beyond the neighbourhood
CHUNK_BYTES = 64 << 20  # gathered keys and values per SDPA call stay below this


@dataclass(frozen=True)
class TileGrid:
    """How a layout's grid is cut: tile shape (frames, rows, columns) in tokens, tile counts along each axis."""

    shape: Tuple[int, int, int]
    counts: Tuple[int, int, int]

    @classmethod
    def of(cls, layout: TokenLayout, tile_frames: int, tile: int) -> "TileGrid":
        shape = (min(tile_frames, layout.frames), min(tile, layout.height), min(tile, layout.width))
        sizes = (layout.frames, layout.height, layout.width)
        return cls(shape, tuple(math.ceil(size / side) for size, side in zip(sizes, shape)))

    @property
    def tiles(self) -> int:
        return self.counts[0] * self.counts[1] * self.counts[2]

    @property
    def tile_tokens(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]


def _window(index: int, reach: int, count: int) -> range:
    """The 2 reach + 1 tiles around ``index`` along an axis of ``count`` tiles, slid inwards at the edges."""
    width = min(2 * reach + 1, count)
    start = min(max(index - reach, 0), count - width)
    return range(start, start + width)


@lru_cache(maxsize=32)
def neighbour_tiles(counts: Tuple[int, int, int], reach: int, frame_reach: int, radial: bool) -> Tuple[Tuple[int, ...], ...]:
    """Per query tile (frame-tile-major order), the key tiles it attends to exactly (tile indices, ascending)."""
    tiles_f, tiles_h, tiles_w = counts
    table = []
    for a in range(tiles_f):
        for b in range(tiles_h):
            for c in range(tiles_w):
                keys = []
                for a_key in _window(a, frame_reach, tiles_f):
                    spatial = max(0, reach - abs(a_key - a)) if radial else reach
                    keys.extend((a_key * tiles_h + b_key) * tiles_w + c_key
                                for b_key in _window(b, spatial, tiles_h) for c_key in _window(c, spatial, tiles_w))
                table.append(tuple(sorted(keys)))
    return tuple(table)


def to_tiles(t: torch.Tensor, layout: TokenLayout, grid: TileGrid) -> torch.Tensor:
    """Grid tokens (B, H, F*h*w, D) -> (B, tiles, tile tokens, H, D), zero-padded to whole tiles."""
    (tf, th, tw), (nf, nh, nw) = grid.shape, grid.counts
    batch, heads, _, dim = t.shape
    cube = t.reshape(batch, heads, layout.frames, layout.height, layout.width, dim)
    padding = (0, 0, 0, nw * tw - layout.width, 0, nh * th - layout.height, 0, nf * tf - layout.frames)
    if any(padding):
        cube = F.pad(cube, padding)
    cube = cube.view(batch, heads, nf, tf, nh, th, nw, tw, dim)
    return cube.permute(0, 2, 4, 6, 3, 5, 7, 1, 8).reshape(batch, grid.tiles, grid.tile_tokens, heads, dim)


def from_tiles(tiles: torch.Tensor, layout: TokenLayout, grid: TileGrid) -> torch.Tensor:
    """(B, tiles, tile tokens, H, D) -> grid tokens (B, H, F*h*w, D), the padding dropped."""
    (tf, th, tw), (nf, nh, nw) = grid.shape, grid.counts
    batch, heads = tiles.shape[0], tiles.shape[3]
    cube = tiles.view(batch, nf, nh, nw, tf, th, tw, heads, -1).permute(0, 7, 1, 4, 2, 5, 3, 6, 8)
    cube = cube.reshape(batch, heads, nf * tf, nh * th, nw * tw, -1)[:, :, :layout.frames, :layout.height, :layout.width]
    return cube.reshape(batch, heads, layout.image_tokens, -1)


def pooled_tile_of(layout: TokenLayout, grid: TileGrid, downsample: int, device) -> torch.Tensor:
    """(pooled keys,) long: the tile each pooled key of pool_keys (per frame, downsample x downsample) lies in."""
    (tf, th, tw), (_, nh, nw) = grid.shape, grid.counts
    rows, columns = math.ceil(layout.height / downsample), math.ceil(layout.width / downsample)
    frame = torch.arange(layout.frames, device=device)[:, None, None] // tf
    row = (torch.arange(rows, device=device) * downsample // th)[None, :, None]
    column = (torch.arange(columns, device=device) * downsample // tw)[None, None, :]
    return ((frame * nh + row) * nw + column).flatten()


def _packed(t: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """Shared keys (B, H, S, D) -> (B, ceil(S / tile tokens), tile tokens, H, D), zero-padded: tiles of their own."""
    batch, heads, count, dim = t.shape
    padded = F.pad(t, (0, 0, 0, -count % tile_tokens))
    return padded.permute(0, 2, 1, 3).reshape(batch, -1, tile_tokens, heads, dim)


@dataclass
class KeyTiles:
    """Every key a query tile reads, in tiles of L tokens: the grid's tiles, one empty tile (padding shorter neighbour
    lists), then the shared keys (tokens outside the grid, then the pooled grid) packed into tiles of their own.

    keys, values: (B, T', L*H*D), (B, T', L*H*Dv); bias: (B|1, T', L) per key (-inf on padding and masked keys);
    neighbours: (T, K) the key tiles of each query tile (its ``width`` grid tiles first, then the shared ones);
    exclude: (T, shared tiles * L) the pooled keys a query tile reads exactly in its own key tiles, or None."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    neighbours: torch.Tensor
    width: int
    exclude: Optional[torch.Tensor]
    needs_mask: bool


def key_tiles(k, v, key_bias: Optional[torch.Tensor], layout: TokenLayout, grid: TileGrid, table, downsample: int
              ) -> KeyTiles:
    """The KeyTiles of k (B, H, M, D), v (B, H, M, Dv) with key_bias (B|1, M) or None."""
    batch, heads, m, dim = k.shape
    length, device = grid.tile_tokens, k.device
    grid_slice = slice(layout.before, layout.before + layout.image_tokens)
    others = torch.cat([torch.arange(layout.before, device=device), torch.arange(grid_slice.stop, m, device=device)])
    bias = torch.zeros(1, m, device=device) if key_bias is None else key_bias
    shared_k, shared_v, shared_bias, pooled_tiles = k[:, :, others], v[:, :, others], bias[:, others], None
    if downsample:
        pooled_k, pooled_v, pooled_bias = pool_keys(k, v, key_bias, layout, downsample)
        shared_k = torch.cat([shared_k, pooled_k.to(k.dtype).expand(batch, -1, -1, -1)], dim=2)
        shared_v = torch.cat([shared_v, pooled_v.to(v.dtype).expand(batch, -1, -1, -1)], dim=2)
        shared_bias = torch.cat([shared_bias.expand(pooled_bias.shape[0], -1), pooled_bias], dim=1)
        pooled_tiles = pooled_tile_of(layout, grid, downsample, device)
    shared_count = shared_k.shape[2]
    shared_tiles = -(-shared_count // length)
    keys, values = (torch.cat([to_tiles(t[:, :, grid_slice], layout, grid), t.new_zeros(batch, 1, length, heads,
                                                                                         t.shape[-1]),
                               _packed(shared, length)], dim=1).flatten(2)
                    for t, shared in ((k, shared_k), (v, shared_v)))
    inside = to_tiles(torch.ones(1, 1, layout.image_tokens, 1, device=device), layout, grid)
    grid_bias = to_tiles(bias[:, None, grid_slice, None], layout, grid).masked_fill(inside == 0, float("-inf"))
    padded_shared = F.pad(shared_bias, (0, shared_tiles * length - shared_count), value=float("-inf"))
    tile_bias = torch.cat([grid_bias[..., 0, 0].expand(padded_shared.shape[0], -1, -1),
                           torch.full((padded_shared.shape[0], 1, length), float("-inf"), device=device),
                           padded_shared.view(padded_shared.shape[0], shared_tiles, length)], dim=1)
    width = max(len(keys) for keys in table)
    null, first_shared = grid.tiles, grid.tiles + 1
    neighbours = torch.tensor([keys + (null,) * (width - len(keys)) + tuple(range(first_shared, first_shared + shared_tiles))
                               for keys in table], device=device)
    exclude = None
    if pooled_tiles is not None:  # the pooled keys of a query tile's own key tiles are there exactly: left out
        exclude = torch.zeros(grid.tiles, shared_tiles * length, dtype=torch.bool, device=device)
        exclude[:, shared_count - pooled_tiles.numel():shared_count] = (
            neighbours[:, :width, None] == pooled_tiles[None, None]).any(1)
    needs_mask = exclude is not None or key_bias is not None or bool(torch.isinf(tile_bias[:, neighbours.unique()]).any())
    return KeyTiles(keys, values, tile_bias, neighbours, width, exclude, needs_mask)


def attend_tiles(q_tiles: torch.Tensor, tiles: KeyTiles, value_dim: int, scale) -> torch.Tensor:
    """q_tiles (B, T, L, H, D) attending each to its key tiles -> (B, T, L, H, Dv): chunks of query tiles, each
    gathering its key tiles into buffers reused from chunk to chunk (fresh ones would cost a page fault per page: on
    a CPU that took as long as the gathering) and running one SDPA call."""
    batch, count_tiles, length, heads, dim = q_tiles.shape
    per_tile = tiles.neighbours.shape[1]
    key_count = per_tile * length
    out_tiles = torch.empty(batch, count_tiles, length, heads, value_dim, dtype=q_tiles.dtype, device=q_tiles.device)
    tile_bytes = batch * key_count * heads * (dim + value_dim) * torch.finfo(q_tiles.dtype).bits // 8
    per_chunk = min(count_tiles, max(1, CHUNK_BYTES // tile_bytes))
    key_buffer = tiles.keys.new_empty(batch * per_chunk * per_tile * tiles.keys.shape[2])
    value_buffer = tiles.values.new_empty(batch * per_chunk * per_tile * tiles.values.shape[2])
    for start in range(0, count_tiles, per_chunk):
        count = min(per_chunk, count_tiles - start)
        index = tiles.neighbours[start:start + count].flatten()
        keys = key_buffer[:batch * index.numel() * tiles.keys.shape[2]].view(batch, index.numel(), -1)
        values = value_buffer[:batch * index.numel() * tiles.values.shape[2]].view(batch, index.numel(), -1)
        torch.index_select(tiles.keys, 1, index, out=keys)
        torch.index_select(tiles.values, 1, index, out=values)
        mask = None
        if tiles.needs_mask:
            mask = tiles.bias[:, index].reshape(tiles.bias.shape[0], count, key_count)
            if tiles.exclude is not None:
                mask[..., tiles.width * length:].masked_fill_(tiles.exclude[start:start + count], float("-inf"))
            mask = mask.expand(batch, -1, -1).reshape(batch * count, 1, 1, key_count).to(q_tiles.dtype)
        chunk_out = _sdpa_zero_empty(q_tiles[:, start:start + count].reshape(batch * count, length, heads, dim).transpose(1, 2),
                                     keys.view(batch * count, key_count, heads, dim).transpose(1, 2),
                                     values.view(batch * count, key_count, heads, -1).transpose(1, 2), mask, scale)
        out_tiles[:, start:start + count] = chunk_out.view(batch, count, heads, length, -1).transpose(2, 3)
    return out_tiles


def tile_attention(call: AttentionCall, layout: TokenLayout, tile_frames: int, tile: int, reach: int,
                   frame_reach: int, radial: bool, downsample: int) -> torch.Tensor:
    """(B, H, N, Dv) in q's dtype; queries and keys on the same layout (self-attention)."""
    work = compute_dtype(call.q)
    q, k, v = call.q.to(work), call.k.to(work), call.v.to(work)
    batch, heads, m, _ = k.shape
    grid_slice = slice(layout.before, layout.before + layout.image_tokens)
    key_bias = key_padding_bias(call)  # (B|1, M) or None
    key_mask = None if key_bias is None else key_bias[:, None, None, :].to(work)
    grid = TileGrid.of(layout, tile_frames, tile)
    table = neighbour_tiles(grid.counts, reach, frame_reach, radial)
    if all(len(keys) == grid.tiles for keys in table):  # every tile sees every tile: exact attention
        return sdpa_dense(q, k, v, key_mask, call.scale).to(call.q.dtype)
    tiles = key_tiles(k, v, key_bias, layout, grid, table, downsample)
    out = torch.empty(batch, heads, q.shape[2], v.shape[-1], dtype=work, device=q.device)
    out[:, :, grid_slice] = from_tiles(attend_tiles(to_tiles(q[:, :, grid_slice], layout, grid), tiles, v.shape[-1],
                                                    call.scale), layout, grid)
    others = torch.cat([torch.arange(layout.before, device=q.device), torch.arange(grid_slice.stop, m, device=q.device)])
    if others.numel():  # queries outside the grid: exact over every key
        out[:, :, others] = sdpa_dense(q[:, :, others], k, v, key_mask, call.scale)
    return out.to(call.q.dtype)


def _sdpa_zero_empty(q, k, v, mask: Optional[torch.Tensor], scale) -> torch.Tensor:
    """torch SDPA on (B, H, N, D) views; rows whose every key is masked give zeros."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
        if bool(empty.any()):
            out = out.masked_fill(empty, 0.0)
    return out


class TileBackend(Backend):
    name = "tiles"
    exact = False
    description = ("approximate; tile-aligned 3-D windows (Sliding Tile / Radial Attention): each tile of "
                   "tile_frames x tile x tile tokens attends exactly to the key tiles within reach (frame_reach "
                   "along frames; radial: less far in space the further in time) plus, with downsample, the rest "
                   "pooled; text kept; needs a layout and self-attention")
    # the video preset (the node runs tiles with these): the closest to exact of the shapes measured on the video
    # proxy (docs/quality.md: Video)
    option_defaults = {"tile": 8, "tile_frames": 2, "reach": 1, "frame_reach": 1, "radial": False, "downsample": 4}
    benchmark_options = (dict(option_defaults), {**option_defaults, "radial": True},
                         {**option_defaults, "tile": 16, "tile_frames": 1, "frame_reach": 0})
    causal = False
    dense_masks = KEY_PADDING
    region_masks = grid_region_reason("pooling keys")

    def not_supported_reasons(self, call: AttentionCall) -> List[str]:
        reasons = super().not_supported_reasons(call) + layout_reasons(call) + self_attention_reasons(call)
        tile, downsample = self.option(call, "tile"), self.option(call, "downsample")
        if tile not in TILE_SIDES:
            reasons.append(f"tile={tile!r}; expected one of {TILE_SIDES}")
        if downsample not in DOWNSAMPLE_FACTORS:
            reasons.append(f"downsample={downsample!r}; expected one of {DOWNSAMPLE_FACTORS}")
        elif downsample and tile in TILE_SIDES and tile % downsample:
            reasons.append(f"downsample={downsample} does not divide tile={tile}: a pooled key would straddle tiles")
        for name in ("tile_frames", "reach", "frame_reach"):
            value, low = self.option(call, name), int(name == "tile_frames")
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                reasons.append(f"{name}={value!r}; expected an integer >= {low}")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        options = {name: self.option(call, name) for name in self.option_defaults}
        return tile_attention(call.with_kv_heads_repeated(), call.layout, **options)
