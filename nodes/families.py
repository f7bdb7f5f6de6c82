"""What is this call: the model's family, what one model call tells its attention calls, and for one attention
call where its image tokens are, whether it is self- or cross-attention, and whether the mask applies to it.

Read from each family's model code in ComfyUI (see docs/model-families.md), every family rule beside FAMILIES.
Importing this needs no ComfyUI: families are recognised by the class names of the diffusion model's class
hierarchy, and every layout is checked against what the call and the model show.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Hashable, Optional, Tuple

import torch

from ..attention.layout import TokenLayout, find_token_layout, patch_grid
from .settings import PatchSettings


@dataclass(frozen=True)
class ModelFamily:
    """How one family's attention calls are laid out.

    patch_size: a DiT's latent cells per token, (frames, height, width) (None: a UNet, whose levels halve the
        latent); the model's own ``patch_size`` replaces this default when the node runs (model_family), unless
        ``own_patch_size`` is False: the model's attribute counts pixels its latent already packs into channels
        (Ideogram 4's 128-channel latent, one token per latent cell).
    others_first: where self-attention puts tokens other than the image grid (joint text, register tokens,
        reference frames): True before it [text, image, ...], False after it [image, text, ...]; None: none.
    references_after_image: with others first, reference-image tokens may follow the image (Flux Kontext,
        Qwen-Image Edit); their count comes from the model call's reference latents (``reference_keyword``) or
        from ComfyUI's ``reference_image_num_tokens``, never from what is left over.
    reference_keyword: the apply_model keyword holding reference latents (a list of latents, or one latent).
    references_before_image: those reference tokens sit just before the image instead (HunyuanVideo's ref_latent
        in ComfyUI that sets img_slice, where the image part is [reference, image]; OmniGen2 and Boogu's
        [text, references, image]).
    reference_stream: self-attention over [references, image] without the text also occurs (Boogu's double-stream
        image attention).
    text_before_image: the tokens before the image (less references before it) are exactly this model call's text
        (c_crossattn), padded up to ``text_padding_multiple`` where given (Z-Image): a count that differs means
        the layout is not what the pack knows, and it is not used.
    text_after_image: the image comes first, and the tokens after it are exactly this model call's reference tokens
        (``reference_keyword``) and then its text, nothing else (JoyImage [image, references, text], Lens).
    text_limit: the most text tokens the model lets into attention (PixelDiT cuts its text to ``txt_max_length``,
        read from the model when the node runs).
    image_padding_multiple: the image tokens are followed by padding up to a multiple of this (Z-Image); read
        from the model's ``pad_tokens_multiple`` when the node runs.
    cross_attention: separate cross-attention calls whose keys are text (or CLIP image, audio) tokens.
    text_self_attention: with cross_attention, the text also attends to itself alone first (Kandinsky 5's text
        blocks): a call whose queries and keys are exactly the text, and whose queries are not the image, is
        self-attention.
    keys_append_text: self-attention keys are [image tokens, text tokens] (Stable Cascade).
    context_keywords: apply_model keywords whose token count is the key count of a cross-attention call
        (besides c_crossattn), e.g. Wan's CLIP image features.
    fixed_context_tokens: key counts of cross-attention calls fixed by the architecture (HuMo's 16 audio
        tokens per frame).
    mask_unsupported: why a MASK cannot be placed on this family's tokens (None: it can).
    layout_changing_keywords: apply_model keywords that put tokens where this pack does not place them
        (the mask is then declined for that model call).
    known: False for a model class the pack knows nothing about (no class of its hierarchy is in FAMILIES).
    recognised_as: how the family was recognised, for the log (e.g. "SCAILWanModel, a subclass of WanModel").
    regional: why Regional Prompts (PoP) cannot serve this family in one pass (None: it can), see regional.py.
    leading_tokens: with others first, the tokens before the text (AuraFlow's register tokens), read from the model.
    text_positions_restart: the model's forward hands its text position ids to ``post_input`` patches, where
        regional.restart_text_positions gives each prompt the positions it has alone (Qwen-Image in 0.33).
    """

    name: str
    patch_size: Optional[Tuple[int, int, int]] = None
    own_patch_size: bool = True
    others_first: Optional[bool] = None
    references_after_image: bool = False
    reference_keyword: Optional[str] = None
    references_before_image: bool = False
    reference_stream: bool = False
    text_before_image: bool = False
    text_padding_multiple: Optional[int] = None
    text_after_image: bool = False
    text_limit: Optional[int] = None
    image_padding_multiple: Optional[int] = None
    cross_attention: bool = False
    text_self_attention: bool = False
    keys_append_text: bool = False
    context_keywords: Tuple[str, ...] = ()
    fixed_context_tokens: Tuple[int, ...] = ()
    mask_unsupported: Optional[str] = None
    layout_changing_keywords: Tuple[str, ...] = ()
    known: bool = True
    recognised_as: str = ""
    regional: Optional[str] = "its token layout is not yet verified for regional prompts in one pass"
    leading_tokens: int = 0  # with others first: tokens before the text (AuraFlow's registers), from the model
    text_positions_restart: bool = False  # rotary text positions restartable per prompt via post_input patches

    @property
    def is_unet(self) -> bool:
        return self.patch_size is None


def _dit(name, patch_size=2, temporal_patch=1, **layout):
    return ModelFamily(name, patch_size=(temporal_patch, patch_size, patch_size), **layout)


_WAN = dict(cross_attention=True, context_keywords=("clip_fea",))
_AUDIO = "its latent is audio, with no image grid to place a mask on"
_JOINT_TEXT_FIRST = dict(others_first=True, text_before_image=True)
_REFERENCES_AFTER = dict(references_after_image=True, reference_keyword="ref_latents")
_REFERENCES_BEFORE = dict(references_before_image=True, reference_keyword="ref_latents")
_TEXT_ROPE = ("rotary positions run over its text, so a prompt placed after another would sit at other positions "
              "than alone")
_TEXT_REFINER = "its token refiner averages the text of all prompts into one vector before any layer a mask reaches"

# Class name of a diffusion model, or of one of its base classes -> family, as each model's forward in ComfyUI
# lays out its tokens (0.3.64 and 0.33; see docs/model-families.md). A subclass inherits its base's knowledge; every
# layout is still checked against the call's token count, the latent, the model's patch size and the text.
FAMILIES: Dict[str, ModelFamily] = {
    "UNetModel": ModelFamily("UNet", cross_attention=True, regional=None),  # SD1.x, SD2.x, SDXL, SVD (+ temporal)
    "StageC": ModelFamily("Stable Cascade C", keys_append_text=True,
                          regional="its text comes as clip_text, which this pack does not read per model call"),
    "StageB": ModelFamily("Stable Cascade B", keys_append_text=True),
    "OpenAISignatureMMDITWrapper": _dit("SD3", **_JOINT_TEXT_FIRST, regional=None),
    "MMDiT": _dit("AuraFlow", others_first=True, regional=None),  # [register tokens, text, image]
    "Flux": _dit("Flux", **_JOINT_TEXT_FIRST, **_REFERENCES_AFTER, regional=None),  # Flux 2: patch 1, read from the model
    "Chroma": _dit("Chroma", **_JOINT_TEXT_FIRST, regional=None),
    "HunyuanVideo": _dit("HunyuanVideo", others_first=False, layout_changing_keywords=("ref_latent",),
                          regional=_TEXT_REFINER),
    "WanModel": _dit("Wan", **_WAN, regional=None),
    "WanModel_S2V": _dit("Wan S2V", **_WAN, regional="its reference and motion frames sit beside the video, "
                                                        "where this pack does not place them"),
    "HumoWanModel": _dit("Wan HuMo", others_first=False, fixed_context_tokens=(16,), **_WAN),  # [video, reference]
    "LTXVModel": _dit("LTXV", patch_size=1, cross_attention=True, regional=None),
    "QwenImageTransformer2DModel": _dit("Qwen-Image", **_JOINT_TEXT_FIRST, **_REFERENCES_AFTER, regional=_TEXT_ROPE,
                                        text_positions_restart=True),
    "MageFlowTransformer2DModel": _dit("MageFlow", patch_size=1, **_JOINT_TEXT_FIRST, **_REFERENCES_AFTER,
                                        regional=None),
    "NextDiT": _dit("Lumina 2", others_first=True, regional=_TEXT_ROPE),
    "HiDreamImageTransformer2DModel": _dit("HiDream", others_first=False,
                                           regional="its text comes in three streams (T5 and two Llama layers)"),
    "AsymmDiTJoint": _dit("Mochi", others_first=False, regional="it pools its text into the global modulation and "
                                                                  "crops it to the first prompt's token count"),
    "GeneralDIT": _dit("Cosmos", cross_attention=True, regional=None),
    "MiniTrainDIT": _dit("Cosmos Predict2", cross_attention=True, regional=None),
    "OmniGen2Transformer2DModel": _dit("OmniGen2", **_JOINT_TEXT_FIRST, **_REFERENCES_BEFORE, regional=_TEXT_ROPE),  # [text, refs, image]
    "AudioDiffusionTransformer": _dit("Stable Audio", patch_size=1, cross_attention=True, mask_unsupported=_AUDIO),
    "ACEStepTransformer2DModel": _dit("ACE-Step", patch_size=1, cross_attention=True, mask_unsupported=_AUDIO),
    "Hunyuan3Dv2": _dit("Hunyuan3D v2", patch_size=1, others_first=True,
                        mask_unsupported="its latent is a 3-D shape, with no image grid to place a mask on"),
    # ComfyUI 0.33 families (issue 24)
    "Kandinsky5": _dit("Kandinsky 5", cross_attention=True, text_self_attention=True, regional=None),  # text blocks; video self, cross
    # [text, video]; 1.5: patch_size_t 2
    "CogVideoXTransformer3DModel": _dit("CogVideoX", **_JOINT_TEXT_FIRST, regional=None),
    "JoyImageTransformer3DModel": _dit("JoyImage", others_first=False, text_after_image=True,
                                       reference_keyword="ref_latents", regional=None),  # [image, references, text]
    "LensTransformer2DModel": ModelFamily("Lens", patch_size=(1, 1, 1), own_patch_size=False, others_first=False,
                                          text_after_image=True, regional=_TEXT_ROPE),  # [image, text], a token a cell
    "PixDiT_T2I": _dit("PixelDiT", patch_size=16, **_JOINT_TEXT_FIRST,  # pixels: [text, image]; pixel blocks: image
                       regional="it gives its text learned positions and cuts it at its txt_max_length"),
    # [text, image, refs]; img_slice set
    "SingleStreamDiT": _dit("Krea 2", **_JOINT_TEXT_FIRST, **_REFERENCES_AFTER, regional=None),
    "Ideogram4Transformer2DModel": ModelFamily("Ideogram 4", patch_size=(1, 1, 1), own_patch_size=False,
                                               **_JOINT_TEXT_FIRST, regional=_TEXT_ROPE),  # [text, image]
    "BooguTransformer2DModel": _dit("Boogu", **_JOINT_TEXT_FIRST, **_REFERENCES_BEFORE, reference_stream=True,
                                    regional=_TEXT_ROPE),
}


def _patch_size_of(diffusion_model) -> Optional[Tuple[int, int, int]]:
    """The model's own latent cells per token (frames, height, width), from its ``patch_size`` (an int, beside
    CogVideoX 1.5's ``patch_size_t`` frames, or a list or tuple of 2 or 3), ``patch`` or
    ``patch_temporal``/``patch_spatial`` attributes; None where it says none."""
    spatial = getattr(diffusion_model, "patch_spatial", None)
    if isinstance(spatial, int):
        temporal = getattr(diffusion_model, "patch_temporal", 1)
        return (temporal if isinstance(temporal, int) else 1, spatial, spatial)
    for name in ("patch_size", "patch"):
        value = getattr(diffusion_model, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            temporal = getattr(diffusion_model, "patch_size_t", None)
            return (temporal if isinstance(temporal, int) and temporal > 0 else 1, value, value)
        if isinstance(value, (list, tuple)) and len(value) in (2, 3) and all(
                isinstance(v, int) and v > 0 for v in value):
            return tuple(value) if len(value) == 3 else (1, value[0], value[1])
    return None


def _code_constants(cls) -> set:
    """The string constants of the functions defined on ``cls`` (one level of nested code included)."""
    found = set()
    for value in vars(cls).values():
        code = getattr(value, "__code__", None)
        for const in (code.co_consts if code is not None else ()):
            if isinstance(const, str):
                found.add(const)
            elif hasattr(const, "co_consts"):
                found.update(c for c in const.co_consts if isinstance(c, str))
    return found


def model_family(diffusion_model) -> ModelFamily:
    """The family of a ComfyUI diffusion model, found through its class hierarchy (a subclass inherits its base's
    knowledge), with the model's own patch size and padding. An unknown model gets a family without layout
    knowledge: its calls run exact, a MASK is declined with a warning."""
    own = type(diffusion_model).__name__
    base, family = next(((cls, FAMILIES[cls.__name__]) for cls in type(diffusion_model).__mro__
                         if cls.__name__ in FAMILIES), (None, None))
    if family is None:
        if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
            return ModelFamily(own, cross_attention=True, recognised_as=f"{own}, a UNet (input/output blocks)")
        return ModelFamily(own, mask_unsupported=f"the token layout of {own} is not known to this pack", known=False,
                           recognised_as=f"{own}, a class this pack does not know")
    recognised = own if base is type(diffusion_model) else f"{own}, a subclass of {base.__name__}"
    family = replace(family, recognised_as=recognised)
    if not family.is_unet:
        patch = _patch_size_of(diffusion_model) if family.own_patch_size else None
        if patch is not None:
            family = replace(family, patch_size=patch)
        multiple = getattr(diffusion_model, "pad_tokens_multiple", None)
        if isinstance(multiple, int) and multiple > 1:  # Z-Image: caption and image each padded to a multiple
            family = replace(family, image_padding_multiple=multiple, text_padding_multiple=multiple,
                             text_before_image=True)
        limit = getattr(diffusion_model, "txt_max_length", None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:  # PixelDiT: text cut to this
            family = replace(family, text_limit=limit)
    registers = getattr(diffusion_model, "register_tokens", None)
    if isinstance(registers, torch.Tensor) and registers.ndim == 3:  # AuraFlow: [registers, text, image]
        family = replace(family, leading_tokens=registers.shape[1])
    if family.is_unet and getattr(diffusion_model, "use_temporal_resblocks", False):
        family = replace(family, regional="it is conditioned on an image, not on text prompts")  # SVD
    if base.__name__ == "Flux" and getattr(getattr(diffusion_model, "params", None), "txt_ids_dims", None):
        family = replace(family, regional=_TEXT_ROPE, text_positions_restart=True)  # Flux 2: positions along the text
    if family.text_positions_restart:  # one pass only where the forward has the post_input patch point
        post_input = "post_input" in _code_constants(base)
        family = replace(family, text_positions_restart=post_input, regional=None if post_input else
                         f"{family.regional} (this ComfyUI has no post_input patch point to restart them)")
    if base.__name__ == "HunyuanVideo" and "img_slice" in _code_constants(base):
        # the HunyuanVideo that sets img_slice (ComfyUI 0.14 and later) builds [text, reference latent, image]
        family = replace(family, others_first=True, references_before_image=True, reference_keyword="ref_latent",
                         layout_changing_keywords=())
    return family


# ---- one call of the diffusion model ----
@dataclass
class ModelCall:
    """What one call of the diffusion model tells its attention calls, decided once per model call.

    latent_shape: the latent the sampler passed, (B, C, H, W) or (B, C, T, H, W).
    context_tokens: token counts of the cross-attention key sequences (text, CLIP image features).
    text_tokens: the text's token count (c_crossattn), for joint-attention layouts.
    active: inside the node's schedule window.
    """

    latent_shape: Tuple[int, ...]
    context_tokens: frozenset
    text_tokens: Optional[int]
    active: bool = True
    reference_tokens: int = 0  # tokens of this call's reference latents (Flux Kontext, Qwen-Image Edit, ...)
    unplaceable: Optional[str] = None  # why a mask cannot be placed in this model call (e.g. a reference latent)
    reached: bool = False  # some attention call of this model call reached the override
    tied_calls: Dict[int, int] = field(default_factory=dict)  # calls per token count where self/cross tie
    served_calls: int = 0  # calls the node's approximation was asked for so far (the quality guard's layer index)
    device: str = "cpu"  # where this model call runs (a sampling run's state is per device)
    calls: int = 0  # attention calls the node served in this model call
    approximated: int = 0  # of those, calls an approximate backend ran

    def count(self, exact: bool) -> None:
        """One served attention call, run exact or by an approximation."""
        self.calls += 1
        self.approximated += 0 if exact else 1

    def next_served_call(self) -> int:
        self.served_calls += 1
        return self.served_calls - 1

    def tie_break(self, tokens: int) -> bool:
        """For calls whose query, key and text token counts are all equal: True for self-attention.

        Every family with separate cross-attention calls it after the self-attention of the same block
        (UNet attn1 then attn2; Wan, LTXV, Cosmos self then cross), so such calls alternate self, cross.
        """
        seen = self.tied_calls.get(tokens, 0)
        self.tied_calls[tokens] = seen + 1
        return seen % 2 == 0


def read_model_call(family: ModelFamily, settings: PatchSettings, latent: torch.Tensor, sigmas, context,
                    extra_conds: dict) -> ModelCall:
    """What every attention call of one model call reads: the only place a tensor becomes a number (the sigma, for
    the schedule window), so the per-call path neither synchronises the device nor breaks a compiled graph.

    latent: (B, C, [T,] H, W); context: c_crossattn (B, L, C) or None; extra_conds: apply_model's keywords."""
    active = settings.active_for(sigmas)
    text_tokens = context.shape[1] if isinstance(context, torch.Tensor) and context.ndim == 3 else None
    if text_tokens is not None and family.text_limit:
        text_tokens = min(text_tokens, family.text_limit)
    context_tokens = set(family.fixed_context_tokens) | ({text_tokens} if text_tokens is not None else set())
    for keyword in family.context_keywords:
        extra = extra_conds.get(keyword)
        if isinstance(extra, torch.Tensor) and extra.ndim >= 2:
            context_tokens.add(extra.shape[-2])
    changing = [keyword for keyword in family.layout_changing_keywords if extra_conds.get(keyword) is not None]
    unplaceable = f"with {changing[0]} its tokens are laid out in a way this pack cannot place" if changing else None
    return ModelCall(tuple(latent.shape), frozenset(context_tokens), text_tokens, active,
                     reference_tokens(family, extra_conds), unplaceable, device=str(latent.device))


def reference_tokens(family: ModelFamily, conds: dict) -> int:
    """Tokens of a model call's reference latents (``family.reference_keyword``), each cut like the image."""
    references = conds.get(family.reference_keyword) if family.reference_keyword else None
    if isinstance(references, torch.Tensor):
        references = [references]
    total = 0
    for latent in references or ():
        grid = patch_grid(tuple(latent.shape), family.patch_size) if isinstance(latent, torch.Tensor) else None
        total += grid.image_tokens if grid is not None else 0
    return total


# ---- one attention call ----
@dataclass(frozen=True)
class CallPlacement:
    """What one attention call is, from what it and its model call show.

    query, key: where the image tokens are among the queries and among the keys (None: not placed).
    self_attention: keys from the queries' own sequence (None: cannot be told, a model the pack does not know).
    problem: why the tokens could not be placed where they did not add up (None where nothing was wrong).
    exact_only: why no approximation may serve the call (None: one may).
    """

    query: Optional[TokenLayout]
    key: Optional[TokenLayout]
    self_attention: Optional[bool]
    problem: Optional[str] = None
    exact_only: Optional[str] = None


def place_call(family: ModelFamily, query_tokens: int, key_tokens: int, model_call: Optional[ModelCall],
               transformer_options: Optional[dict] = None, self_attention: Optional[bool] = None) -> CallPlacement:
    """Where this call's image tokens are, whether it is self-attention (``self_attention`` where the caller knows
    it: attn1/attn2 replace patches), and whether an approximation may serve it. Without a model call (the model
    called outside a sampler) nothing is placed."""
    query, key, problem = _layouts(family, query_tokens, key_tokens, model_call, transformer_options or {})
    is_self = self_attention
    if is_self is None:
        query_is_image = None if family.mask_unsupported or model_call is None else query is not None
        is_self = is_self_attention(family, query_tokens, key_tokens, model_call, query_is_image, key is not None)
    if not family.known:
        exact_only = f"{family.recognised_as}, whose token layout this pack cannot verify"
    else:  # what the model does where its tokens do not add up is not what the pack knows
        exact_only = f"{family.name} where {problem}" if is_self and problem else None
    return CallPlacement(query, key, is_self, problem, exact_only)


def _layouts(family: ModelFamily, query_tokens: int, key_tokens: int, model_call: Optional[ModelCall],
             options: dict) -> Tuple[Optional[TokenLayout], Optional[TokenLayout], Optional[str]]:
    """(query layout, key layout, problem) of one call."""
    if model_call is not None and model_call.unplaceable:
        return None, None, model_call.unplaceable
    key, problem = call_layout(family, key_tokens, model_call, options)
    query = key
    if query_tokens != key_tokens:
        query, query_problem = call_layout(family, query_tokens, model_call, options)
        problem = problem or query_problem
    if key is None and family.keys_append_text and query is not None and key_tokens > query_tokens:
        key, problem = replace(query, after=query.after + key_tokens - query_tokens), None  # Cascade: text after
    return query, key, problem


def is_self_attention(family: ModelFamily, query_tokens: int, key_tokens: int, model_call: Optional[ModelCall],
                      query_is_image: Optional[bool], keys_are_image: bool) -> Optional[bool]:
    """Self-attention (keys from the queries' own sequence) or cross-attention (keys from another one).

    Equal token counts alone do not decide it: at some sizes an image level has as many tokens as the text
    (SD1.5 at 448x704: 77), and unequal counts can be self-attention with merged queries (ToMe) or with text
    appended to the keys (Stable Cascade). ``query_is_image``: the queries are this call's image tokens (None:
    not known for this family); ``keys_are_image``: the keys are; ``model_call``: this model call's text lengths.
    None for a model the pack does not know.
    """
    if not family.known:
        return None  # what the arguments show cannot tell it for a model the pack does not know
    context = model_call.context_tokens if model_call is not None else frozenset()
    if query_tokens == key_tokens:
        if not (family.cross_attention and key_tokens in context):
            return True
        if query_is_image is False:  # keys as long as a context, queries not an image grid: the text alone
            # (Kandinsky 5's text blocks), else cross-attention (e.g. HuMo's per-frame audio attention)
            return family.text_self_attention and key_tokens == model_call.text_tokens
        return model_call.tie_break(key_tokens)
    if family.keys_append_text and key_tokens > query_tokens:
        return True
    if key_tokens in context:
        return False
    return keys_are_image  # fewer queries than image keys: merged queries (ToMe)


def _round_up(count: int, multiple: Optional[int]) -> int:
    return -(-count // multiple) * multiple if multiple else count


def call_layout(family: ModelFamily, tokens: int, model_call: Optional[ModelCall],
                transformer_options: Optional[dict] = None) -> Tuple[Optional[TokenLayout], Optional[str]]:
    """Where the image tokens of a ``tokens``-long self-attention sequence are: (layout, None), or (None, why not).

    UNets: the level's ``activations_shape`` (B, C, H, W) where ComfyUI provides it, else the halving of the latent
    that fits. DiTs: see _dit_layout. (None, None): the call has no image grid (text refiners, fewer tokens than the
    image); (None, reason): tokens do not add up.
    """
    if model_call is None or not family.known:
        return None, None
    options = transformer_options or {}
    if family.is_unet:
        activations = options.get("activations_shape")
        if activations is not None and len(activations) == 4:
            height, width = activations[-2:]
            return (TokenLayout(1, height, width) if height * width == tokens else None), None
        return find_token_layout(model_call.latent_shape, tokens), None
    grid = patch_grid(model_call.latent_shape, family.patch_size)
    if grid is None:
        return None, None
    padding = _round_up(grid.image_tokens, family.image_padding_multiple) - grid.image_tokens
    others = tokens - grid.image_tokens - padding
    if others < 0:
        return None, None
    if others == 0:
        return replace(grid, after=padding), None
    if tokens in _text_or_reference_counts(family, model_call):
        return None, None  # a text refiner's or a reference refiner's call: no image grid in it
    if family.others_first is False:
        return _image_first_layout(family, grid, tokens, others, padding, model_call, options)
    return _dit_layout(family, grid, tokens, others, padding, model_call, options)


def _text_or_reference_counts(family: ModelFamily, model_call: ModelCall) -> set:
    """Token counts of calls over this model call's text alone (padded where the family pads it) or its references
    alone: refiners, whose sequences hold no image grid."""
    counts = {model_call.reference_tokens} if model_call.reference_tokens else set()
    if model_call.text_tokens:
        counts |= {model_call.text_tokens, _round_up(model_call.text_tokens, family.text_padding_multiple)}
    return counts


def _image_first_layout(family: ModelFamily, grid: TokenLayout, tokens: int, others: int, padding: int,
                        model_call: ModelCall, options: dict) -> Tuple[Optional[TokenLayout], Optional[str]]:
    """[image, others]: with ``text_after_image`` the others must be this call's references and then its text."""
    text = model_call.text_tokens
    if family.text_after_image and text is not None:
        references = _references(model_call, options)
        if others != references + text:
            return None, (f"{_grid_words(family, grid, tokens, model_call)} leave {others} tokens after the image, "
                          f"where this call's {f'{references} reference and ' if references else ''}{text} text "
                          "tokens are expected")
    return replace(grid, after=others + padding), None


def _references(model_call: ModelCall, options: dict) -> int:
    """This call's reference tokens: ComfyUI's ``reference_image_num_tokens`` where set, else those counted from the
    model call's reference latents."""
    counted = options.get("reference_image_num_tokens")
    if isinstance(counted, (list, tuple)) and all(isinstance(c, int) for c in counted):
        return sum(counted)
    return model_call.reference_tokens


def _grid_words(family: ModelFamily, grid: TokenLayout, tokens: int, model_call: ModelCall) -> str:
    """The call and its grid, as the warnings name them."""
    return (f"{tokens} tokens with a {grid.frames}x{grid.height}x{grid.width} image grid (latent "
            f"{model_call.latent_shape}, patch {family.patch_size})")


def _dit_layout(family: ModelFamily, grid: TokenLayout, tokens: int, others: int, padding: int,
                model_call: ModelCall, options: dict) -> Tuple[Optional[TokenLayout], Optional[str]]:
    """A DiT sequence of the image grid, ``others`` tokens beside it and the image's ``padding``, where the family
    puts other tokens first: each count from evidence, the text of this model call (c_crossattn), reference latents
    (their own grids, or ComfyUI's ``reference_image_num_tokens``), padding rules, and ComfyUI's ``img_slice``."""
    where = _grid_words(family, grid, tokens, model_call)
    if family.others_first is None:
        return None, f"{where} leave {others} tokens that {family.name} does not put beside its image"
    references = _references(model_call, options)
    references_after = references if family.references_after_image else 0
    references_before = references if family.references_before_image else 0
    before = others - references_after
    text = model_call.text_tokens
    if family.text_before_image and text is not None:
        expected = _round_up(text, family.text_padding_multiple) if text or not family.text_padding_multiple \
            else family.text_padding_multiple  # Z-Image pads an empty caption to one multiple
        without_text = family.reference_stream and references_before and before == references_before
        if before != expected + references_before and not without_text:
            return None, (f"{where} leave {before} tokens before the image, where this call's text"
                          f"{' and references' if references_before else ''} are {expected + references_before}"
                          f"{f' and {references_after} reference tokens follow it' if references_after else ''}")
    if before < 0:
        return None, f"{where} cannot hold the {references_after} reference tokens of this call"
    image_slice = options.get("img_slice")
    if (isinstance(image_slice, (list, tuple)) and len(image_slice) == 2
            and all(isinstance(i, int) for i in image_slice) and image_slice[1] == tokens
            and image_slice[0] + references_before != before):
        return None, (f"ComfyUI's img_slice says the image part starts at token {image_slice[0]}, but {where} place "
                      f"it at {before - references_before}")
    return replace(grid, before=before, after=references_after + padding), None


# ---- the node's MASK on one call ----
@dataclass(frozen=True)
class MaskVerdict:
    """Whether the node's MASK applies to one self-attention call, on its ``query`` and ``key`` layouts, or not:
    ``warning`` (key, message) says why not (None: silently, where the call has no image grid to mask)."""

    query: Optional[TokenLayout] = None
    key: Optional[TokenLayout] = None
    warning: Optional[Tuple[Hashable, str]] = None

    @property
    def applies(self) -> bool:
        return self.key is not None


def mask_verdict(family: ModelFamily, placement: CallPlacement, model_call: Optional[ModelCall], query_tokens: int,
                 key_tokens: int, needs_query_places: bool, transformer_options: dict) -> MaskVerdict:
    """The mask's decline rules, in one place. ``needs_query_places``: the mask mode needs each query's place."""
    if family.mask_unsupported:
        return MaskVerdict()  # said once when the node ran
    if model_call is None:
        return MaskVerdict(warning=("no-latent", "the latent size is unknown in this call, so the mask is not "
                                    "applied (was the model called outside a ComfyUI sampler?)"))
    if model_call.unplaceable:
        return MaskVerdict(warning=(("unplaceable", model_call.unplaceable), f"the mask is not applied to "
                                    f"{family.name}: {model_call.unplaceable}"))
    if placement.key is None:
        if not placement.problem and (not family.is_unet or without_image_tokens(
                query_tokens, key_tokens, model_call, transformer_options)):
            return MaskVerdict()  # fewer tokens than the image (text refiners), or temporal attention: nothing to mask
        why = placement.problem or f"its {key_tokens} key tokens do not fit the latent {model_call.latent_shape}"
        return MaskVerdict(warning=(("layout", query_tokens, key_tokens), f"the mask is not applied to such "
                                    f"{family.name} attention calls: {why}"))
    if placement.query is None and needs_query_places:
        return MaskVerdict(warning=(("query-places", query_tokens), f"{query_tokens} of {key_tokens} query tokens in "
                                    "a self-attention call (merged, e.g. by ToMe): 'isolate regions' needs each "
                                    "query's place, so the mask is not applied to such calls"))
    return MaskVerdict(placement.query, placement.key)


def without_image_tokens(query_tokens: int, key_tokens: int, model_call: ModelCall, transformer_options: dict) -> bool:
    """A UNet self-attention call over no image tokens: across video frames (SVD's temporal attention, beside a
    level of another size), or the text alone."""
    activations = transformer_options.get("activations_shape")
    if activations is not None and len(activations) == 4 and query_tokens != activations[-2] * activations[-1]:
        return True
    return query_tokens == key_tokens == model_call.text_tokens
