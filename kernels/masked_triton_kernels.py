"""Triton kernel of exact region-masked attention (imported on first use; see triton_support.py).

Flash-attention forward: per (batch, head, block of queries) an online softmax over key blocks with
fp32 accumulation. Which keys a query may see comes from per-token labels only (equal labels, or
either label -1), and only the key blocks listed for the query block in a host-built table are visited.
"""
import triton
import triton.language as tl


@triton.jit
def region_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    query_labels_ptr, key_labels_ptr, key_blocks_ptr, key_block_counts_ptr,
    heads, n, m, dim, dim_v, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_on, stride_oe,
    stride_qlabel_b, stride_qlabel_n, stride_klabel_b, stride_klabel_m,
    stride_blocks_b, stride_blocks_q, stride_counts_b,
    HAS_LABELS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> out (B, H, N, Dv) = softmax(q kᵀ · scale) v.

    qk_scale = scale · log2(e). With HAS_LABELS: query_labels (B|1, N) and key_labels (B|1, M) int64;
    key_blocks (B|1, cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)) int32 lists, per query block, the key blocks
    to visit (the first key_block_counts (B|1, cdiv(N, BLOCK_N)) entries). Rows that may see no key get 0.
    Grid: (cdiv(N, BLOCK_N), B * H).
    """
    query_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    offs_n = query_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    offs_block = tl.arange(0, BLOCK_M)
    rows = offs_n < n
    q_rows = q_ptr + batch * stride_qb + head * stride_qh + offs_n[:, None] * stride_qn
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=rows[:, None] & (offs_d[None, :] < dim), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    if HAS_LABELS:
        query_labels = tl.load(query_labels_ptr + batch * stride_qlabel_b + offs_n * stride_qlabel_n, mask=rows,
                               other=0)
        key_labels_base = key_labels_ptr + batch * stride_klabel_b
        key_blocks_row = key_blocks_ptr + batch * stride_blocks_b + query_block * stride_blocks_q
        key_block_count = tl.load(key_block_counts_ptr + batch * stride_counts_b + query_block)
    else:
        key_block_count = tl.cdiv(m, BLOCK_M)

    row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for visit in range(0, key_block_count):
        if HAS_LABELS:
            key_block = tl.load(key_blocks_row + visit)
        else:
            key_block = visit
        offs_m = key_block * BLOCK_M + offs_block
        keys = offs_m < m
        k = tl.load(k_base + offs_m[:, None] * stride_km + offs_d[None, :] * stride_kd,
                    mask=keys[:, None] & (offs_d[None, :] < dim), other=0.0)
        v = tl.load(v_base + offs_m[:, None] * stride_vm + offs_e[None, :] * stride_vd,
                    mask=keys[:, None] & (offs_e[None, :] < dim_v), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        allowed = keys[None, :]
        if HAS_LABELS:
            key_labels = tl.load(key_labels_base + offs_m * stride_klabel_m, mask=keys, other=0)
            allowed = allowed & ((query_labels[:, None] == key_labels[None, :]) | (query_labels[:, None] == -1)
                                 | (key_labels[None, :] == -1))
        scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing allowed so far: exp2() gives 0, not NaN
        rescale = tl.exp2(row_max - shift)
        weights = tl.exp2(scores - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(weights, 1)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_n[:, None] * stride_on + offs_e[None, :] * stride_oe,
             out.to(out_ptr.dtype.element_ty), mask=rows[:, None] & (offs_e[None, :] < dim_v))
