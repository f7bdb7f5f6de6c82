"""Exact masked attention that never materialises a (B, H, N, M) float tensor.

Dense masks: queries are processed in chunks, each through torch SDPA with its slice of the mask, so
at most a (B|1, H|1, chunk, M) float copy of the mask exists at once (SDPA converts boolean masks to
float), never one of the whole mask; SDPA's fused kernels keep no score matrix.
Region masks: tokens are grouped by label and every group runs unmasked attention on its own keys,
so no N x M mask exists at all.
"""
from __future__ import annotations

import torch

from ..masks import RegionMask, combine_dense, restrict_mask
from .base import AttentionCall, Backend
from .sdpa import causal_mask, sdpa_dense

# Upper bound for one chunk's mask slice as a float tensor, in bytes.
CHUNK_MASK_BYTES = 64 << 20


def query_chunk_size(mask_rows_per_query: int, n: int, m: int) -> int:
    """Queries per chunk so that (mask_rows_per_query, chunk, M) fp32 fits CHUNK_MASK_BYTES."""
    return max(1, min(n, CHUNK_MASK_BYTES // (4 * max(1, mask_rows_per_query * m))))


def _label_groups(region: RegionMask, batch: int):
    """[(batch rows, [(query indices or None for all, key indices or None for all, key bias or None)])] per
    labelling.

    Query i may attend key j as RegionMask says (labels equal, or its label table); queries labelled -1 see every
    key. An empty key index tensor means the group's queries may attend nothing (they give zeros).
    """
    query_labels, key_labels = region.query_labels, region.key_labels
    if query_labels.shape[0] == 1 and key_labels.shape[0] == 1:
        rows = [(slice(None), query_labels[0], key_labels[0])]  # one labelling for the whole batch
    else:
        rows = [(slice(i, i + 1), query_labels[min(i, query_labels.shape[0] - 1)],
                 key_labels[min(i, key_labels.shape[0] - 1)]) for i in range(batch)]
    groups = []
    for row, labels_q, labels_k in rows:
        row_groups = []
        for label in torch.unique(labels_q).tolist():
            queries = (labels_q == label).nonzero().squeeze(1)
            keys, bias = None, None  # None = every key ("everywhere" queries, or every key allowed), no bias
            if label != -1:
                key_allowed, key_bias = region.key_rule(label, labels_k)
                if not bool(key_allowed.all()):
                    keys = key_allowed.nonzero().squeeze(1)
                if key_bias is not None:
                    key_bias = key_bias if keys is None else key_bias[keys]
                    bias = key_bias if bool(key_bias.any()) else None
            row_groups.append((None if queries.numel() == labels_q.numel() else queries, keys, bias))
        groups.append((row, row_groups))
    return groups


def _region_attention(q, k, v, region: RegionMask, scale, out) -> None:
    """Fill out (B, H, N, Dv) for a region mask by grouping tokens per label."""
    for rows, row_groups in region.derived(("groups", q.shape[0]), lambda: _label_groups(region, q.shape[0])):
        qb, kb, vb = q[rows], k[rows], v[rows]
        for queries, keys, bias in row_groups:
            if keys is not None and keys.numel() == 0:
                result = 0.0
            else:
                result = sdpa_dense(qb if queries is None else qb.index_select(2, queries),
                                    kb if keys is None else kb.index_select(2, keys),
                                    vb if keys is None else vb.index_select(2, keys),
                                    None if bias is None else bias[None, None, None, :], scale)
            if queries is None:
                out[rows] = result
            else:
                out[rows, :, queries] = result


def _region_chunk(region: RegionMask, start: int, stop: int) -> torch.Tensor:
    """(B|1, 1, chunk, M) slice of the region mask for queries start:stop (boolean, or additive with a bias)."""
    return region.with_query_labels(region.query_labels[:, start:stop]).to_dense()


class MaskedBackend(Backend):
    name = "masked"
    region_tables = True
    description = ("exact; every mask form incl. RegionMask, query-chunked or grouped by region, never a "
                   "(B, H, N, M) float tensor")

    def forward(self, call: AttentionCall) -> torch.Tensor:
        q, k, v = call.q, call.k, call.v
        dense, region = call.mask.dense, call.mask.region
        batch, heads, n, _ = q.shape
        m = k.shape[2]
        if region is not None and dense is None and not call.is_causal and not call.enable_gqa:
            out = q.new_empty(batch, heads, n, v.shape[-1])
            _region_attention(q, k, v, region, call.scale, out)
            return out
        rows = max(dense.shape[0] * dense.shape[1] if dense is not None else 1,
                   region.query_labels.shape[0] if region is not None else 1)
        chunk = query_chunk_size(rows, n, m)
        if region is None and (dense is None or dense.shape[2] == 1 or chunk >= n):
            # nothing grows with N: torch SDPA's fused kernels keep no score matrix
            return sdpa_dense(q, k, v, dense, call.scale, call.is_causal, call.enable_gqa)
        out = q.new_empty(batch, heads, n, v.shape[-1])
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            mask_chunk = None
            if dense is not None:
                mask_chunk = dense if dense.shape[2] == 1 else dense[:, :, start:stop]
            if region is not None:
                mask_chunk = combine_dense(mask_chunk, _region_chunk(region, start, stop))
            if call.is_causal:
                mask_chunk = restrict_mask(mask_chunk, causal_mask(n, m, q.device)[start:stop])
            out[:, :, start:stop] = sdpa_dense(q[:, :, start:stop], k, v, mask_chunk, call.scale,
                                               enable_gqa=call.enable_gqa)
        return out
