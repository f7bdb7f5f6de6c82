"""The family rules of nodes/families.py, through place_call and mask_verdict directly (no ComfyUI, no patch): what
one attention call is, from its token counts and what its model call shows. Each test names the mistake it catches."""
from __future__ import annotations

from dataclasses import replace

import torch

from efficient_attention_pop.attention import TokenLayout
from efficient_attention_pop.nodes.families import (FAMILIES, ModelCall, ModelFamily, mask_verdict, model_family,
                                                     place_call, read_model_call)
from efficient_attention_pop.nodes.settings import PatchSettings


def model_call(latent_shape, text=None, context=(), references=0, unplaceable=None):
    return ModelCall(tuple(latent_shape), frozenset(context) | ({text} if text else set()), text,
                     reference_tokens=references, unplaceable=unplaceable)


def test_flux_joint_attention_puts_its_text_before_the_image_and_a_shift_is_refused():
    flux = replace(FAMILIES["Flux"], patch_size=(1, 2, 2))
    call = model_call((1, 16, 32, 48), text=8)
    placement = place_call(flux, 8 + 16 * 24, 8 + 16 * 24, call)
    assert placement.query == placement.key == TokenLayout(1, 16, 24, before=8)
    assert placement.self_attention and placement.exact_only is None
    shifted = place_call(flux, 9 + 16 * 24, 9 + 16 * 24, call)  # one token the text does not account for
    assert shifted.key is None and "this call's text" in shifted.problem
    assert shifted.exact_only.startswith("Flux where")  # approximations run exact there


def test_flux_kontext_reference_tokens_follow_the_image():
    flux = replace(FAMILIES["Flux"], patch_size=(1, 2, 2))
    call = model_call((1, 16, 16, 16), text=8, references=64)
    assert place_call(flux, 8 + 64 + 64, 8 + 64 + 64, call).key == TokenLayout(1, 8, 8, before=8, after=64)


def test_stable_cascade_keys_carry_the_text_after_the_image_and_stay_self_attention():
    cascade = FAMILIES["StageC"]
    call = model_call((1, 16, 8, 8), text=77)
    placement = place_call(cascade, 64, 64 + 77, call, {"activations_shape": (1, 16, 8, 8)})
    assert placement.self_attention is True
    assert placement.query == TokenLayout(1, 8, 8) and placement.key == TokenLayout(1, 8, 8, after=77)


def test_unet_levels_follow_activations_shape_and_cross_attention_is_told_apart():
    unet = FAMILIES["UNetModel"]
    call = model_call((2, 4, 14, 22), text=77)
    options = {"activations_shape": (2, 320, 7, 11)}  # a level as long as the prompt: 7 x 11 = 77
    first = place_call(unet, 77, 77, call, options)
    second = place_call(unet, 77, 77, call, options)
    assert (first.self_attention, second.self_attention) == (True, False)  # attn1 then attn2 of one block
    assert first.key == TokenLayout(1, 7, 11)
    assert place_call(unet, 154, 77, call, {"activations_shape": (2, 320, 14, 11)}).self_attention is False


def test_svd_temporal_attention_has_no_image_grid_and_declines_the_mask_silently():
    unet = FAMILIES["UNetModel"]
    call = model_call((14, 4, 8, 8), text=1)
    options = {"activations_shape": (14, 320, 8, 8)}
    placement = place_call(unet, 14, 14, call, options)  # attention across the 14 frames of one position
    verdict = mask_verdict(unet, placement, call, 14, 14, True, options)
    assert not verdict.applies and verdict.warning is None
    level = place_call(unet, 64, 64, call, options)
    assert mask_verdict(unet, level, call, 64, 64, True, options).key == TokenLayout(1, 8, 8)


def test_hunyuan_video_image_first_puts_its_text_after_the_video():
    hunyuan = replace(FAMILIES["HunyuanVideo"], patch_size=(1, 2, 2))
    call = model_call((1, 16, 3, 8, 8), text=20)
    assert place_call(hunyuan, 48 + 20, 48 + 20, call).key == TokenLayout(3, 4, 4, after=20)


def test_z_image_pads_the_caption_and_the_image_to_a_multiple():
    z_image = replace(FAMILIES["NextDiT"], patch_size=(1, 2, 2), image_padding_multiple=32, text_padding_multiple=32,
                      text_before_image=True)
    call = model_call((1, 16, 16, 20), text=20)  # caption 20 -> 32, image 8 x 10 = 80 -> 96
    assert place_call(z_image, 32 + 96, 32 + 96, call).key == TokenLayout(1, 8, 10, before=32, after=16)


def test_img_slice_that_disagrees_refuses_the_layout():
    flux = replace(FAMILIES["Flux"], patch_size=(1, 2, 2))
    call = model_call((1, 16, 16, 16), text=8)
    placement = place_call(flux, 72, 72, call, {"img_slice": [9, 72]})
    assert placement.key is None and "img_slice" in placement.problem


def test_a_model_the_pack_does_not_know_runs_exact_and_cannot_be_told_self_or_cross():
    unknown = ModelFamily("Mystery", mask_unsupported="its token layout is not known", known=False,
                          recognised_as="Mystery, a class this pack does not know")
    placement = place_call(unknown, 64, 64, model_call((1, 16, 16, 16), text=8))
    assert placement.self_attention is None and placement.key is None
    assert "cannot verify" in placement.exact_only


def test_the_mask_is_declined_with_a_reason_where_the_tokens_do_not_add_up_or_the_queries_are_merged():
    flux = replace(FAMILIES["Flux"], patch_size=(1, 2, 2))
    call = model_call((1, 16, 16, 16), text=8)
    bad = place_call(flux, 73, 73, call)
    verdict = mask_verdict(flux, bad, call, 73, 73, True, {})
    assert not verdict.applies and "not applied" in verdict.warning[1]
    unet = FAMILIES["UNetModel"]
    merged = place_call(unet, 32, 64, model_call((1, 4, 8, 8), text=77), {"activations_shape": (1, 320, 8, 8)})
    assert merged.self_attention is True and merged.query is None  # ToMe merged half the queries
    assert "needs each query's place" in mask_verdict(unet, merged, model_call((1, 4, 8, 8), 77), 32, 64, True,
                                                      {}).warning[1]
    assert mask_verdict(unet, merged, model_call((1, 4, 8, 8), 77), 32, 64, False, {}).applies
    reference = model_call((1, 16, 16, 16), text=8, unplaceable="with ref_latents its tokens are laid out ...")
    assert "ref_latents" in mask_verdict(flux, place_call(flux, 72, 72, reference), reference, 72, 72, True,
                                         {}).warning[1]


def test_read_model_call_counts_the_context_and_reads_the_schedule_window_once():
    wan = replace(FAMILIES["WanModel"], patch_size=(1, 2, 2))
    settings = PatchSettings(sigma_start=5.0, sigma_end=1.0)
    inside = read_model_call(wan, settings, torch.zeros(1, 16, 3, 8, 8), torch.tensor([2.0]), torch.zeros(1, 512, 8),
                             {"clip_fea": torch.zeros(1, 257, 8)})
    assert inside.active and inside.context_tokens == {512, 257} and inside.text_tokens == 512
    outside = read_model_call(wan, settings, torch.zeros(1, 16, 3, 8, 8), torch.tensor([9.0]), None, {})
    assert not outside.active and outside.text_tokens is None


def _stub(class_name, **attributes):
    """An object of a class named like a ComfyUI diffusion model, with the given attributes (model_family reads
    only the class name and attributes)."""
    return type(class_name, (), attributes)()


def test_kandinsky5_text_blocks_are_self_attention_and_its_video_cross_attention_is_not():
    kandinsky = replace(FAMILIES["Kandinsky5"], patch_size=(1, 2, 2))
    call = model_call((1, 16, 3, 8, 8), text=20)
    text_block = place_call(kandinsky, 20, 20, call)  # the text alone, before the visual blocks
    assert text_block.self_attention is True and text_block.key is None and text_block.problem is None
    video = place_call(kandinsky, 48, 48, call)
    assert video.self_attention is True and video.key == TokenLayout(3, 4, 4)
    assert place_call(kandinsky, 48, 20, call).self_attention is False
    humo = replace(FAMILIES["HumoWanModel"], patch_size=(1, 2, 2))  # without the rule: per-frame audio, cross
    assert place_call(humo, 16, 16, model_call((1, 16, 3, 8, 8), text=20, context=(16,))).self_attention is False


def test_image_first_families_count_references_and_text_after_the_image_and_refuse_a_shift():
    joy = replace(FAMILIES["JoyImageTransformer3DModel"], patch_size=(1, 2, 2))
    call = model_call((1, 16, 1, 16, 16), text=8, references=48)  # [image 8 x 8, reference 6 x 8, text]
    assert place_call(joy, 64 + 48 + 8, 64 + 48 + 8, call).key == TokenLayout(1, 8, 8, after=56)
    shifted = place_call(joy, 64 + 48 + 9, 64 + 48 + 9, call)
    assert shifted.key is None and "48 reference and 8 text tokens" in shifted.problem
    lens = FAMILIES["LensTransformer2DModel"]
    assert place_call(lens, 48 + 8, 48 + 8, model_call((1, 128, 8, 6), text=8)).key == TokenLayout(1, 8, 6, after=8)


def test_the_model_says_its_patch_and_text_limit_lens_patch_size_does_not_cut_its_latent():
    assert model_family(_stub("CogVideoXTransformer3DModel", patch_size=2, patch_size_t=None)).patch_size == (1, 2, 2)
    assert model_family(_stub("CogVideoXTransformer3DModel", patch_size=2, patch_size_t=2)).patch_size == (2, 2, 2)
    assert model_family(_stub("LensTransformer2DModel", patch_size=2)).patch_size == (1, 1, 1)
    pixeldit = model_family(_stub("PixDiT_T2I", patch_size=16, txt_max_length=300))
    assert pixeldit.patch_size == (1, 16, 16) and pixeldit.text_limit == 300
    long_text = read_model_call(pixeldit, PatchSettings(), torch.zeros(1, 3, 64, 64), torch.tensor([1.0]),
                                torch.zeros(1, 400, 8), {})
    assert long_text.text_tokens == 300  # PixelDiT cuts its text to txt_max_length before attention
    assert place_call(pixeldit, 300 + 16, 300 + 16, long_text).key == TokenLayout(1, 4, 4, before=300)
