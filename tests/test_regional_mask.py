"""Regional prompts as one label mask (attention/regional.py), against the token-by-token reference
(naive.naive_regional_mask) and through attention against torch SDPA given the same dense mask: joint layouts with
the text first or last, cross-attention, overlapping and uncovered regions, tiled text, video masks per frame, both
poolings, base_weight 0, between and 1, and rows of the batch that are not the regional prompt (unmasked)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from efficient_attention_pop.attention import attention
from efficient_attention_pop.attention.layout import TokenLayout
from efficient_attention_pop.attention.naive import naive_attention, naive_regional_mask
from efficient_attention_pop.attention.regional import RegionalPrompt, TokenMap, region_cover

from helpers import assert_close


def _masks(frames=1, height=8, width=12):
    """Three regions on an 8 x 12 image: left third, right half (overlapping the middle third's right part), and
    a small box; the bottom-middle stays uncovered."""
    masks = torch.zeros(3, frames, height, width)
    masks[0, :, :, :4] = 1
    masks[1, :, :5, 6:] = 1
    masks[2, :, 2:4, 4:8] = 1
    if frames > 1:
        masks[2, frames // 2:] = 0  # the box leaves in the second half of the video
    return masks


def _sides(case, segments, layout, tile=1):
    text = sum(segments) * tile
    if case == "text first":  # Flux, SD3: [text, image, 3 reference tokens]
        side = TokenMap(text + layout.image_tokens + 3, TokenLayout(layout.frames, layout.height, layout.width,
                                                                    text, 3), 0, text)
        return side, side
    if case == "text last":  # [image, text]
        side = TokenMap(text + layout.image_tokens, layout, layout.image_tokens, text)
        return side, side
    if case == "cross":  # UNet and Wan: image queries, text keys
        return TokenMap(layout.image_tokens, layout), TokenMap(text, None, 0, text)
    if case == "image self":
        side = TokenMap(layout.image_tokens, layout)
        return side, side
    raise AssertionError(case)


CASES = list(itertools.product(["text first", "text last", "cross", "image self"], [True, False],
                               [0.0, 0.25, 1.0], ["area", "max"]))


@pytest.mark.parametrize("case,isolate,base_weight,pooling", CASES)
def test_label_mask_is_the_rule_token_by_token(case, isolate, base_weight, pooling):
    segments = (5, 3, 4, 2)
    for frames, grid, tile in ((1, (4, 6), 1), (1, (2, 3), 2), (4, (4, 6), 1)):
        layout = TokenLayout(frames, *grid)
        masks = _masks(frames if frames > 1 else 1)
        queries, keys = _sides(case, segments, layout, tile)
        prompt = RegionalPrompt(segments, masks, base_weight)
        rows = torch.tensor([True, False, True])
        region = prompt.region_mask(queries, keys, isolate, rows, pooling)
        expected = naive_regional_mask(segments, masks, queries, keys, isolate, base_weight, pooling)
        if region is None:
            assert not torch.isneginf(expected).any() and not expected.any(), "None must mean: allows everything"
            continue
        dense = region.to_dense()  # (3, 1, N, M)
        assert dense.shape[0] == 3
        got = dense[0, 0].double() if dense.dtype != torch.bool else torch.zeros(dense.shape[-2:]).double() \
            .masked_fill(~dense[0, 0], float("-inf"))
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), (case, frames, grid)
        finite = ~torch.isneginf(expected)
        assert torch.allclose(got[finite], expected[finite], atol=1e-6)
        other_row = region.to_dense()[1, 0]
        assert bool((other_row if other_row.dtype == torch.bool else ~torch.isneginf(other_row)).all())
        assert not (other_row.dtype != torch.bool and other_row.any())


def test_without_base_prompt_a_region_text_sees_only_its_own_text_and_image():
    prompt = RegionalPrompt((0, 3, 3), torch.stack([torch.ones(1, 4, 4).tril(), torch.ones(1, 4, 4).triu(1)]), 0.5)
    side = TokenMap(6 + 16, TokenLayout(1, 4, 4, before=6), 0, 6)
    dense = prompt.region_mask(side, side, True, torch.tensor([True])).to_dense()[0, 0]
    assert dense[0, :3].all() and not dense[0, 3:6].any()  # region 1's text: its own text only
    cover = region_cover(prompt.masks, TokenLayout(1, 4, 4), "area")
    assert torch.equal(dense[0, 6:], cover == 1)  # and its region's image
    assert not dense[6:][cover == 1][:, 6:][:, cover == 2].any()  # isolated: region 1's image never sees region 2's


def test_small_regions_survive_max_pooling_on_coarse_grids():
    masks = torch.zeros(1, 1, 64, 64)
    masks[0, 0, 10:14, 40:46] = 1
    assert not region_cover(masks, TokenLayout(1, 8, 8), "area").any()
    assert region_cover(masks, TokenLayout(1, 8, 8), "max").sum() == 1  # one cell at 8 x 8


@pytest.mark.parametrize("case", ["text first", "cross"])
def test_attention_with_the_label_mask_is_sdpa_with_the_dense_mask(case):
    gen = torch.Generator().manual_seed(0)
    segments, layout = (4, 3, 3, 5), TokenLayout(1, 4, 6)
    queries, keys = _sides(case, segments, layout, tile=2)
    region = RegionalPrompt(segments, _masks(), 0.3).region_mask(queries, keys, True, torch.tensor([True, False]))
    q = torch.randn(2, 2, queries.tokens, 8, generator=gen)
    k, v = (torch.randn(2, 2, keys.tokens, 8, generator=gen) for _ in range(2))
    out = attention(q, k, v, 2, mask=region, backend="masked", skip_reshape=True, skip_output_reshape=True)
    dense = region.to_dense()
    expected = naive_attention(q, k, v, dense)
    assert_close(out, expected, torch.float32, case)
    no_empty_rows = ~torch.isneginf(dense).all(-1, keepdim=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense.float()) * no_empty_rows
    assert_close(out, sdpa.nan_to_num(0.0), torch.float32, "sdpa")
    assert torch.isfinite(out).all()


def test_tiled_text_must_be_whole_copies_of_the_prompts():
    prompt = RegionalPrompt((4, 3), torch.ones(1, 1, 4, 4), 0.5)
    assert prompt.text_prompts(14).tolist() == [0] * 4 + [1] * 3 + [0] * 4 + [1] * 3
    with pytest.raises(ValueError, match="not the 7 tokens"):
        prompt.text_prompts(10)
