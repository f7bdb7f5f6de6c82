"""The node on every model family of today's ComfyUI ($COMFYUI_PATH), on the tiny models of comfy_families.py.

For each family: backend sdpa gives the unpatched output and serves exactly the calls that reach the override
(as many as reach ComfyUI's own wrap_attn); linear runs, is finite and changes the output; a two-region MASK is
applied where the family's token layout is known and otherwise declined with one warning naming the family,
and todo serves the image self-attention calls there;
the node's heads option works both ways (0 = the model's own, 1 = a divisor of every width) and one that
divides no width is refused when the node runs, with every width the calls use known beforehand.
"""
from __future__ import annotations

import logging

import pytest
import torch

import comfy_env
import comfy_families as zoo
from efficient_attention_pop.nodes.families import model_family
from efficient_attention_pop.nodes.settings import attention_widths

from test_comfy_node import DEFAULTS, CallLog, patched

# Families whose MASK is declined (with the warning): no image grid, or tokens placed where the pack cannot place them
# (also every case whose inputs use one of its family's layout_changing_keywords: HunyuanVideo's ref_latent before
# ComfyUI put it before the image and said so with img_slice).
MASK_DECLINED = {"Stable Audio", "ACE-Step", "Hunyuan3D v2", "Wan 2.2 S2V"}
# Families whose self-attention holds tokens that do not add up to the layout the pack knows: approximations run exact
# there, with a warning.
UNVERIFIED_SELF_ATTENTION = {"Wan 2.2 S2V"}


def mask_declined(case, model, inputs) -> bool:
    family = model_family(model.model.diffusion_model)
    return case.name in MASK_DECLINED or any(inputs["conds"].get(k) is not None
                                             for k in family.layout_changing_keywords)


def exact_only(keywords) -> int:
    """Calls that demand exact attention: full precision (low_precision_attention=False). (Grouped-query calls,
    enable_gqa, are served: the approximations read each group's shared k/v head.)"""
    return sum(1 for kw in keywords if kw.get("low_precision_attention") is False)


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_todays_comfy("the family matrix")


def _relative_difference(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _without_attention(model, inputs):
    """The output with every attention call returning zeros: how much attention matters in this tiny model (in
    Chroma Radiance's, whose pixel head barely reads the transformer, hardly at all)."""
    clone = model.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = (
        lambda func, *args, **kwargs: func(*args, **kwargs) * 0)
    return zoo.run_model(clone, inputs)


def _left_half_mask(x):
    height, width = x.shape[-2] * 8, x.shape[-1] * 8
    mask = torch.zeros(1, height, width)
    mask[:, :, : width // 2] = 1.0
    return mask


@pytest.mark.parametrize("case", zoo.CASES, ids=[case.name for case in zoo.CASES])
def test_family(comfy, case, monkeypatch, caplog):
    model, inputs = case.build(), case.inputs()
    reference, wrap_attn_calls, _ = zoo.count_attention_calls(lambda: zoo.run_model(model, inputs))

    log = CallLog(monkeypatch)
    keywords = []
    out, _, override_calls = zoo.count_attention_calls(lambda: zoo.run_model(patched(model, backend="sdpa"), inputs),
                                                       keywords)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())
    expected_calls = wrap_attn_calls - (1 if case.name in zoo.CALLS_WITHOUT_OVERRIDE else 0)
    assert override_calls == expected_calls and len(log.calls) == override_calls
    widths = {c["heads"] * c["dim"] for c in log.calls}
    assert widths <= attention_widths(model.model.diffusion_model), "a width the node could not check beforehand"

    changed = max(100 * _relative_difference(out, reference), 1e-6)  # well above float reordering
    attention_matters = _relative_difference(_without_attention(model, inputs), reference) > 100 * changed
    log.calls.clear()
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        linear = zoo.run_model(patched(model, backend="linear"), inputs)
    assert torch.isfinite(linear).all() and set(log.backends()) <= {"linear", "sdpa"}
    approximable = override_calls - exact_only(keywords)  # the rest demand exact attention
    if case.name in UNVERIFIED_SELF_ATTENTION or any(inputs["conds"].get(k) is not None for k in
                                                      model_family(model.model.diffusion_model).layout_changing_keywords):
        assert log.backends().count("linear") < approximable or approximable == 0  # unplaced: exact
        assert any("linear runs exact on calls of" in r.getMessage() for r in caplog.records)
    else:
        assert log.backends().count("linear") == approximable
    caplog.clear()
    if log.backends().count("linear") == 0:  # every call exact: on demand (0.33: Stable Audio) or unplaced
        torch.testing.assert_close(linear, out, rtol=1e-4, atol=1e-5 * reference.abs().max().item())
    else:
        assert _relative_difference(linear, reference) > changed or not attention_matters

    log.calls.clear()
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        masked = zoo.run_model(patched(model, backend="masked", mask=_left_half_mask(inputs["x"])), inputs)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    regions = [c["mask"].region for c in log.calls if c["mask"].region is not None]
    assert torch.isfinite(masked).all()
    declined = mask_declined(case, model, inputs)
    if declined:
        assert regions == [] and len(warnings) == 1 and "the mask is not applied to" in warnings[0]
        assert type(model.model.model_config).__name__ in warnings[0]  # names the family
        torch.testing.assert_close(masked, out, rtol=1e-4, atol=1e-5 * reference.abs().max().item())
    else:
        assert regions and warnings == [], warnings
        assert _relative_difference(masked, out) > changed or not attention_matters
        for region in regions:  # image keys are labelled, text keys (-1) never masked: as many as image queries
            assert (region.key_labels >= 0).sum(1).tolist() == (region.query_labels >= 0).sum(1).tolist()

    log.calls.clear()
    pooled = zoo.run_model(patched(model, backend="todo"), inputs)
    assert torch.isfinite(pooled).all()
    if not declined and approximable:  # where the layout is known, todo serves the image self-attention calls
        assert "todo" in log.backends()

    log.calls.clear()
    one_head = zoo.run_model(patched(model, backend="sdpa", heads=1), inputs)
    grouped = sum(1 for kw in keywords if kw.get("enable_gqa"))  # k/v with fewer heads cannot be split anew: passed on
    assert torch.isfinite(one_head).all() and {c["heads"] for c in log.calls} == ({1} if grouped < override_calls
                                                                                  else set())
    with pytest.raises(ValueError, match=r"^Mismatch in tensor dimensions: Efficient Attention \(PoP\) heads=7 does "
                                         r"not divide this model's attention widths"):
        patched(model, backend="sdpa", heads=7)


@pytest.mark.parametrize("case", zoo.UNREACHABLE, ids=[case.name for case in zoo.UNREACHABLE])
def test_unreachable_family_is_left_alone_with_one_warning(comfy, case, caplog):
    model, inputs = case.build(), case.inputs()
    reference = zoo.run_model(model, inputs)
    clone = patched(model, backend="linear")
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        out = zoo.run_model(clone, inputs)
        zoo.run_model(clone, inputs)
    torch.testing.assert_close(out, reference)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "made no attention call through ComfyUI's attention override" in warnings[0]


def test_families_are_named_in_the_family_table():
    import os

    with open(os.path.join(os.path.dirname(comfy_env.__file__), "..", "docs", "model-families.md")) as table:
        text = table.read()
    for case in zoo.CASES + zoo.UNREACHABLE:
        assert case.name in text, f"{case.name} is missing from the family table in docs/model-families.md"
