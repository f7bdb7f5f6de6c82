"""The node "Efficient Attention (PoP)": translates the UI's choices into a patch (see patch.py).

Defined for every ComfyUI as a classic node; where ComfyUI has the V3 schema (comfy_api.latest), also
as a V3 node with the same inputs and the same function, which is then the one registered.
"""
from __future__ import annotations

import inspect

from ..attention.regions import MASK_MODES
from .patch import patch_model
from .settings import APPLY_TO, backend_problem, settings_for_model, usable_backends

CATEGORY = "model_patches/attention"
DESCRIPTION = (
    "Chooses how the model computes attention. Exact: auto (the default: the image does not change), sdpa, masked "
    "(region masks without a full score matrix). Faster approximations for high resolution: window (sparse: exact in "
    "each token's neighbourhood, the rest pooled; the closest to exact for its speed), todo (keys and values "
    "pooled), linear. The quality guard (max_error) keeps an approximation only on the layers where it stays close. "
    "An alternative to Sage/Flash attention patch nodes, not SageAttention or FlashAttention itself (its exact calls "
    "run torch SDPA or its own masked kernels). Returns a patched copy; the input model is unchanged, so bypassing "
    "this node restores the original attention.")
# Words people type into the node search for this node. ComfyUI versions with search aliases (V1 SEARCH_ALIASES,
# V3 io.Schema(search_aliases=...)) match them; older ones search the name and display name only. Frontend 1.49.6
# finds a node by any alias but orders the results by the name and display name (and how often a node is used), so
# an alias puts the node in the list, near the end when the word is not in its name. Honest ones only: the
# description says it is an alternative to Sage/Flash attention patches, not one of them.
SEARCH_ALIASES = ["attention", "efficient", "efficient attention", "sdpa", "linear attention", "masked attention",
                  "mask attention", "attention mask", "mask", "region", "region mask", "regional attention",
                  "speed", "speed up", "fast", "faster", "faster attention", "sparse attention", "sparse",
                  "flash", "flash attention alternative", "sage", "sage attention alternative", "todo",
                  "token downsampling", "window attention", "local attention"]
BACKEND_CHOICES = usable_backends()  # what this machine can run; a saved workflow's other choice is refused, with why
WHICH = "see README: Which settings for which model"

# (name, kind, options, tooltip) in the order the node has them since its first release: the backend and its own
# options, where it applies, when in the schedule, the mask, heads and layernorm, then refresh and cache_gb (added
# later). The order stays: a saved workflow stores the widget values by position. kind is the classic type name.
INPUTS = [
    ("backend", "COMBO", {"default": "auto", "options": BACKEND_CHOICES},
     "auto (default), sdpa, masked: exact, the image does not change. window, tiles (3-D tiles for video, options "
     f"fixed), todo, linear: APPROXIMATE, faster at high resolution, they change the image ({WHICH}). Lists only "
     "what this machine runs."),
    ("downsample", "INT", {"default": 2, "min": 2, "max": 4, "step": 1},
     "window and todo: distant keys and values are averaged over downsample x downsample tokens; 2 is closest to "
     f"exact, 4 is faster and further from it ({WHICH})."),
    ("window", "INT", {"default": 16, "min": 8, "max": 32, "step": 8},
     "window: each token attends exactly to its window x window block (8, 16 or 32) and a margin, the rest pooled; "
     f"larger is closer to exact and slower ({WHICH})."),
    ("max_error", "FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.01},
     "The quality guard (0 = off): a layer keeps the approximation only if its relative error against exact "
     "attention, measured in the first step (which runs exact), is at most this; the log lists the layers (see "
     "README: The quality guard)."),
    ("strength", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01},
     "Approximate backends: blends exact (0) and approximate (1) attention; below 1 both are computed, so it is "
     "slower than exact."),
    ("apply_to", "COMBO", {"default": "both", "options": list(APPLY_TO)},
     "Which attention calls to patch: self-attention (image to image; Flux and SD3's joint text and image call), "
     "cross-attention (image to text) or both."),
    ("min_tokens", "INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64},
     "Calls with fewer query tokens run exact; e.g. 16384 keeps an approximation to the top UNet level of SD1.5 at "
     "1024 px or SDXL at 2048 px."),
    ("start_percent", "FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001},
     "Where in the denoising schedule the patch starts (0 = first step); before it the model's own attention runs."),
    ("end_percent", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001},
     "Where in the denoising schedule the patch ends (1 = last step); after it the model's own attention runs."),
    ("mask_mode", "COMBO", {"default": "isolate regions", "options": list(MASK_MODES)},
     "With a mask: image tokens attend only to keys inside it, only to keys outside it, or (isolate regions) inside "
     "to inside and outside to outside, which keeps two subjects apart; text is never masked."),
    ("heads", "INT", {"default": 0, "min": 0, "max": 256, "step": 1},
     "0 = each layer's own head count; otherwise q, k and v are split into this many heads (it must divide every "
     "layer's width), which changes the output."),
    ("layernorm", "BOOLEAN", {"default": False},
     "Normalises q and k per head before attention (QK-norm): changes the output, can steady very long sequences."),
    # added after the others, so that workflows saved before keep their values in place
    ("refresh", "INT", {"default": 0, "min": 0, "max": 100, "step": 1},
     "window, tiles and todo (0 = off): every refresh steps each layer runs exact and keeps its difference to the "
     "approximation, added back in between: much closer to exact for some speed and memory; try 6 for 20 to 30 "
     f"steps ({WHICH})."),
    ("cache_gb", "FLOAT", {"default": 8.0, "min": 0.0, "max": 1024.0, "step": 0.5},
     "With refresh: the most memory (GiB per device) the kept differences may take; a run that needs more runs the "
     "plain approximation, with a warning."),
]
# Inputs added after the node was first released: optional, so a workflow or API prompt saved before them still runs
# (their defaults apply) instead of being refused for a missing required input.
ADDED_LATER = ("refresh", "cache_gb")
# What the node shows where ComfyUI folds advanced inputs (0.33's `advanced`): the backend and its two own options,
# the quality guard, refresh (the README's way to closer images), and the mask's mode (the mask is a socket). The
# rest, which the README's recipes leave at their defaults but for one each, is folded; nothing moves.
FRONT = ("backend", "downsample", "window", "max_error", "mask_mode", "refresh")
ADVANCED = tuple(name for name, *_ in INPUTS if name not in FRONT)
# node input -> backends it is an option of; tiles takes none: the node runs it with its defaults, the video preset
# measured on the video proxy (README: Which settings for which model)
BACKEND_OPTIONS = {"downsample": ("todo", "window"), "window": ("window",)}
MASK_TOOLTIP = ("Optional region mask (white = inside), resized to each layer's token grid; it shapes image-to-image "
                "attention only (see README: The node's options).")


def comfyui_folds_advanced_inputs():
    """Whether this ComfyUI's node schema has ``advanced`` inputs (0.33.0's comfy_api.latest: io.Input takes
    ``advanced``, which its frontend folds behind "Show advanced inputs"; classic INPUT_TYPES options carry it as the
    key "advanced"). False in 0.3.64 and the March 2024 ComfyUI, where every input shows as before."""
    try:
        from comfy_api.latest import io
    except ImportError:
        return False
    try:
        return "advanced" in inspect.signature(io.Int.Input).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def validate_backend(backend):
    """ComfyUI's input validation (before anything runs): True, or why ``backend`` cannot be used here. A workflow
    saved where another backend was available still loads; queueing it names the backend and the reason."""
    return backend_problem(backend) or True


def apply_efficient_attention(model, backend, downsample=2, window=16, max_error=0.0, strength=1.0,
                              apply_to="both", min_tokens=0, start_percent=0.0, end_percent=1.0,
                              mask_mode="isolate regions", heads=0, layernorm=False, mask=None, refresh=0,
                              cache_gb=8.0):
    """The node's function, shared by the classic and the V3 definitions: returns the patched clone."""
    choices = {"downsample": downsample, "window": window}
    options = {name: value for name, value in choices.items() if backend in BACKEND_OPTIONS[name]}
    settings = settings_for_model(
        model, start_percent=start_percent, end_percent=end_percent, backend=backend, heads=heads,
        layernorm=layernorm, apply_to=apply_to, min_tokens=min_tokens, strength=strength, mask=mask,
        mask_mode=mask_mode, options=options, max_error=max_error, refresh=refresh, cache_gb=cache_gb)
    return patch_model(model, settings)


class EfficientAttentionPoP:
    """Classic (V1) node definition, loaded by every ComfyUI version."""

    CATEGORY = CATEGORY
    DESCRIPTION = DESCRIPTION
    SEARCH_ALIASES = SEARCH_ALIASES
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the patched attention (the input model is unchanged).",)
    FUNCTION = "patch"

    @classmethod
    def VALIDATE_INPUTS(cls, backend):
        return validate_backend(backend)

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": ("MODEL", {"tooltip": "The diffusion model to patch."})}
        optional = {}
        fold = comfyui_folds_advanced_inputs()
        for name, kind, options, tooltip in INPUTS:
            extra = {key: value for key, value in options.items() if key != "options"}
            extra["tooltip"] = tooltip
            if fold and name in ADVANCED:
                extra["advanced"] = True
            (optional if name in ADDED_LATER else required)[name] = (
                (options["options"], extra) if kind == "COMBO" else (kind, extra))
        optional["mask"] = ("MASK", {"tooltip": MASK_TOOLTIP})
        return {"required": required, "optional": optional}

    def patch(self, model, **choices):
        return (apply_efficient_attention(model, **choices),)


def define_v3_node():
    """The same node in the V3 schema, or None where this ComfyUI has no comfy_api.latest."""
    try:
        from comfy_api.latest import io
    except ImportError:
        return None
    # search_aliases only where this ComfyUI's io.Schema takes it (0.3.64's does not)
    aliases = {"search_aliases": SEARCH_ALIASES} if "search_aliases" in inspect.signature(io.Schema).parameters else {}
    kinds = {"COMBO": io.Combo, "INT": io.Int, "FLOAT": io.Float, "BOOLEAN": io.Boolean}

    fold = comfyui_folds_advanced_inputs()

    def v3_input(name, kind, options, tooltip):
        common = dict(tooltip=tooltip, optional=name in ADDED_LATER)
        if fold and name in ADVANCED:
            common["advanced"] = True  # only where io.Input takes it (0.33.0); folded, not moved
        if kind == "COMBO":
            return io.Combo.Input(name, options=options["options"], default=options["default"], **common)
        return kinds[kind].Input(name, **common, **options)

    class EfficientAttentionPoPV3(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="EfficientAttentionPoP", display_name="Efficient Attention (PoP)", category=CATEGORY, description=DESCRIPTION,
                inputs=[io.Model.Input("model", tooltip="The diffusion model to patch.")]
                + [v3_input(*spec) for spec in INPUTS]
                + [io.Mask.Input("mask", optional=True, tooltip=MASK_TOOLTIP)],
                outputs=[io.Model.Output(tooltip=EfficientAttentionPoP.OUTPUT_TOOLTIPS[0])],
                **aliases,
            )

        @classmethod
        def validate_inputs(cls, backend):
            return validate_backend(backend)

        @classmethod
        def execute(cls, model, **choices) -> io.NodeOutput:
            return io.NodeOutput(apply_efficient_attention(model, **choices))

    return EfficientAttentionPoPV3
