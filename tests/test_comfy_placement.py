"""Where the node places the image tokens of every model family, checked against what the model itself does.

The ground truth comes from the model, not from the pack's family table: one latent patch (frame f, row r, column c in
the model's own patch units) is changed and the model is run again; in every attention call, the query token whose
value changes most is that patch's token (its own projection changes, the others only through attention mixing).
The node's claim for the same call (the query layout it placed: ``before + f*H*W + r*W + c``) must name exactly that
token, for the first and the last patch of the grid, so a grid shifted by one token, one row or one frame, a wrong
patch size or text on the wrong side fails. Calls the node did not place must be calls without an image grid (fewer
tokens than the grid, or the family's cross-attention). Runs in today's ComfyUI ($COMFYUI_PATH).
"""
from __future__ import annotations

import pytest
import torch

import comfy_env
import comfy_families as zoo
from efficient_attention_pop.nodes.serving import CallServer
from efficient_attention_pop.nodes.families import model_family

from test_comfy_node import patched

# Families without an image grid to place (audio, 3-D shapes): their placement is "none", checked by the matrix.
NO_IMAGE_GRID = {"Stable Audio", "ACE-Step", "Hunyuan3D v2"}
UNETS = {"SD1.5", "SD2.x (v-prediction)", "SDXL", "SVD (img2vid)", "Stable Cascade stage C", "Stable Cascade stage B"}
DIT_CASES = [case for case in zoo.CASES if case.name not in NO_IMAGE_GRID | UNETS]
# Families whose self-attention holds tokens the pack does not place (reference and motion frames beside the video):
# the node must place nothing there.
NOT_PLACED = {"Wan 2.2 S2V"}


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_todays_comfy("the placement tests")


class LayoutRecorder:
    """Every call the node served: its queries (batch 0, as (N, channels)) and the placement the node made
    (families.place_call: its ``query`` layout)."""

    def __init__(self, monkeypatch):
        self.calls = []
        run = CallServer._run

        def recording(server, call, placement, *args):
            q = call.q[0].transpose(0, 1).flatten(1) if call.skip_reshape else call.q[0]
            self.calls.append((q.detach().clone(), placement, call.key_tokens))
            return run(server, call, placement, *args)

        monkeypatch.setattr(CallServer, "_run", recording)


def _perturbed(x, patch, frame, row, col):
    """The latent with one patch (in patch units) changed; frame is ignored for images."""
    pt, ph, pw = patch
    x = x.clone()
    region = (..., slice(row * ph, (row + 1) * ph), slice(col * pw, (col + 1) * pw))
    if x.ndim == 5:
        region = (slice(None), slice(None), slice(frame * pt, (frame + 1) * pt)) + region[1:]
    x[region] += 3.0 * x.std() + 1.0
    return x


def _run(model, inputs, x, monkeypatch):
    recorder = LayoutRecorder(monkeypatch)
    zoo.run_model(patched(model, backend="sdpa"), dict(inputs, x=x))
    monkeypatch.undo()
    return recorder.calls


def _grid(x, patch):
    frames = -(-x.shape[2] // patch[0]) if x.ndim == 5 else 1
    return frames, -(-x.shape[-2] // patch[1]), -(-x.shape[-1] // patch[2])


@pytest.mark.parametrize("case", DIT_CASES, ids=[case.name for case in DIT_CASES])
def test_image_tokens_are_where_the_model_puts_them(comfy, case, monkeypatch):
    model, inputs = case.build(), case.inputs()
    family = model_family(model.model.diffusion_model)
    x = inputs["x"]
    frames, height, width = _grid(x, family.patch_size)
    base = _run(model, inputs, x, monkeypatch)
    placed_calls = [i for i, (_, placed, _) in enumerate(base) if placed.query is not None]
    if case.name in NOT_PLACED or any(inputs["conds"].get(keyword) is not None
                                      for keyword in family.layout_changing_keywords):
        assert not placed_calls, "a layout the family table says the pack cannot place was placed"
        return
    assert placed_calls, f"the node placed no image grid in any {case.name} call"
    for frame, row, col in ((0, 0, 0), (frames - 1, height - 1, width - 1)):
        changed = _run(model, inputs, _perturbed(x, family.patch_size, frame, row, col), monkeypatch)
        assert len(changed) == len(base)
        for index in placed_calls:
            (q, placed, _), (q2, _, _) = base[index], changed[index]
            layout = placed.query
            assert (layout.frames, layout.height, layout.width) == (frames, height, width), (index, layout)
            claimed = layout.before + (frame * layout.height + row) * layout.width + col
            truth = int((q2 - q).norm(dim=-1).argmax())
            assert claimed == truth, (f"call {index}: the node puts patch {(frame, row, col)} at token {claimed}, "
                                      f"the model's queries change most at token {truth} (layout {layout})")


def test_unet_levels_follow_activations_shape(comfy, monkeypatch):
    """UNets: each level's grid is the level's own activations (B, C, H, W), so a MASK follows every downsampling."""
    case = next(case for case in zoo.CASES if case.name == "SD1.5")
    model, inputs = case.build(), case.inputs()
    calls = _run(model, inputs, inputs["x"], monkeypatch)
    sizes = {(placed.query.height, placed.query.width) for _, placed, _ in calls if placed.query is not None}
    h, w = inputs["x"].shape[-2:]
    assert sizes == {(h, w), (-(-h // 2), -(-w // 2))}, sizes
