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
    "Runs the model's attention through the Efficient Attention (PoP) backends. Exact: auto (the default: the "
    "image does not change), sdpa, masked (region masks without a full score matrix). Faster but approximate: "
    "window (exact in each token's neighbourhood, the rest pooled: the closest to exact for its speed at high "
    "resolution), todo (keys and values pooled on the image grid), linear. "
    "The quality guard (max_error) keeps an approximation only on the layers where it stays close. Returns a "
    "patched copy; the input model is unchanged, so bypassing this node restores the original attention.")
# Words people type into the node search for this node. ComfyUI versions with search aliases (V1 SEARCH_ALIASES,
# V3 io.Schema(search_aliases=...)) match them; older ones search the name and display name only.
SEARCH_ALIASES = ["attention", "efficient", "efficient attention", "sdpa", "linear attention", "masked attention",
                  "mask", "region mask", "speed", "speed up", "fast", "faster", "flash", "todo", "token downsampling",
                  "window attention", "local attention"]
BACKEND_CHOICES = usable_backends()  # what this machine can run; a saved workflow's other choice is refused, with why

# (name, kind, options, tooltip) in the order the node shows them: the backend and its own options, where it
# applies, when in the schedule, the mask, and last the rarely changed heads and layernorm. kind is the classic
# ComfyUI type name.
INPUTS = [
    ("backend", "COMBO", {"default": "auto", "options": BACKEND_CHOICES},
     "auto: the fastest exact backend for each call (the image does not change). sdpa: exact, torch "
     "scaled_dot_product_attention. masked: exact, every mask form without a full score matrix. window: "
     "APPROXIMATE, exact attention in each token's neighbourhood plus the rest pooled: the closest to exact for "
     "its speed at high resolution. todo: APPROXIMATE, keys and values pooled on the image grid (ToDo). linear: "
     "APPROXIMATE, Efficient Attention (Shen et al. 2021), O(N), changes the image of models trained with softmax "
     "attention. *_triton: fused GPU kernels. Only the backends this machine can run are listed; a workflow saved "
     "with another one stops at this node with the reason."),
    ("downsample", "INT", {"default": 2, "min": 2, "max": 4, "step": 1},
     "Only for todo and window: distant keys and values are averaged over downsample x downsample image tokens "
     "(2: 4x fewer, 4: 16x fewer). Higher is faster and further from exact. todo takes 2, 3 or 4; window 2 or 4."),
    ("window", "INT", {"default": 16, "min": 8, "max": 32, "step": 8},
     "Only for window: each token attends exactly to its window x window block of the image and a window/4 margin "
     "around it (8, 16 or 32 tokens; larger is closer to exact and slower)."),
    ("max_error", "FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.01},
     "Only for approximate backends: the quality guard. 0 = off. Otherwise each layer's approximation is measured "
     "against exact attention in the first step of every run (that step runs exact, so it costs a little more) "
     "and kept only on layers whose relative error is at most this; one layer per step is measured again. The "
     "log shows a table of the layers."),
    ("strength", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01},
     "Only for approximate backends: out = exact + strength * (approx - exact). 1.0 computes only the "
     "approximation; below 1 both run (slower than exact). Ignored by exact backends."),
    ("apply_to", "COMBO", {"default": "both", "options": list(APPLY_TO)},
     "Which attention calls to patch. UNets (SD1.x, SDXL), Wan, LTXV, Cosmos: self-attention = image to image, "
     "cross-attention = image to text. Joint-attention DiTs (Flux, SD3, HunyuanVideo, Qwen-Image) make one "
     "self-attention call over text and image tokens together: self-attention and both patch it, cross-attention "
     "patches nothing there. window and todo serve self-attention over image tokens only; other calls run exact."),
    ("min_tokens", "INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64},
     "Use the chosen backend only in calls with at least this many query tokens; smaller calls run exact (auto). "
     "E.g. 4096 applies it only to the highest-resolution SD1.5 layers at 512px."),
    ("start_percent", "FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001},
     "Part of the denoising schedule where the patch is active: from here..."),
    ("end_percent", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001},
     "...to here. Outside it the model's own attention runs (e.g. an approximation only in the middle of "
     "sampling)."),
    ("mask_mode", "COMBO", {"default": "isolate regions", "options": list(MASK_MODES)},
     "Only with a mask. keys inside mask: every image token attends only to image tokens inside the mask. keys "
     "outside mask: only to those outside. isolate regions: tokens inside attend only inside, outside only outside "
     "(keeps two subjects from bleeding into each other). Attention to text is never masked."),
    ("heads", "INT", {"default": 0, "min": 0, "max": 256, "step": 1},
     "0 = each layer's own head count (what the model was trained with). Otherwise q/k/v are split into this many "
     "heads; it must divide every attention width of the model, which the node checks when it runs."),
    ("layernorm", "BOOLEAN", {"default": False},
     "QK layernorm: normalise q and k per head (no affine parameters) before attention. Changes the output; "
     "can tame attention in very long sequences."),
    # added after the others, so that workflows saved before keep their values in place
    ("refresh", "INT", {"default": 0, "min": 0, "max": 100, "step": 1},
     "Only for approximate backends (window, todo): 0 = off. Otherwise every refresh steps each served layer "
     "computes exact attention as well, returns it and keeps the difference to the approximation (the residual); "
     "the steps in between add that residual to the approximation, which brings the image much closer to exact "
     "for a little of the speed. 1 = exact every step (the exact image). Try 5 to 6 for 20 to 30 steps. With "
     "max_error the guard picks per layer the plain approximation, approximation + residual, or exact. Costs "
     "memory: one attention output per layer (see cache_gb)."),
    ("cache_gb", "FLOAT", {"default": 8.0, "min": 0.0, "max": 1024.0, "step": 0.5},
     "Only with refresh: the most memory (GiB, per device) the kept residuals may take, one attention output per "
     "layer in the compute dtype (Flux at 2048x2048 with CFG: 11.0 GiB in bf16; at 1024x1024: 3.0 GiB). The first "
     "step of a run at a new size measures the need; a run that would exceed the budget runs the plain "
     "approximation instead, with a warning giving the numbers, and never runs out of memory mid-sampling."),
]
# Inputs added after the node was first released: optional, so a workflow or API prompt saved before them still runs
# (their defaults apply) instead of being refused for a missing required input.
ADDED_LATER = ("refresh", "cache_gb")
BACKEND_OPTIONS = {"downsample": ("todo", "window"), "window": ("window",)}  # node input -> backends it is an option of
MASK_TOOLTIP = ("Optional region mask (white = inside), resized to each attention layer's token grid; it shapes "
                "image-to-image attention only. Batch 1 applies to every image; a larger batch is matched to the "
                "latent batch.")


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
        for name, kind, options, tooltip in INPUTS:
            extra = {key: value for key, value in options.items() if key != "options"}
            extra["tooltip"] = tooltip
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

    def v3_input(name, kind, options, tooltip):
        optional = name in ADDED_LATER
        if kind == "COMBO":
            return io.Combo.Input(name, options=options["options"], default=options["default"], tooltip=tooltip,
                                  optional=optional)
        return kinds[kind].Input(name, tooltip=tooltip, optional=optional, **options)

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
