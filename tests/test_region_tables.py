"""Region masks with a label table: ``allowed[query label, key label]`` and an optional additive ``bias`` (what a
prompt per image region needs: each prompt's text attends only its own text and its region's image, a base prompt
weakened inside the regions). The masked backend serves them by label groups, never through an N x M mask; checked
against naive.py and torch SDPA given the same mask as a dense matrix, over labels with -1 ("everywhere") tokens,
batches of labellings, dense masks beside them, and fully masked rows (zeros, never NaN)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from efficient_attention_pop.attention import BackendNotSupported, RegionMask, attention, why_not
from efficient_attention_pop.attention.naive import naive_attention

from helpers import assert_close, on_device

attention = on_device(attention)


def tabled_mask(gen, batch_labels, n, m, labels, with_bias, empty_row=True):
    query = torch.randint(-1, labels, (batch_labels, n), generator=gen)
    key = torch.randint(-1, labels, (batch_labels, m), generator=gen)
    key[key == -1] = 0 if empty_row else -1  # no "everywhere" key, so a query label may see nothing at all
    allowed = torch.rand(labels, labels, generator=gen) < 0.5
    if empty_row:
        allowed[labels - 1] = False  # queries of the last label attend nothing: zeros
        query[:, 0] = labels - 1
    bias = None
    if with_bias:
        bias = torch.where(torch.rand(labels, labels, generator=gen) < 0.5, torch.zeros(labels, labels),
                           torch.log(torch.rand(labels, labels, generator=gen) * 0.9 + 0.05))
    return RegionMask(query, key, allowed, bias)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_labels", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_masked_serves_a_label_table_as_naive_and_sdpa_do_its_dense_matrix(seed, batch_labels, with_bias):
    gen = torch.Generator().manual_seed(seed)
    n, m, heads, dim = 23, 19, 2, 8
    q, k, v = (torch.randn(2, heads, t, dim, generator=gen) for t in (n, m, m))
    region = tabled_mask(gen, batch_labels, n, m, 4, with_bias)
    out = attention(q, k, v, heads, region, backend="masked", skip_reshape=True, skip_output_reshape=True)
    dense = region.to_dense()
    assert_close(out, naive_attention(q, k, v, dense), torch.float32, "masked vs naive")
    empty = region.to_dense()
    empty = ~empty.any(-1) if empty.dtype == torch.bool else torch.isneginf(empty).all(-1)  # (B|1, 1, N)
    assert bool(empty.any()), "no fully masked row: the zeros were not tested"
    assert torch.equal(out.masked_select(empty[..., None].expand_as(out)), torch.zeros(int(empty.expand(
        2, heads, n).sum()) * dim))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense).masked_fill(empty[..., None], 0.0)
    assert_close(out, expected, torch.float32, "masked vs torch SDPA with the dense matrix")


def test_a_table_with_a_dense_mask_beside_it_runs_in_query_chunks(monkeypatch):
    from efficient_attention_pop.attention.backends import masked

    monkeypatch.setattr(masked, "CHUNK_MASK_BYTES", 64)  # a few queries per chunk
    gen = torch.Generator().manual_seed(3)
    n, m = 17, 13
    q, k, v = (torch.randn(2, 2, t, 8, generator=gen) for t in (n, m, m))
    region = tabled_mask(gen, 2, n, m, 3, with_bias=True)
    padding = torch.rand(2, 1, 1, m, generator=gen) < 0.8
    out = attention(q, k, v, 2, [region, padding], backend="masked", skip_reshape=True, skip_output_reshape=True)
    combined = region.to_dense().masked_fill(~padding, float("-inf"))
    assert_close(out, naive_attention(q, k, v, combined), torch.float32, "chunked table + padding")


def test_the_identity_table_is_the_plain_region_mask():
    gen = torch.Generator().manual_seed(4)
    query, key = torch.randint(-1, 3, (1, 11), generator=gen), torch.randint(-1, 3, (1, 9), generator=gen)
    q, k, v = (torch.randn(1, 2, t, 4, generator=gen) for t in (11, 9, 9))
    plain = attention(q, k, v, 2, RegionMask(query, key), backend="masked", skip_reshape=True)
    tabled = attention(q, k, v, 2, RegionMask(query, key, torch.eye(3, dtype=torch.bool)), backend="masked",
                       skip_reshape=True)
    torch.testing.assert_close(tabled, plain)


def test_a_bias_weakens_exactly_the_keys_it_names():
    """Two keys of equal score, one of them in a group weighted 1/3: it gets 1/4 of the attention."""
    q = torch.zeros(1, 1, 1, 4)
    k = torch.zeros(1, 1, 2, 4)
    v = torch.tensor([[[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]])
    allowed = torch.ones(1, 2, dtype=torch.bool)
    bias = torch.tensor([[0.0, math.log(1 / 3)]])
    region = RegionMask(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[0, 1]]), allowed, bias)
    out = attention(q, k, v, 1, region, backend="masked", skip_reshape=True, skip_output_reshape=True)
    torch.testing.assert_close(out[0, 0, 0, :2], torch.tensor([0.75, 0.25]))


def test_backends_that_cannot_serve_a_table_say_so_and_tables_are_checked():
    gen = torch.Generator().manual_seed(5)
    q = k = v = torch.randn(1, 2, 6, 4, generator=gen)
    region = RegionMask(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long),
                        torch.ones(1, 1, dtype=torch.bool))
    for backend in ("linear", "masked_triton"):
        assert any("label table" in reason for reason in why_not(backend, q, k, v, 2, region, skip_reshape=True))
    with pytest.raises(BackendNotSupported, match="region masks"):
        attention(q, k, v, 2, region, backend="sdpa", skip_reshape=True)
    labels = torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match="does not cover labels up to 2"):
        RegionMask(labels, labels, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs the allowed table"):
        RegionMask(labels, labels, bias=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="float table"):
        RegionMask(labels, labels, torch.ones(3, 3, dtype=torch.bool), torch.zeros(2, 3))
