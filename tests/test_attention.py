"""The attention library against its naive references and torch SDPA, over shapes, dtypes and masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from efficient_attention_pop.attention import BackendNotSupported, RegionMask, attention, explain
from efficient_attention_pop.attention.backends import masked as masked_module
from efficient_attention_pop.attention.naive import naive_attention, naive_linear_attention

from helpers import assert_close, comfy_inputs, from_heads, on_device, random_mask, to_heads

attention = on_device(attention)  # EFFICIENT_ATTENTION_POP_DEVICE=cuda: the calls under test run on CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXACT = ["auto", "sdpa", "masked"]
DENSE_FORMS = [f"{kind}:{shape}" for kind in ("bool", "additive", "bias", "int")
               for shape in ("2d", "3d", "3d_b1", "key_padding", "4d", "4d_h1", "4d_b1h1", "4d_key_padding")]
HYPO = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(1, 37),  # n
    st.integers(1, 41),  # m
    st.integers(1, 24),  # heads
    st.sampled_from([1, 3, 8, 16]),  # dim
    st.sampled_from([2, 5, 8, 16]),  # dim_v
)


def sdpa_reference(q, k, v, mask4d=None, is_causal=False):
    """torch SDPA in float64 on (B, H, N, D), with rows that may attend nothing set to zero."""
    q, k, v = q.double(), k.double(), v.double()
    if mask4d is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    additive = mask4d.double() if mask4d.dtype != torch.bool else torch.zeros(mask4d.shape, dtype=torch.float64) \
        .masked_fill(~mask4d, float("-inf"))
    empty_rows = torch.isneginf(additive).all(-1, keepdim=True)
    safe = additive.masked_fill(empty_rows, 0.0)  # keep SDPA away from all -inf rows, then zero them
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)
    return out.masked_fill(empty_rows, 0.0)


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes, seed=st.integers(0, 2**16))
@HYPO
def test_exact_backends_match_references_unmasked(backend, dtype, shape, seed):
    batch, n, m, heads, dim, dim_v = shape
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, dtype, seed)
    out = attention(q, k, v, heads, backend=backend)
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    assert out.dtype == dtype and out.shape == (batch, n, heads * dim_v)
    assert_close(out, from_heads(naive_attention(qh, kh, vh)), dtype, "vs naive")
    assert_close(out, from_heads(sdpa_reference(qh, kh, vh)).to(dtype), dtype, "vs torch SDPA")


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("form", DENSE_FORMS)
@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
@settings(max_examples=8, deadline=None)
def test_exact_backends_every_dense_mask_form(backend, form, shape, seed, dtype):
    batch, n, m, heads, dim, dim_v = shape
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    mask, mask4d = random_mask(form, batch, heads, n, m, gen, dtype=torch.float32)  # fp32 mask, any q dtype
    out = attention(q, k, v, heads, mask, backend=backend)
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    reference = from_heads(naive_attention(qh, kh, vh, mask4d.to(torch.float64) if mask4d.dtype != torch.bool
                                           else mask4d))
    assert_close(out, reference, dtype, f"{form} vs naive")
    assert_close(out, from_heads(sdpa_reference(qh, kh, vh, mask4d)).to(dtype), dtype, f"{form} vs SDPA")


@pytest.mark.parametrize("backend", EXACT + ["linear"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_are_zero_not_nan(backend, dtype):
    q, k, v = comfy_inputs(2, 6, 5, 2, 4, 4, dtype)
    if backend == "linear":
        mask = torch.ones(2, 1, 5, dtype=torch.bool)
        mask[1] = False  # batch 1 may attend no key at all
        out = attention(q, k, v, 2, mask, backend=backend)
        assert torch.isfinite(out).all() and (out[1] == 0).all()
        return
    for mask in (torch.zeros(6, 5, dtype=torch.bool), torch.full((2, 6, 5), float("-inf"), dtype=dtype)):
        mask = mask.clone()
        out = attention(q, k, v, 2, mask, backend=backend)
        assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("m, dim_v", [(5, 4), (50, 2)])  # mask smaller, and larger, than the output
def test_fully_masked_rows_are_zero_where_torch_sdpa_gives_nan(backend, m, dim_v, monkeypatch):
    """Older torch versions and some kernels return NaN for rows with no allowed key: still zeros here."""
    real = F.scaled_dot_product_attention

    def nan_for_empty_rows(q, k, v, attn_mask=None, **kwargs):
        out = real(q, k, v, attn_mask=attn_mask, **kwargs)
        if attn_mask is None:
            return out
        allowed = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)
        return out.masked_fill(~allowed.any(-1, keepdim=True), float("nan"))

    monkeypatch.setattr(F, "scaled_dot_product_attention", nan_for_empty_rows)
    q, k, v = comfy_inputs(2, 6, m, 2, 4, dim_v)
    mask = torch.rand(2, 6, m, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[:, 2] = False
    out = attention(q, k, v, 2, mask, backend=backend)
    qh, kh, vh = (to_heads(t, 2) for t in (q, k, v))
    assert_close(out, from_heads(naive_attention(qh, kh, vh, mask[:, None])), torch.float32, "NaN rows")
    assert (out[:, 2] == 0).all()
    nan_input = q.clone()
    nan_input[0, 0, 0] = float("nan")  # NaN from the inputs is not hidden
    assert torch.isnan(attention(nan_input, k, v, 2, mask, backend=backend)[0, 0]).any()


@pytest.mark.parametrize("backend", ["auto", "masked"])
@given(shape=shapes, seed=st.integers(0, 2**16), shared=st.booleans(), n_labels=st.integers(1, 4))
@HYPO
def test_region_mask_exact(backend, shape, seed, shared, n_labels):
    batch, n, m, heads, dim, dim_v = shape
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, torch.float32, seed)
    gen = torch.Generator().manual_seed(seed)
    label_batch = 1 if shared else batch
    region = RegionMask(torch.randint(-1, n_labels, (label_batch, n), generator=gen),
                        torch.randint(-1, n_labels, (label_batch, m), generator=gen))
    out = attention(q, k, v, heads, region, backend=backend)
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    dense = region.to_dense()
    assert_close(out, from_heads(naive_attention(qh, kh, vh, dense)), torch.float32, "region vs naive")
    assert_close(out, from_heads(sdpa_reference(qh, kh, vh, dense)).float(), torch.float32, "region vs SDPA")
    # the dense mask through sdpa gives the same answer
    assert_close(out, attention(q, k, v, heads, dense, backend="sdpa"), torch.float32, "region vs dense sdpa")


def test_region_mask_to_dense_reads_labels_as_documented():
    region = RegionMask(torch.tensor([[0, 1, -1]]), torch.tensor([[0, 1, 1, -1]]))
    expected = torch.tensor([[True, False, False, True],
                             [False, True, True, True],
                             [True, True, True, True]])
    assert torch.equal(region.to_dense()[0, 0], expected)


@pytest.mark.parametrize("form", ["bool:3d", "additive:4d", "bias:2d", "bool:key_padding"])
def test_masked_chunked_path_with_region_and_dense_combined(monkeypatch, form):
    monkeypatch.setattr(masked_module, "CHUNK_MASK_BYTES", 256)  # forces many query chunks
    batch, n, m, heads = 2, 23, 17, 3
    q, k, v = comfy_inputs(batch, n, m, heads, 8, 6)
    gen = torch.Generator().manual_seed(3)
    mask, mask4d = random_mask(form, batch, heads, n, m, gen)
    region = RegionMask(torch.randint(-1, 2, (batch, n), generator=gen), torch.randint(-1, 2, (batch, m), generator=gen))
    out = attention(q, k, v, heads, [mask, region], backend="masked")
    if mask4d.dtype == torch.bool:
        combined = mask4d & region.to_dense()
    else:
        combined = mask4d.masked_fill(~region.to_dense(), float("-inf"))
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    assert_close(out, from_heads(naive_attention(qh, kh, vh, combined)), torch.float32, form)


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("with_mask", [False, True])
def test_is_causal(backend, with_mask, monkeypatch):
    monkeypatch.setattr(masked_module, "CHUNK_MASK_BYTES", 400)
    q, k, v = comfy_inputs(2, 9, 12, 2, 8, 8, seed=5)
    mask = (torch.rand(2, 9, 12, generator=torch.Generator().manual_seed(1)) > 0.3) if with_mask else None
    out = attention(q, k, v, 2, mask, backend=backend, is_causal=True)
    qh, kh, vh = (to_heads(t, 2) for t in (q, k, v))
    reference = naive_attention(qh, kh, vh, None if mask is None else mask[:, None], is_causal=True)
    assert_close(out, from_heads(reference), torch.float32, "causal")


@pytest.mark.parametrize("backend", EXACT)
def test_grouped_query_attention(backend):
    q, k, v = comfy_inputs(2, 10, 7, 6, 8, 4, kv_heads=2)
    out = attention(q, k, v, 6, backend=backend, enable_gqa=True)
    qh = to_heads(q, 6)
    kh, vh = to_heads(k, 2), to_heads(v, 2)
    assert_close(out, from_heads(naive_attention(qh, kh, vh)), torch.float32, "gqa")
    expected = F.scaled_dot_product_attention(qh, kh.repeat_interleave(3, 1), vh.repeat_interleave(3, 1))
    assert_close(out, from_heads(expected), torch.float32, "gqa vs sdpa")


@pytest.mark.parametrize("backend", EXACT + ["linear"])
@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_layouts(backend, skip_reshape, skip_output_reshape):
    q, k, v = comfy_inputs(2, 11, 13, 3, 8, 5)
    expected = attention(q, k, v, 3, backend=backend)
    args = [to_heads(t, 3) for t in (q, k, v)] if skip_reshape else [q, k, v]
    out = attention(*args, 3, backend=backend, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    if skip_output_reshape:
        assert out.shape == (2, 3, 11, 5)
        out = from_heads(out)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", EXACT + ["linear"])
def test_layernorm_normalizes_q_and_k_per_head(backend):
    q, k, v = comfy_inputs(2, 9, 7, 3, 16, 8)
    q, k = q * 5 + 2, k * 3 - 1
    out = attention(q, k, v, 3, backend=backend, layernorm=True)

    def plain_layernorm(t):  # (B, H, N, D), written out: (x - mean) / sqrt(var + eps)
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6)

    qh, kh, vh = (to_heads(t, 3) for t in (q, k, v))
    qn, kn = plain_layernorm(qh.double()).float(), plain_layernorm(kh.double()).float()
    reference = naive_linear_attention(qn, kn, vh) if backend == "linear" else naive_attention(qn, kn, vh)
    assert_close(out, from_heads(reference), torch.float32, "layernorm")
    assert not torch.allclose(out, attention(q, k, v, 3, backend=backend), atol=1e-3), "layernorm changed nothing"


# ---- linear ("efficient") attention ----

def paper_efficient_attention(q, k, v):
    """Shen et al., WACV 2021, Eq. 2, transcribed per head on 2-D matrices: E = ρq(Q) (ρk(K)ᵀ V),
    ρq = softmax along each row (features), ρk = softmax along each column (positions)."""
    batch, heads = q.shape[:2]
    out = torch.empty(batch, heads, q.shape[2], v.shape[3], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            Q, K, V = q[b, h].double(), k[b, h].double(), v[b, h].double()
            rho_q = torch.exp(Q) / torch.exp(Q).sum(dim=1, keepdim=True)
            rho_k = torch.exp(K) / torch.exp(K).sum(dim=0, keepdim=True)
            out[b, h] = rho_q @ (rho_k.T @ V)
    return out


@given(shape=shapes, seed=st.integers(0, 2**16))
@HYPO
def test_linear_reference_is_the_papers_formula(shape, seed):
    batch, n, m, heads, dim, dim_v = shape
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, torch.float64, seed)
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    torch.testing.assert_close(naive_linear_attention(qh, kh, vh), paper_efficient_attention(qh, kh, vh))


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes, seed=st.integers(0, 2**16), scale=st.sampled_from([None, 0.5]))
@HYPO
def test_linear_matches_reference_and_paper(dtype, shape, seed, scale):
    batch, n, m, heads, dim, dim_v = shape
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, dtype, seed)
    out = attention(q, k, v, heads, backend="linear", scale=scale)
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    assert out.dtype == dtype
    assert_close(out, from_heads(naive_linear_attention(qh, kh, vh, scale=scale)), dtype, "vs naive")
    if scale is None:
        assert_close(out, from_heads(paper_efficient_attention(qh, kh, vh)).to(dtype), dtype, "vs paper")


@pytest.mark.parametrize("form", ["bool:key_padding", "bool:4d_key_padding", "additive:key_padding", "int:key_padding"])
@given(shape=shapes, seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_linear_key_padding_masks_exactly(form, shape, seed):
    batch, n, m, heads, dim, dim_v = shape
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, torch.float32, seed)
    mask, mask4d = random_mask(form, batch, heads, n, m, torch.Generator().manual_seed(seed))
    allowed = mask4d if mask4d.dtype == torch.bool else ~torch.isneginf(mask4d)
    out = attention(q, k, v, heads, mask, backend="linear")
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    assert_close(out, from_heads(naive_linear_attention(qh, kh, vh, allowed)), torch.float32, form)
    # masking is not zeroing: a masked key with a zero logit would still get weight
    if (~allowed).any():
        zeroed = k.clone().view(batch, m, heads, dim).masked_fill(~allowed[:, 0, 0, :, None, None], 0.0)
        leaky = attention(q, zeroed.view(batch, m, heads * dim), v, heads, backend="linear")
        assert not torch.allclose(out, leaky, atol=1e-4)


@given(shape=shapes, seed=st.integers(0, 2**16), shared=st.booleans(), with_padding=st.booleans())
@HYPO
def test_linear_region_masks(shape, seed, shared, with_padding):
    batch, n, m, heads, dim, dim_v = shape
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, torch.float32, seed)
    gen = torch.Generator().manual_seed(seed)
    label_batch = 1 if shared else batch
    region = RegionMask(torch.randint(-1, 3, (label_batch, n), generator=gen),
                        torch.randint(-1, 3, (label_batch, m), generator=gen))
    padding = torch.rand(batch, 1, m, generator=gen) < 0.7
    allowed = region.to_dense() & (padding[:, None] if with_padding else True)
    out = attention(q, k, v, heads, [region, padding] if with_padding else region, backend="linear")
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    assert_close(out, from_heads(naive_linear_attention(qh, kh, vh, allowed)), torch.float32, "region linear")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_half_precision_never_overflows(dtype):
    q, k, v = comfy_inputs(1, 300, 300, 2, 16, 16, torch.float32)
    q, k, v = (q * 2000).to(dtype), (k * 2000).to(dtype), (v * 100).to(dtype)  # exp(2000) overflows fp16/bf16/fp32
    out = attention(q, k, v, 2, backend="linear")
    assert torch.isfinite(out).all()
    qh, kh, vh = (to_heads(t, 2) for t in (q, k, v))
    reference = from_heads(naive_linear_attention(qh, kh, vh)).double()
    assert (out.double() - reference).abs().max() <= 0.02 * reference.abs().max()


@pytest.mark.parametrize("magnitude", [1.0, 59.0, 61.0, 500.0])
def test_linear_large_logits_fp32(magnitude):
    """Large k takes the max-shifted path, small k the direct exp: both equal the reference."""
    q, k, v = comfy_inputs(3, 40, 50, 9, 8, 6, torch.float32, seed=11)
    k = k / k.abs().max() * magnitude
    out = attention(q, k, v, 9, backend="linear")
    qh, kh, vh = (to_heads(t, 9) for t in (q, k, v))
    assert_close(out, from_heads(naive_linear_attention(qh, kh, vh)), torch.float32, f"|k| <= {magnitude}")


def test_linear_differs_from_exact_attention():
    q, k, v = comfy_inputs(1, 64, 64, 2, 16, 16)
    assert not torch.allclose(attention(q, k, v, 2, backend="linear"), attention(q, k, v, 2), atol=1e-2)
