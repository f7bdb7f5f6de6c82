"""Install the pack's attention on a clone of a ComfyUI model.

Two mechanisms, chosen by feature detection:
- today's ComfyUI (``comfy.ldm.modules.attention.wrap_attn`` exists): an
  ``optimized_attention_override`` in the clone's transformer_options. It sees every attention call of
  UNets and DiTs with the original function, and chains to an override installed before it.
- older ComfyUI: ``attn1``/``attn2`` replace patches on every transformer block of a UNet.

A model-function wrapper records, once per model call, the current sigma and the latent's shape in
transformer_options, so each attention call can tell whether it is inside the schedule window and
where its image tokens are. Everything ComfyUI is imported inside functions: importing this module
needs no ComfyUI.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional

import torch

from ..attention import BACKENDS, RegionMask, allows_everything, attention, explain
from ..attention.regions import MASK_MODES, find_token_layout, region_mask_for_layout

logger = logging.getLogger("efficient_attention_pop")

STATE_KEY = "efficient_attention_pop"  # transformer_options entry written by the model-function wrapper
APPLY_TO = ("both", "self-attention", "cross-attention")

# Joint-attention DiTs: class name of the diffusion model -> whether text tokens come before the image.
# (Read from each model's forward in ComfyUI: Flux/Chroma/SD3/Qwen-Image concatenate [text, image],
# HunyuanVideo [image, text].)
JOINT_TEXT_FIRST = {
    "Flux": True, "Chroma": True, "OpenAISignatureMMDITWrapper": True, "QwenImageTransformer2DModel": True,
    "HunyuanVideo": False,
}


@dataclass(frozen=True)
class ModelFamily:
    """What the patch needs to know about a diffusion model's token layout."""

    name: str
    is_unet: bool
    patch_size: Optional[int] = None  # spatial patch of a DiT
    text_first: Optional[bool] = None  # joint attention order; None: no joint attention


def model_family(diffusion_model) -> ModelFamily:
    name = type(diffusion_model).__name__
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
        return ModelFamily(name, is_unet=True)
    patch = getattr(diffusion_model, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[-1]
    return ModelFamily(name, False, patch if isinstance(patch, int) else None, JOINT_TEXT_FIRST.get(name))


@dataclass(frozen=True)
class PatchSettings:
    """The node's choices, translated."""

    backend: str = "auto"
    heads: int = 0
    layernorm: bool = False
    apply_to: str = "both"
    min_tokens: int = 0
    strength: float = 1.0
    sigma_start: float = float("inf")  # the patch is active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    mask: Optional[torch.Tensor] = None  # ComfyUI MASK, (B, H, W) or (H, W)
    mask_mode: str = "isolate regions"

    def __post_init__(self):
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"Unknown attention backend {self.backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
        if self.apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {self.apply_to!r}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"Unknown mask mode {self.mask_mode!r}; expected one of {MASK_MODES}")
        if self.mask is not None and (not isinstance(self.mask, torch.Tensor) or self.mask.ndim not in (2, 3)):
            shape = tuple(self.mask.shape) if isinstance(self.mask, torch.Tensor) else type(self.mask).__name__
            raise ValueError(f"Mask of shape {shape}: expected ComfyUI's [B, H, W] or [H, W] MASK")
        if self.heads < 0 or self.min_tokens < 0 or not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"heads and min_tokens must be >= 0 and strength in [0, 1]; got heads={self.heads}, "
                             f"min_tokens={self.min_tokens}, strength={self.strength}")


class AttentionPatch:
    """The attention the patched model runs: an override for today's ComfyUI, replace patches for older.

    One instance per patched model. ComfyUI deep-copies model_options on every clone; this object is
    immutable configuration plus caches, so copies share it.
    """

    def __init__(self, settings: PatchSettings, family: ModelFamily, previous_override: Optional[Callable] = None):
        self.settings = settings
        self.family = family
        self.previous_override = previous_override
        self._regions: Dict[tuple, object] = {}
        self._logged = set()

    def __deepcopy__(self, memo):
        return self

    # ---- decisions ----
    def active(self, transformer_options: dict) -> bool:
        """Inside the start/end window of the schedule (always, when no sigma is known)."""
        sigma = _current_sigma(transformer_options)
        return sigma is None or self.settings.sigma_end <= sigma <= self.settings.sigma_start

    def serves(self, is_self_attention: bool) -> bool:
        apply_to = self.settings.apply_to
        return apply_to == "both" or (apply_to == "self-attention") == is_self_attention

    # ---- the attention itself ----
    def run(self, q, k, v, heads: int, comfy_mask=None, *, is_self_attention: bool, transformer_options: dict,
            skip_reshape: bool = False, skip_output_reshape: bool = False, scale=None, enable_gqa: bool = False):
        """Our attention for one call, in ComfyUI's layout conventions."""
        settings = self.settings
        n_queries = q.shape[2] if skip_reshape else q.shape[1]
        backend = settings.backend if n_queries >= settings.min_tokens else "auto"
        masks = []
        if comfy_mask is not None and not allows_everything(comfy_mask):
            masks.append(comfy_mask)
        if settings.mask is not None and is_self_attention:
            region = self._region(n_queries, q.shape[0], q.device, transformer_options)
            if region is not None:
                masks.append(region)
        heads_used = settings.heads or heads
        regroup = heads_used != heads  # the user's own split of the same channels into heads
        if regroup and skip_reshape:
            q, k, v = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in (q, k, v))
        kwargs = dict(layernorm=settings.layernorm, scale=scale, enable_gqa=enable_gqa,
                      skip_reshape=skip_reshape and not regroup,
                      skip_output_reshape=skip_output_reshape and not regroup)
        out = attention(q, k, v, heads_used, masks or None, backend=backend, **kwargs)
        self._log_first_use(backend, q, k, v, heads_used, masks, kwargs)
        if backend != "auto" and not BACKENDS[backend].exact and settings.strength < 1.0:
            exact = attention(q, k, v, heads_used, masks or None, backend="auto", **kwargs)
            out = torch.lerp(exact, out, settings.strength)
        if regroup and skip_output_reshape:  # back to the caller's heads: (B, N, C) -> (B, H, N, C/H)
            b, n, c = out.shape
            out = out.view(b, n, heads, c // heads).transpose(1, 2)
        return out

    def _region(self, tokens: int, batch: int, device, transformer_options: dict):
        state = transformer_options.get(STATE_KEY) or {}
        latent_shape = state.get("latent_shape") or transformer_options.get("original_shape")
        if latent_shape is None:
            self._warn_once("no-latent", "Efficient Attention (PoP): the latent size is unknown in this call, so the "
                            "mask is not applied (was the model called outside a ComfyUI sampler?)")
            return None
        family = self.family
        layout = find_token_layout(latent_shape, tokens, family.patch_size, family.text_first, state.get("text_tokens"))
        if layout is None:
            self._warn_once(("layout", tokens), f"Efficient Attention (PoP): cannot place {tokens} tokens of a "
                            f"{family.name} attention call on the latent {tuple(latent_shape)}; the mask is not "
                            "applied to such calls")
            return None
        chunks = max(1, len(transformer_options.get("cond_or_uncond") or [0]))
        latent_batch = max(1, latent_shape[0] // chunks)
        key = (layout, batch, latent_batch, str(device))
        if key not in self._regions:
            region = region_mask_for_layout(self.settings.mask, self.settings.mask_mode, layout, batch, latent_batch)
            if region is not None:  # labels live on the compute device, once per layout
                region = RegionMask(region.query_labels.to(device), region.key_labels.to(device))
            self._regions[key] = region
        return self._regions[key]

    def _log_first_use(self, backend, q, k, v, heads, masks, kwargs):
        if backend in self._logged:
            return
        self._logged.add(backend)
        if backend == "auto":
            choice = explain(q, k, v, heads, masks or None, layernorm=kwargs["layernorm"],
                             skip_reshape=kwargs["skip_reshape"], enable_gqa=kwargs["enable_gqa"]).chosen
            logger.info("Efficient Attention (PoP): exact calls run on backend %s (auto)", choice)
        else:
            logger.info("Efficient Attention (PoP): running backend %s", backend)

    def _warn_once(self, key, message):
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message)

    # ---- today's ComfyUI: optimized_attention_override ----
    def override(self, func, *args, **kwargs):
        """Called by ComfyUI's wrap_attn as override(func, q, k, v, heads, [mask], **kwargs)."""
        q, k, v, heads = args[:4]
        comfy_mask = args[4] if len(args) > 4 else kwargs.get("mask")
        skip_reshape = kwargs.get("skip_reshape", False)
        transformer_options = kwargs.get("transformer_options") or {}
        token_axis = 2 if skip_reshape else 1
        is_self_attention = q.shape[token_axis] == k.shape[token_axis]
        if not (self.serves(is_self_attention) and self.active(transformer_options)):
            if self.previous_override is not None:
                return self.previous_override(func, *args, **kwargs)
            return func(*args, **kwargs)
        return self.run(q, k, v, heads, comfy_mask, is_self_attention=is_self_attention,
                        transformer_options=transformer_options, skip_reshape=skip_reshape,
                        skip_output_reshape=kwargs.get("skip_output_reshape", False), scale=kwargs.get("scale"),
                        enable_gqa=bool(kwargs.get("enable_gqa", False)))

    # ---- older ComfyUI: attn1 / attn2 replace patches ----
    def replace_patch(self, is_self_attention: bool) -> Callable:
        """A replace patch fn(q, k, v, extra_options) -> (B, N, heads*dim_head) for attn1 or attn2."""

        def patch(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            if not self.active(extra_options):
                from comfy.ldm.modules.attention import optimized_attention
                return optimized_attention(q, k, v, heads)
            return self.run(q, k, v, heads, is_self_attention=is_self_attention, transformer_options=extra_options)

        return patch

    # ---- model function wrapper: sigma and latent shape, once per model call ----
    def model_function_wrapper(self, previous: Optional[Callable]) -> Callable:
        def wrapper(apply_model, args):
            c = dict(args["c"])
            transformer_options = dict(c.get("transformer_options") or {})
            context = c.get("c_crossattn")
            transformer_options[STATE_KEY] = {
                "latent_shape": tuple(args["input"].shape),
                "text_tokens": context.shape[1] if isinstance(context, torch.Tensor) and context.ndim == 3 else None,
            }
            c["transformer_options"] = transformer_options
            args = dict(args, c=c)
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **c)

        return wrapper


def _current_sigma(transformer_options: dict) -> Optional[float]:
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        return None
    return float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) else float(sigmas[0])


def unet_transformer_blocks(diffusion_model):
    """(block_name, number, transformer_index) of every transformer block of a ComfyUI UNet."""
    from comfy.ldm.modules.attention import SpatialTransformer

    found = []
    for block_name, blocks in (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                               ("output", diffusion_model.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    found.extend((block_name, number, index) for index in range(len(layer.transformer_blocks)))
    return found


def patch_model(model, settings: PatchSettings):
    """Clone ``model`` (a ComfyUI ModelPatcher), install the attention on the clone and return it."""
    import comfy.ldm.modules.attention as comfy_attention

    patched = model.clone()
    diffusion_model = patched.model.diffusion_model
    family = model_family(diffusion_model)
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    if hasattr(comfy_attention, "wrap_attn"):
        mechanism = "optimized_attention_override"
        attention_patch = AttentionPatch(settings, family, transformer_options.get("optimized_attention_override"))
        transformer_options["optimized_attention_override"] = attention_patch.override
    elif family.is_unet:
        mechanism = "attn1/attn2 replace patches"
        attention_patch = AttentionPatch(settings, family)
        blocks = unet_transformer_blocks(diffusion_model)
        for block_name, number, index in blocks:
            if attention_patch.serves(True):
                patched.set_model_attn1_replace(attention_patch.replace_patch(True), block_name, number, index)
            if attention_patch.serves(False):
                patched.set_model_attn2_replace(attention_patch.replace_patch(False), block_name, number, index)
        mechanism += f" on {len(blocks)} transformer blocks"
    else:
        logger.warning("Efficient Attention (PoP): this ComfyUI has no attention override (added in 0.3.60) and %s is "
                       "not a UNet, so it cannot be patched; the model is returned unpatched. Update ComfyUI.",
                       family.name)
        return patched
    patched.set_model_unet_function_wrapper(
        attention_patch.model_function_wrapper(patched.model_options.get("model_function_wrapper")))
    if not family.is_unet and settings.apply_to == "cross-attention" and family.text_first is not None:
        logger.warning("Efficient Attention (PoP): %s uses joint attention (one self-attention call over text and "
                       "image tokens) and has no separate cross-attention; apply_to=cross-attention patches nothing",
                       family.name)
    logger.info("Efficient Attention (PoP): patched %s via %s; backend=%s (min_tokens=%d, other calls auto), "
                "heads=%s, layernorm=%s, apply_to=%s, strength=%.2f, sigma window [%.4g, %.4g], mask=%s",
                family.name, mechanism, settings.backend, settings.min_tokens, settings.heads or "model's",
                settings.layernorm, settings.apply_to, settings.strength, settings.sigma_end, settings.sigma_start,
                "none" if settings.mask is None else f"{tuple(settings.mask.shape)} {settings.mask_mode}")
    return patched


def settings_for_model(model, *, start_percent: float, end_percent: float, **choices) -> PatchSettings:
    """PatchSettings with the schedule window converted by the model's own model_sampling."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent and end_percent must satisfy 0 <= start <= end <= 1; got {start_percent}, "
                         f"{end_percent}")
    sampling = (model.get_model_object("model_sampling") if hasattr(model, "get_model_object")
                else model.model.model_sampling)  # ComfyUI before mid-2024
    sigma_start = float("inf") if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent))
    sigma_end = 0.0 if end_percent >= 1.0 else float(sampling.percent_to_sigma(end_percent))
    return replace(PatchSettings(**choices), sigma_start=sigma_start, sigma_end=sigma_end)
