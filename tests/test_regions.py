"""Image masks on token grids: layouts of UNet levels, DiT patches, joint text tokens and video frames."""
from __future__ import annotations

import pytest
import torch

from efficient_attention_pop.attention import RegionMask, attention
from efficient_attention_pop.attention.layout import TokenLayout, find_token_layout
from efficient_attention_pop.attention.regions import RegionMasker, inside_mask, labels_for_mode


@pytest.mark.parametrize("latent, tokens, grid", [
    ((2, 4, 64, 64), 4096, (64, 64)), ((2, 4, 64, 64), 1024, (32, 32)), ((2, 4, 64, 64), 64, (8, 8)),
    ((1, 4, 13, 17), 63, (7, 9)), ((1, 4, 13, 17), 20, (4, 5)),  # odd sizes round up at every halving
    ((1, 4, 128, 96), 12288, (128, 96)), ((1, 4, 128, 96), 192, (16, 12)),  # SDXL-like portrait levels
])
def test_unet_levels(latent, tokens, grid):
    assert find_token_layout(latent, tokens) == TokenLayout(1, *grid)


def test_unet_token_count_that_fits_no_level():
    assert find_token_layout((1, 4, 64, 64), 77) is None


def test_flux_joint_others_first():
    layout = find_token_layout((1, 16, 128, 128), 256 + 4096, patch_size=2, others_first=True, text_tokens=256)
    assert layout == TokenLayout(1, 64, 64, before=256, after=0)
    with_reference = find_token_layout((1, 16, 128, 128), 256 + 4096 + 1024, 2, True, text_tokens=256)
    assert with_reference == TokenLayout(1, 64, 64, before=256, after=1024)  # Kontext reference tokens after


def test_hunyuan_video_joint_text_last_with_frames():
    layout = find_token_layout((1, 16, 5, 32, 48), 5 * 16 * 24 + 77, patch_size=2, others_first=False)
    assert layout == TokenLayout(5, 16, 24, before=0, after=77)


def test_dit_without_joint_attention_needs_an_exact_fit():
    assert find_token_layout((1, 16, 9, 30, 52), 9 * 15 * 26, patch_size=2) == TokenLayout(9, 15, 26)
    assert find_token_layout((1, 16, 30, 52), 15 * 26 + 5, patch_size=2) is None
    assert find_token_layout((1, 16, 30, 52), 100, patch_size=2, others_first=True) is None  # fewer than the image
    assert find_token_layout((1, 16, 30), 100) is None


def test_inside_mask_resizes_and_thresholds():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    inside = inside_mask(mask, TokenLayout(2, 4, 4))
    row = torch.tensor([True, True, False, False])
    assert torch.equal(inside, row.repeat(4).repeat(2)[None])  # same on both frames


def test_the_masker_checks_the_mask_and_the_mode_once():
    with pytest.raises(ValueError, match=r"expected ComfyUI's \[B, H, W\] or \[H, W\] MASK"):
        RegionMasker(torch.zeros(1, 1, 8, 8), "isolate regions")
    with pytest.raises(ValueError, match="Unknown mask mode"):
        RegionMasker(torch.zeros(8, 8), "sideways")
    masker = RegionMasker(torch.zeros(8, 8), "keys inside mask")  # (H, W) is read as one mask
    assert masker.mask.shape == (1, 8, 8) and not masker.needs_query_places


def test_labels_for_each_mode_mean_what_the_node_says():
    inside = torch.tensor([[True, False]])
    query, key = labels_for_mode(inside, "keys inside mask")
    allowed = RegionMask(query, key).to_dense()[0, 0]
    assert torch.equal(allowed, torch.tensor([[True, False], [True, False]]))  # every query sees only the inside key
    query, key = labels_for_mode(inside, "keys outside mask")
    assert torch.equal(RegionMask(query, key).to_dense()[0, 0], torch.tensor([[False, True], [False, True]]))
    query, key = labels_for_mode(inside, "isolate regions")
    assert torch.equal(RegionMask(query, key).to_dense()[0, 0], torch.tensor([[True, False], [False, True]]))
    with pytest.raises(ValueError, match="Unknown mask mode"):
        labels_for_mode(inside, "sideways")


def test_region_mask_text_tokens_attend_and_are_attended_everywhere():
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    layout = TokenLayout(1, 2, 2, before=3)
    region = RegionMasker(mask, "isolate regions").region_mask(layout, attention_batch=2, latent_batch=2)
    dense = region.to_dense()[0, 0]
    assert dense[:3].all() and dense[:, :3].all()  # text rows and columns
    assert torch.equal(dense[3:, 3:], torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]).bool())


def test_region_mask_batches():
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4] = 1.0
    masks[1, :, 4:] = 1.0
    layout = TokenLayout(1, 2, 2)
    # cond and uncond of a latent batch of 2: attention batch 4, images 0, 1, 0, 1
    region = RegionMasker(masks, "isolate regions").region_mask(layout, attention_batch=4, latent_batch=2)
    assert torch.equal(region.query_labels[0], region.query_labels[2])
    assert torch.equal(region.query_labels[1], region.query_labels[3])
    assert torch.equal(region.query_labels[0], 1 - region.query_labels[1])
    single = RegionMasker(masks[:1], "isolate regions").region_mask(layout, attention_batch=4, latent_batch=2)
    assert single.query_labels.shape == (1, 4)  # batch 1 broadcasts


@pytest.mark.parametrize("fill, mode", [(1.0, "isolate regions"), (0.0, "isolate regions"), (1.0, "keys inside mask"),
                                        (0.0, "keys outside mask")])
def test_masks_that_allow_everything_are_dropped(fill, mode):
    assert RegionMasker(torch.full((1, 8, 8), fill), mode).region_mask(TokenLayout(1, 4, 4), 2, 2) is None


def test_empty_keys_inside_mask_leaves_image_queries_only_text():
    layout = TokenLayout(1, 2, 2, before=2)
    region = RegionMasker(torch.zeros(1, 8, 8), "keys inside mask").region_mask(layout, 1, 1)
    q = torch.randn(1, 6, 8)
    out = attention(q, q, q, 2, region)
    reference = attention(q, q, q, 2, region.to_dense())
    torch.testing.assert_close(out, reference)
