"""Exact region-masked attention in one Triton flash-attention kernel.

The kernel reads per-token labels and decides inside each (query block, key block) tile which pairs
may attend, so no N x M mask exists. Before the launch, a table lists for every query block the key
blocks that hold at least one key some query of the block may see; the kernel visits only those.
The table is built from per-block label summaries in O(N/BLOCK_N · M/BLOCK_M) time and memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..attention.backends.base import NONE, AttentionCall, Backend
from ..attention.masks import RegionMask
from . import triton_support
from .triton_support import batch_part, ceil_div, dot_precision, padded_dim, runs_interpreted

LOG2_E = 1.4426950408889634
# Labels are hashed into this many bins per block: a block pair shares a bin when it may share a label.
LABEL_BINS = 64


@dataclass(frozen=True)
class FlashLaunch:
    """Queries and keys per tile, and the GPU launch options."""

    block_n: int
    block_m: int
    num_warps: int
    num_stages: int


# (queries, keys) per tile and pipeline stages, tried in order; the first that fits the budget is used.
FLASH_TILES = ((128, 64, 3), (128, 64, 2), (64, 64, 2), (64, 32, 2), (64, 32, 1), (32, 32, 1), (16, 16, 1))
# Share of the device's shared memory the tile estimate may use: Triton adds layout conversion
# buffers (and 3xTF32 splits for fp32) on top of the q, k and v tiles.
SHARED_MEMORY_SHARE = 0.6


# Small tiles keep the numpy interpreter quick and make block skipping testable on small inputs.
INTERPRETER_LAUNCH = FlashLaunch(block_n=16, block_m=16, num_warps=1, num_stages=1)


def flash_launch(dim_pad: int, dim_v_pad: int, element_size: int, shared_memory: int) -> Optional[FlashLaunch]:
    """The largest GPU tile whose q block plus k and v blocks per pipeline stage fit the shared-memory share,
    or None when not even the smallest does (e.g. fp32 head dims above 128 on a GPU with 99 KB per program)."""
    for block_n, block_m, stages in FLASH_TILES:
        tile_bytes = (block_n * dim_pad + stages * block_m * (dim_pad + dim_v_pad)) * element_size
        if tile_bytes <= SHARED_MEMORY_SHARE * shared_memory:
            break
    else:
        return None
    return FlashLaunch(block_n=block_n, block_m=block_m, num_warps=8 if block_n * dim_pad >= 128 * 128 else 4,
                       num_stages=stages)


def tile_reason(dim: int, dim_v: int, dtype: torch.dtype, shared_memory: int) -> Optional[str]:
    """Why no tile of the kernel fits a GPU with ``shared_memory`` bytes per program for these head dims (None: one does)."""
    element_size = torch.tensor([], dtype=dtype).element_size()
    if flash_launch(padded_dim(dim), padded_dim(dim_v), element_size, shared_memory) is not None:
        return None
    return (f"head dims D={dim}, Dv={dim_v} in {str(dtype).replace('torch.', '')} need more shared memory than this "
            f"GPU's {shared_memory // 1024} KB per program")


def _block_summaries(labels: torch.Tensor, block: int):
    """Per block of ``block`` tokens of labels (L, T): which label bins it holds (L, TB, LABEL_BINS) fp32,
    the smallest and largest label other than -1 (L, TB), and whether it holds a -1 token (L, TB)."""
    count, tokens = labels.shape
    num_blocks = ceil_div(tokens, block)
    pad = num_blocks * block - tokens
    blocked = F.pad(labels, (0, pad)).view(count, num_blocks, block)
    real = (torch.arange(num_blocks * block, device=labels.device) < tokens).view(1, num_blocks, block)
    everywhere = real & (blocked == -1)
    regular = real & ~everywhere
    bins = torch.zeros(count, num_blocks, LABEL_BINS, device=labels.device)
    bins.scatter_add_(2, blocked.remainder(LABEL_BINS), regular.float())
    big = torch.iinfo(torch.int64).max
    low = torch.where(regular, blocked, big).amin(dim=2)
    high = torch.where(regular, blocked, -big).amax(dim=2)
    return bins.clamp_max_(1.0), low, high, everywhere.any(dim=2)


def visible_key_blocks(query_labels: torch.Tensor, key_labels: torch.Tensor, block_n: int,
                       block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which key blocks each query block must visit, from labels (B|1, N) and (B|1, M) int64.

    Returns key_blocks (L, NB, MB) int32, per query block the visited key block indices first in
    ascending order, and counts (L, NB) int32, how many to visit; L = max of the label batch sizes.
    A pair is visited when either block holds a -1 token, or both hold labels in a common hash bin
    (label mod LABEL_BINS) within overlapping label ranges. This never skips a needed block, and is
    exact (visits no unneeded one) when the labels differ modulo LABEL_BINS, e.g. labels 0..63.
    """
    q_bins, q_low, q_high, q_everywhere = _block_summaries(query_labels, block_n)
    k_bins, k_low, k_high, k_everywhere = _block_summaries(key_labels, block_m)
    shares_bin = torch.matmul(q_bins, k_bins.transpose(1, 2)) > 0.5
    ranges_overlap = (q_low[:, :, None] <= k_high[:, None, :]) & (k_low[:, None, :] <= q_high[:, :, None])
    visible = (shares_bin & ranges_overlap) | q_everywhere[:, :, None] | k_everywhere[:, None, :]
    key_blocks = torch.sort((~visible).to(torch.uint8), dim=2, stable=True).indices.to(torch.int32)
    counts = visible.sum(dim=2, dtype=torch.int32)
    return key_blocks.contiguous(), counts.contiguous()


def _label_strides(labels: torch.Tensor) -> Tuple[int, int]:
    """(batch, token) strides of (B|1, T) labels; batch stride 0 broadcasts one labelling."""
    return (labels.stride(0) if labels.shape[0] > 1 else 0), labels.stride(1)


def region_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region: Optional[RegionMask],
                            scale: Optional[float]) -> torch.Tensor:
    """q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv), optional RegionMask -> (B, H, N, Dv) in q's dtype.

    The result is a (B, H, N, Dv) view of a (B, N, H, Dv)-contiguous tensor; rows with no allowed key are 0.
    """
    kernel = triton_support.load_kernels("masked_triton_kernels").region_attention_kernel
    batch, heads, n, dim = q.shape
    m, dim_v = k.shape[2], v.shape[-1]
    out = torch.empty(batch, n, heads, dim_v, dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    if m == 0:
        return out.zero_()
    interpreted = runs_interpreted(kernel)
    dim_pad, dim_v_pad = padded_dim(dim), padded_dim(dim_v)
    launch = INTERPRETER_LAUNCH if interpreted else flash_launch(
        dim_pad, dim_v_pad, q.element_size(), triton_support.shared_memory_per_program(q.device))
    if launch is None:
        raise ValueError(tile_reason(dim, dim_v, q.dtype, triton_support.shared_memory_per_program(q.device)))
    scale = dim ** -0.5 if scale is None else float(scale)
    if region is None:
        query_labels = key_labels = key_blocks = counts = q  # unused: HAS_LABELS=False
        label_strides = (0, 0, 0, 0, 0, 0, 0)
    else:
        query_labels, key_labels = region.query_labels.long(), region.key_labels.long()
        key_blocks, counts = region.derived(("key_blocks", launch.block_n, launch.block_m), lambda: visible_key_blocks(
            query_labels, key_labels, launch.block_n, launch.block_m))
        table_batch = key_blocks.shape[0] > 1
        label_strides = (*_label_strides(query_labels), *_label_strides(key_labels),
                         key_blocks.stride(0) if table_batch else 0, key_blocks.stride(1),
                         counts.stride(0) if table_batch else 0)
    for part in triton_support.batch_parts(batch, heads):  # batch * heads is the grid's y axis
        kernel[(ceil_div(n, launch.block_n), (part.stop - part.start) * heads)](
            q[part], k[part], v[part], out[part], *(batch_part(t, part) for t in (query_labels, key_labels,
                                                                                   key_blocks, counts)),
            heads, n, m, dim, dim_v, scale * LOG2_E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *label_strides,
            HAS_LABELS=region is not None, UPCAST=interpreted or q.dtype == torch.float32,
            DOT_PRECISION=dot_precision(q.dtype, interpreted),
            BLOCK_N=launch.block_n, BLOCK_M=launch.block_m, BLOCK_D=dim_pad, BLOCK_DV=dim_v_pad,
            num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out


class MaskedTritonBackend(Backend):
    name = "masked_triton"
    description = ("exact; Triton flash-attention kernel for RegionMasks (labels read in the kernel, key blocks "
                   "no query of a block may see are skipped) and unmasked calls")
    causal = False
    gqa = False
    dense_masks = NONE

    def unavailable_reason(self) -> Optional[str]:
        return triton_support.triton_unavailable_reason()

    def slow_reason(self) -> Optional[str]:
        return triton_support.interpreted_reason()

    def not_supported_reasons(self, call: AttentionCall) -> List[str]:
        reasons = super().not_supported_reasons(call)
        reasons += triton_support.call_reasons(call)
        if call.device.type == "cuda" and triton_support.triton_unavailable_reason() is None:
            dims = (call.q.shape[-1], call.v.shape[-1])
            if max(dims) <= triton_support.MAX_HEAD_DIM:
                reason = tile_reason(*dims, call.dtype, triton_support.shared_memory_per_program(call.device))
                reasons += [reason] if reason else []
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        return region_attention_triton(call.q, call.k, call.v, call.mask.region, call.scale)
