"""The node "Efficient Attention (PoP)": translates the UI's choices into a patch (see patch.py).

Defined for every ComfyUI as a classic node; where ComfyUI has the V3 schema (comfy_api.latest), also
as a V3 node with the same inputs and the same function, which is then the one registered.
"""
from __future__ import annotations

from ..attention.regions import MASK_MODES
from .patch import APPLY_TO, backend_problem, patch_model, settings_for_model, usable_backends

CATEGORY = "model_patches/attention"
DESCRIPTION = (
    "Runs the model's attention through the Efficient Attention (PoP) backends: exact torch SDPA, exact "
    "region-masked attention, or linear Efficient Attention (approximate, O(N)). Returns a patched copy; the "
    "input model is unchanged, so bypassing this node restores the original attention.")
BACKEND_CHOICES = usable_backends()  # what this machine can run; a saved workflow's other choice is refused, with why

# (name, kind, options, tooltip); kind is the classic ComfyUI type name.
INPUTS = [
    ("backend", "COMBO", {"default": "auto", "options": BACKEND_CHOICES},
     "auto: the fastest exact backend for each call. sdpa: exact, torch scaled_dot_product_attention. masked: exact, "
     "takes every mask form without a full score matrix. linear: Efficient Attention (Shen et al. 2021), linear in "
     "tokens: much faster at high resolution but APPROXIMATE: it changes the output of models trained with softmax "
     "attention. *_triton: fused GPU kernels, where Triton and CUDA are available."),
    ("heads", "INT", {"default": 0, "min": 0, "max": 256, "step": 1},
     "0 = each layer's own head count. Otherwise q/k/v are split into this many heads; it must divide every "
     "patched layer's channels, or sampling stops with a 'Mismatch in tensor dimensions' error."),
    ("layernorm", "BOOLEAN", {"default": False},
     "QK layernorm: normalise q and k per head (no affine parameters) before attention. Changes the output; "
     "can tame attention in very long sequences."),
    ("apply_to", "COMBO", {"default": "both", "options": list(APPLY_TO)},
     "Which attention calls to patch. UNets (SD1.x, SDXL): self-attention = image to image, cross-attention = image "
     "to text. Joint-attention DiTs (Flux, SD3, HunyuanVideo, Qwen-Image) make one self-attention call over text "
     "and image tokens together: self-attention and both patch it, cross-attention patches nothing there."),
    ("min_tokens", "INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64},
     "Use the chosen backend only in calls with at least this many query tokens; smaller calls run exact (auto). "
     "E.g. 4096 applies linear only to the highest-resolution SD1.5 layers at 512px."),
    ("strength", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01},
     "For an approximate backend (linear): out = exact + strength * (approx - exact). 1.0 computes only the "
     "approximation; below 1 both run. Ignored by exact backends."),
    ("start_percent", "FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001},
     "Part of the denoising schedule where the patch is active: from here..."),
    ("end_percent", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001},
     "...to here. Outside it the model's own attention runs (e.g. linear only in the middle of sampling)."),
    ("mask_mode", "COMBO", {"default": "isolate regions", "options": list(MASK_MODES)},
     "Only with a mask. keys inside mask: every image token attends only to image tokens inside the mask. keys "
     "outside mask: only to those outside. isolate regions: tokens inside attend only inside, outside only outside "
     "(keeps two subjects from bleeding into each other). Attention to text is never masked."),
]
MASK_TOOLTIP = ("Optional region mask (white = inside), resized to each attention layer's token grid; it shapes "
                "image-to-image attention only. Batch 1 applies to every image; a larger batch is matched to the "
                "latent batch.")


def validate_backend(backend):
    """ComfyUI's input validation (before anything runs): True, or why ``backend`` cannot be used here. A workflow
    saved where another backend was available still loads; queueing it names the backend and the reason."""
    return backend_problem(backend) or True


def apply_efficient_attention(model, backend, heads, layernorm, apply_to, min_tokens, strength, start_percent,
                              end_percent, mask_mode, mask=None):
    """The node's function, shared by the classic and the V3 definitions: returns the patched clone."""
    settings = settings_for_model(
        model, start_percent=start_percent, end_percent=end_percent, backend=backend, heads=heads,
        layernorm=layernorm, apply_to=apply_to, min_tokens=min_tokens, strength=strength, mask=mask,
        mask_mode=mask_mode)
    return patch_model(model, settings)


class EfficientAttentionPoP:
    """Classic (V1) node definition, loaded by every ComfyUI version."""

    CATEGORY = CATEGORY
    DESCRIPTION = DESCRIPTION
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the patched attention (the input model is unchanged).",)
    FUNCTION = "patch"

    @classmethod
    def VALIDATE_INPUTS(cls, backend):
        return validate_backend(backend)

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": ("MODEL", {"tooltip": "The diffusion model to patch."})}
        for name, kind, options, tooltip in INPUTS:
            extra = {key: value for key, value in options.items() if key != "options"}
            extra["tooltip"] = tooltip
            required[name] = (options["options"], extra) if kind == "COMBO" else (kind, extra)
        return {"required": required, "optional": {"mask": ("MASK", {"tooltip": MASK_TOOLTIP})}}

    def patch(self, model, **choices):
        return (apply_efficient_attention(model, **choices),)


def define_v3_node():
    """The same node in the V3 schema, or None where this ComfyUI has no comfy_api.latest."""
    try:
        from comfy_api.latest import io
    except ImportError:
        return None
    kinds = {"COMBO": io.Combo, "INT": io.Int, "FLOAT": io.Float, "BOOLEAN": io.Boolean}

    def v3_input(name, kind, options, tooltip):
        if kind == "COMBO":
            return io.Combo.Input(name, options=options["options"], default=options["default"], tooltip=tooltip)
        return kinds[kind].Input(name, tooltip=tooltip, **options)

    class EfficientAttentionPoPV3(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="EfficientAttentionPoP", display_name="Efficient Attention (PoP)", category=CATEGORY, description=DESCRIPTION,
                inputs=[io.Model.Input("model", tooltip="The diffusion model to patch.")]
                + [v3_input(*spec) for spec in INPUTS]
                + [io.Mask.Input("mask", optional=True, tooltip=MASK_TOOLTIP)],
                outputs=[io.Model.Output(tooltip=EfficientAttentionPoP.OUTPUT_TOOLTIPS[0])],
            )

        @classmethod
        def validate_inputs(cls, backend):
            return validate_backend(backend)

        @classmethod
        def execute(cls, model, **choices) -> io.NodeOutput:
            return io.NodeOutput(apply_efficient_attention(model, **choices))

    return EfficientAttentionPoPV3
