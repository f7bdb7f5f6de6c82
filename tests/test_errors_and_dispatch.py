"""Bad input gets a clear error; the dispatcher explains its choice."""
from __future__ import annotations

import pytest
import torch

from efficient_attention_pop.attention import (AUTO_PRIORITY, BACKENDS, BackendNotSupported, RegionMask, attention,
                                               availability, explain)

from helpers import comfy_inputs

HEADS_MSG = "Number of heads (n_heads) must be specified in options"


@pytest.mark.parametrize("heads", [None, 0])
def test_missing_heads(heads):
    q, k, v = comfy_inputs(1, 4, 4, 2, 4, 4)
    with pytest.raises(ValueError, match=r"^Number of heads \(n_heads\) must be specified in options$"):
        attention(q, k, v, heads)


def test_negative_heads():
    q, k, v = comfy_inputs(1, 4, 4, 2, 4, 4)
    with pytest.raises(ValueError, match=r"^Number of heads \(n_heads\) must be specified in options: got heads=-2"):
        attention(q, k, v, -2)


@pytest.mark.parametrize("make, fragment", [
    (lambda: (torch.randn(1, 4, 10), torch.randn(1, 4, 10), torch.randn(1, 4, 10), 3), "not divisible by heads=3"),
    (lambda: (torch.randn(2, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), 2), "batch sizes differ"),
    (lambda: (torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 6, 8), 2), "k and v token counts differ"),
    (lambda: (torch.randn(1, 4, 8), torch.randn(1, 5, 6), torch.randn(1, 5, 8), 2), "not a multiple of dim_head=4"),
    (lambda: (torch.randn(1, 4, 8), torch.randn(1, 5, 4), torch.randn(1, 5, 4), 2), "k/v carry 1 heads but q carries 2"),
    (lambda: (torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8, 1), 2), "must all be 3-D"),
])
def test_shape_mismatches_name_shapes(make, fragment):
    q, k, v, heads = make()
    with pytest.raises(ValueError, match=r"^Mismatch in tensor dimensions") as info:
        attention(q, k, v, heads)
    message = str(info.value)
    assert fragment in message
    assert str(tuple(q.shape)) in message and str(tuple(k.shape)) in message and "expected" in message


def test_skip_reshape_head_mismatch():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match=r"^Mismatch in tensor dimensions: q's head axis differs from heads"):
        attention(q, q, q, 2, skip_reshape=True)


def test_gqa_heads_not_multiple():
    q, k, v = torch.randn(1, 4, 5 * 4), torch.randn(1, 4, 2 * 4), torch.randn(1, 4, 2 * 4)
    with pytest.raises(ValueError, match="not a multiple of k/v's 2 heads"):
        attention(q, k, v, 5, enable_gqa=True)


@pytest.mark.parametrize("mask, fragment", [
    (torch.ones(4, 6, dtype=torch.bool), "does not fit B=2, H=2, N=4, M=5"),
    (torch.ones(3, 4, 5, dtype=torch.bool), "does not fit"),
    (torch.ones(2, 3, 4, 5, dtype=torch.bool), "does not fit"),
    (torch.ones(5, dtype=torch.bool), "has 1 dims"),
    (torch.ones(1, 2, 2, 4, 5, dtype=torch.bool), "has 5 dims"),
])
def test_bad_mask_shapes(mask, fragment):
    q, k, v = comfy_inputs(2, 4, 5, 2, 4, 4)
    with pytest.raises(ValueError, match="Attention mask of shape") as info:
        attention(q, k, v, 2, mask)
    assert fragment in str(info.value) and str(tuple(mask.shape)) in str(info.value)
    assert "3-D (B or 1, N or 1, M)" in str(info.value)


def test_bad_mask_type_and_region_labels():
    q, k, v = comfy_inputs(2, 4, 5, 2, 4, 4)
    with pytest.raises(TypeError, match="Attention mask must be a tensor or RegionMask, got list"):
        attention(q, k, v, 2, [[1, 2]])
    with pytest.raises(ValueError, match=r"RegionMask labels do not fit.*\(2 or 1, 4\) and \(2 or 1, 5\)"):
        attention(q, k, v, 2, RegionMask(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)))
    with pytest.raises(ValueError, match="must hold integer labels"):
        RegionMask(torch.zeros(1, 4), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="must be a 2-D"):
        RegionMask(torch.zeros(4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_unknown_backend():
    q, k, v = comfy_inputs(1, 4, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="Unknown attention backend 'fastest'; expected 'auto' or one of"):
        attention(q, k, v, 2, backend="fastest")


def test_explicit_backend_that_cannot_serve_lists_reasons():
    q, k, v = comfy_inputs(2, 4, 5, 2, 4, 4)
    region = RegionMask(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(BackendNotSupported, match="'sdpa' cannot serve these inputs: region masks"):
        attention(q, k, v, 2, region, backend="sdpa")
    dense = torch.ones(2, 4, 5, dtype=torch.bool)
    with pytest.raises(BackendNotSupported, match=r"'linear' cannot serve.*not a key-padding mask"):
        attention(q, k, v, 2, dense, backend="linear")
    with pytest.raises(BackendNotSupported) as info:
        attention(q, k, v, 2, dense, backend="linear", is_causal=True)
    assert "is_causal is not supported" in str(info.value) and "not a key-padding mask" in str(info.value)
    kv = torch.randn(2, 5, 4)
    with pytest.raises(BackendNotSupported, match="grouped-query attention"):
        attention(q, kv, kv, 2, backend="linear_triton", enable_gqa=True)


def test_explain_names_choice_and_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else masked_triton may serve CPU region masks
    q, k, v = comfy_inputs(2, 4, 5, 2, 4, 4)
    plain = explain(q, k, v, 2)
    assert plain.chosen == "sdpa"
    assert plain.passed_over["masked"] == ["lower priority than sdpa"]
    assert "approximate" in plain.passed_over["linear"][0]
    region = RegionMask(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    regional = explain(q, k, v, 2, region)
    assert regional.chosen == "masked"
    assert "region masks" in regional.passed_over["sdpa"][0]
    assert str(regional).startswith("auto picks: masked")


def test_auto_never_picks_an_approximation():
    assert all(BACKENDS[name].exact for name in AUTO_PRIORITY)
    assert "linear" not in AUTO_PRIORITY


def test_availability_reports_every_backend():
    status = availability()
    assert {"sdpa", "masked", "linear"} <= set(status)
    assert status["sdpa"] is None and status["masked"] is None and status["linear"] is None


def test_comfy_keywords_are_accepted():
    q, k, v = comfy_inputs(1, 4, 4, 2, 4, 4)
    out = attention(q, k, v, 2, None, torch.float32, transformer_options={}, low_precision_attention=False)
    torch.testing.assert_close(out, attention(q, k, v, 2))
