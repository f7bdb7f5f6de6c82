"""Triton kernels of fused Efficient Attention (imported on first use; see triton_support.py).

Phase 1 (``linear_context_kernel``): per (batch, head, block of key features) stream the key tokens
and keep, per key feature, an online softmax over the tokens (running max and sum, rescaled when the
max grows) together with the fp32 (D, Dv) accumulator of softmax(k)ᵀ v; write the normalised context.
Phase 2 (``linear_output_kernel``): per (batch, head, block of queries) softmax q over its features
and multiply by the context, walking the features in chunks.
"""
import triton
import triton.language as tl


@triton.jit
def linear_context_kernel(
    k_ptr, v_ptr, key_bias_ptr, context_ptr,
    heads, tokens, dim, dim_v,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_bias_b, stride_bias_m,
    stride_cb, stride_ch, stride_cd, stride_ce,
    HAS_KEY_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """k (B, H, M, D), v (B, H, M, Dv), key_bias (B|1, M) fp32 additive -> context (B, H, D, Dv) fp32.

    context[d] = Σ_m softmax_m(k[:, d] + key_bias)[m] · v[m]; a feature whose keys are all masked gets 0.
    Grid: (B * H, cdiv(D, BLOCK_D)).
    """
    batch_head = tl.program_id(0)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_TOKENS)
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    bias_base = key_bias_ptr + batch * stride_bias_b

    running_max = tl.full([BLOCK_D], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_D], tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    for start in range(0, tokens, BLOCK_TOKENS):
        tok = start + offs_t
        in_range = tok < tokens
        k = tl.load(k_base + tok[:, None] * stride_km + offs_d[None, :] * stride_kd,
                    mask=in_range[:, None] & (offs_d[None, :] < dim), other=0.0)
        v = tl.load(v_base + tok[:, None] * stride_vm + offs_e[None, :] * stride_vd,
                    mask=in_range[:, None] & (offs_e[None, :] < dim_v), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        logits = k.to(tl.float32)
        if HAS_KEY_BIAS:
            bias = tl.load(bias_base + tok * stride_bias_m, mask=in_range, other=0.0)
            logits = logits + bias[:, None]
        logits = tl.where(in_range[:, None], logits, float("-inf"))  # (BLOCK_TOKENS, BLOCK_D)
        new_max = tl.maximum(running_max, tl.max(logits, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all masked so far: keep exp() at 0, not NaN
        rescale = tl.exp(running_max - shift)
        weights = tl.exp(logits - shift[None, :])
        running_sum = running_sum * rescale + tl.sum(weights, 0)
        acc = acc * rescale[:, None] + tl.dot(tl.trans(weights.to(v.dtype)), v, input_precision=DOT_PRECISION)
        running_max = new_max
    context = acc / tl.where(running_sum > 0.0, running_sum, 1.0)[:, None]
    context_base = context_ptr + batch * stride_cb + head * stride_ch
    tl.store(context_base + offs_d[:, None] * stride_cd + offs_e[None, :] * stride_ce, context,
             mask=(offs_d[:, None] < dim) & (offs_e[None, :] < dim_v))


@triton.jit
def linear_output_kernel(
    q_ptr, context_ptr, out_ptr,
    heads, n, dim, dim_v, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_cb, stride_ch, stride_cd, stride_ce,
    stride_ob, stride_oh, stride_on, stride_oe,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """q (B, H, N, D), context (B, H, D, Dv) fp32 -> out (B, H, N, Dv) = softmax_D(q * scale) @ context.

    D is walked in chunks of BLOCK_D twice: first for the softmax max and sum (online, as in phase 1),
    then for the product, so registers and shared memory stay bounded for any head dim.
    Grid: (cdiv(N, BLOCK_N), B * H).
    """
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_chunk = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    rows = offs_n < n
    q_rows = q_ptr + batch * stride_qb + head * stride_qh + offs_n[:, None] * stride_qn
    context_base = context_ptr + batch * stride_cb + head * stride_ch

    row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, dim, BLOCK_D):
        offs_d = start + offs_chunk
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=rows[:, None] & (offs_d[None, :] < dim), other=0.0)
        logits = tl.where(offs_d[None, :] < dim, q.to(tl.float32) * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        row_max = new_max

    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, dim, BLOCK_D):
        offs_d = start + offs_chunk
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=rows[:, None] & (offs_d[None, :] < dim), other=0.0)
        logits = tl.where(offs_d[None, :] < dim, q.to(tl.float32) * scale, float("-inf"))
        weights = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
        context = tl.load(context_base + offs_d[:, None] * stride_cd + offs_e[None, :] * stride_ce,
                          mask=(offs_d[:, None] < dim) & (offs_e[None, :] < dim_v), other=0.0)
        acc += tl.dot(weights, context, input_precision=DOT_PRECISION)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_n[:, None] * stride_on + offs_e[None, :] * stride_oe,
             acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] & (offs_e[None, :] < dim_v))
