"""The node "Regional Prompts (PoP)": a prompt per image region in one model evaluation per step.

It joins the conditioning (regional.join_conditioning) and installs the patch that serves its attention calls with
the regions' mask (patch.patch_model with ``regions_only``). Where one pass cannot serve the model or the input, it
returns both unchanged, with one warning that says why: ComfyUI's own masked conditioning then runs, one model
evaluation per region and step. Defined as a classic node, and as a V3 node where ComfyUI has the V3 schema.
"""
from __future__ import annotations

from typing import Optional

from .efficient_attention import CATEGORY
from .families import model_family
from .log import REGIONAL_NODE_NAME, logger
from .patch import patch_model
from .regional import RegionRules, join_conditioning, restart_text_positions, text_padding
from .settings import PatchSettings

DESCRIPTION = (
    "A prompt per image region, in one model evaluation per step instead of one per region. Wire the conditioning "
    "as for ComfyUI's own regional prompting (CLIP Text Encode -> Conditioning (Set Mask) -> Conditioning (Combine)); "
    "entries with a mask are regions, entries without one the base prompt. Connect both outputs: the model to the "
    "sampler, the conditioning to its positive. Where one pass cannot serve the model (see the log) both pass "
    "through unchanged and ComfyUI's own way runs.")
SEARCH_ALIASES = ["regional prompt", "regional prompts", "regional prompting", "region prompt", "attention couple",
                  "couple", "multi prompt", "mask prompt", "area prompt", "regional conditioning", "one pass"]
DEFAULTS = RegionRules()
INPUTS = [
    ("isolation", "FLOAT", {"default": DEFAULTS.isolation, "min": 0.0, "max": 1.0, "step": 0.01},
     "Share of the steps, from the start, in which image tokens attend only to their own region's image. At 1 the "
     "regions are separate images made in one pass; 0.2 (default) composes them first and then lets the image "
     "blend across the borders."),
    ("base_weight", "FLOAT", {"default": DEFAULTS.base_weight, "min": 0.0, "max": 1.0, "step": 0.01},
     "How strongly the base prompt (entries without a mask) speaks inside the regions: 0 not at all, 1 as much as "
     "the region's own prompt. Outside every region the base prompt applies fully."),
    ("isolate_every", "INT", {"default": DEFAULTS.isolate_every, "min": 1, "max": 8, "step": 1},
     "In the isolation steps, every n-th attention layer keeps the regions apart (1: every layer; 2 lets every "
     "other layer see the whole image)."),
]
OUTPUT_TOOLTIPS = ("The model with the regional prompts' attention (the input model is unchanged).",
                   "One conditioning entry holding every prompt: connect it to the sampler's positive.")


def one_pass_problem(family) -> Optional[str]:
    """Why one pass cannot serve this model family (families.model_family) in this ComfyUI (None: it can)."""
    import comfy.ldm.modules.attention as comfy_attention

    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError:  # ComfyUI before December 2024
        WrappersMP = None
    if not hasattr(comfy_attention, "wrap_attn") or not hasattr(WrappersMP, "OUTER_SAMPLE"):
        return "this ComfyUI has no attention override or sampler wrappers (ComfyUI 0.3.60 and later have them)"
    if family.regional:
        return f"{family.name} ({family.recognised_as}): {family.regional}"
    return None


def apply_regional_prompts(model, conditioning, isolation=DEFAULTS.isolation, base_weight=DEFAULTS.base_weight,
                           isolate_every=DEFAULTS.isolate_every):
    """The node's function: (model, conditioning), patched and joined, or both unchanged (see the module)."""
    rules = RegionRules(isolation, base_weight, isolate_every)  # a choice out of range stops here, with why
    family = model_family(model.model.diffusion_model)
    problem = one_pass_problem(family)
    joined = join_conditioning(conditioning, rules, text_padding(model) if family.text_positions_restart else None)
    problem = problem or joined.fallback
    if problem:
        logger.warning("%s: one pass cannot serve this: %s. The model and the conditioning pass through unchanged, "
                       "and ComfyUI's own masked conditioning runs (one model evaluation per prompt and step).",
                       REGIONAL_NODE_NAME, problem)
        return model, conditioning
    for note in joined.notes:
        logger.warning("%s: %s", REGIONAL_NODE_NAME, note)
    patched = patch_model(model, PatchSettings(regions_only=True))
    if family.text_positions_restart:
        patched.set_model_patch(restart_text_positions, "post_input")
    return patched, joined.conditioning


class RegionalPromptsPoP:
    """Classic (V1) node definition."""

    CATEGORY = CATEGORY
    DESCRIPTION = DESCRIPTION
    SEARCH_ALIASES = SEARCH_ALIASES
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "conditioning")
    OUTPUT_TOOLTIPS = OUTPUT_TOOLTIPS
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": ("MODEL", {"tooltip": "The diffusion model."}),
                    "conditioning": ("CONDITIONING", {"tooltip": "The prompts: entries with a mask are regions, "
                                                                 "entries without one the base prompt."})}
        for name, kind, options, tooltip in INPUTS:
            required[name] = (kind, dict(options, tooltip=tooltip))
        return {"required": required}

    def apply(self, model, conditioning, **choices):
        return apply_regional_prompts(model, conditioning, **choices)


def define_v3_node():
    """The same node in the V3 schema, or None where this ComfyUI has no comfy_api.latest."""
    try:
        from comfy_api.latest import io
    except ImportError:
        return None
    import inspect

    aliases = {"search_aliases": SEARCH_ALIASES} if "search_aliases" in inspect.signature(io.Schema).parameters else {}
    kinds = {"INT": io.Int, "FLOAT": io.Float}

    class RegionalPromptsPoPV3(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="RegionalPromptsPoP", display_name="Regional Prompts (PoP)", category=CATEGORY,
                description=DESCRIPTION,
                inputs=[io.Model.Input("model", tooltip="The diffusion model."),
                        io.Conditioning.Input("conditioning", tooltip=RegionalPromptsPoP.INPUT_TYPES()["required"][
                            "conditioning"][1]["tooltip"])]
                + [kinds[kind].Input(name, tooltip=tooltip, **options) for name, kind, options, tooltip in INPUTS],
                # output ids apart from the input ids (0.3.64's schema requires it); shown as model, conditioning
                outputs=[io.Model.Output("regional_model", display_name="model", tooltip=OUTPUT_TOOLTIPS[0]),
                         io.Conditioning.Output("regional_conditioning", display_name="conditioning",
                                                tooltip=OUTPUT_TOOLTIPS[1])],
                **aliases,
            )

        @classmethod
        def execute(cls, model, conditioning, **choices) -> io.NodeOutput:
            return io.NodeOutput(*apply_regional_prompts(model, conditioning, **choices))

    return RegionalPromptsPoPV3
