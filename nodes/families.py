"""What the node knows about ComfyUI's model families: where an attention call's image tokens are, and
which calls are self- and which are cross-attention.

Read from each family's model code in ComfyUI (see README, "Model families"). Importing this needs no
ComfyUI: families are recognised by the class name of the diffusion model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

from ..attention.layout import TokenLayout, find_token_layout


@dataclass(frozen=True)
class ModelFamily:
    """How one family's attention calls are laid out.

    patch_size / temporal_patch: a DiT's latent cells per token (None: a UNet, whose levels halve the latent).
    others_first: where self-attention puts tokens other than the image grid (joint text, register tokens,
        reference frames): True before it [text, image, ...], False after it [image, text, ...]; None: none.
    references_after_image: with others first, tokens beyond the text and the image are reference images after
        the image (Flux Kontext, Qwen-Image Edit), so the text's own length (c_crossattn) says where the image
        starts; False: every token before the image is text-like (AuraFlow's register tokens too).
    cross_attention: separate cross-attention calls whose keys are text (or CLIP image, audio) tokens.
    keys_append_text: self-attention keys are [image tokens, text tokens] (Stable Cascade).
    context_keywords: apply_model keywords whose token count is the key count of a cross-attention call
        (besides c_crossattn), e.g. Wan's CLIP image features.
    fixed_context_tokens: key counts of cross-attention calls fixed by the architecture (HuMo's 16 audio
        tokens per frame).
    mask_unsupported: why a MASK cannot be placed on this family's tokens (None: it can).
    layout_changing_keywords: apply_model keywords that put tokens where this pack does not place them
        (the mask is then declined for that model call).
    """

    name: str
    patch_size: Optional[int] = None
    temporal_patch: int = 1
    others_first: Optional[bool] = None
    references_after_image: bool = False
    cross_attention: bool = False
    keys_append_text: bool = False
    context_keywords: Tuple[str, ...] = ()
    fixed_context_tokens: Tuple[int, ...] = ()
    mask_unsupported: Optional[str] = None
    layout_changing_keywords: Tuple[str, ...] = ()

    @property
    def is_unet(self) -> bool:
        return self.patch_size is None


def _dit(name, **layout):
    return ModelFamily(name, patch_size=layout.pop("patch_size", 2), **layout)


_WAN = dict(cross_attention=True, context_keywords=("clip_fea",))
_AUDIO = "its latent is audio, with no image grid to place a mask on"

# type(diffusion_model).__name__ -> family, as each model's forward in ComfyUI 0.3.64 lays out its tokens.
FAMILIES: Dict[str, ModelFamily] = {
    "UNetModel": ModelFamily("UNet", cross_attention=True),  # SD1.x, SD2.x, SDXL, SVD (+ temporal attention)
    "StageC": ModelFamily("Stable Cascade C", keys_append_text=True),
    "StageB": ModelFamily("Stable Cascade B", keys_append_text=True),
    "OpenAISignatureMMDITWrapper": _dit("SD3", others_first=True),
    "MMDiT": _dit("AuraFlow", others_first=True),  # [register tokens, text, image]
    "Flux": _dit("Flux", others_first=True, references_after_image=True),  # Kontext: reference tokens after
    "Chroma": _dit("Chroma", others_first=True, references_after_image=True),
    "ChromaRadiance": _dit("Chroma Radiance", patch_size=16, others_first=True, references_after_image=True),
    "HunyuanVideo": _dit("HunyuanVideo", others_first=False, layout_changing_keywords=("ref_latent",)),
    "WanModel": _dit("Wan", **_WAN),
    "VaceWanModel": _dit("Wan VACE", **_WAN),
    "CameraWanModel": _dit("Wan Camera", **_WAN),
    "HumoWanModel": _dit("Wan HuMo", others_first=False, fixed_context_tokens=(16,), **_WAN),  # [video, reference]
    "AnimateWanModel": _dit("Wan Animate", **_WAN),
    "LTXVModel": _dit("LTXV", patch_size=1, cross_attention=True),
    "QwenImageTransformer2DModel": _dit("Qwen-Image", others_first=True, references_after_image=True),
    "NextDiT": _dit("Lumina 2", others_first=True),
    "HiDreamImageTransformer2DModel": _dit("HiDream", others_first=False),
    "AsymmDiTJoint": _dit("Mochi", others_first=False),
    "GeneralDIT": _dit("Cosmos", cross_attention=True),
    "MiniTrainDIT": _dit("Cosmos Predict2", cross_attention=True),
    "OmniGen2Transformer2DModel": _dit("OmniGen2", others_first=True, layout_changing_keywords=("ref_latents",)),
    "AudioDiffusionTransformer": ModelFamily("Stable Audio", patch_size=1, cross_attention=True,
                                             mask_unsupported=_AUDIO),
    "ACEStepTransformer2DModel": ModelFamily("ACE-Step", patch_size=1, cross_attention=True, mask_unsupported=_AUDIO),
    "Hunyuan3Dv2": ModelFamily("Hunyuan3D v2", patch_size=1, others_first=True,
                               mask_unsupported="its latent is a 3-D shape, with no image grid to place a mask on"),
}


def model_family(diffusion_model) -> ModelFamily:
    """The family of a ComfyUI diffusion model; an unknown model gets a family without layout knowledge
    (its calls are served, a MASK is declined with a warning)."""
    name = type(diffusion_model).__name__
    if name in FAMILIES:
        return FAMILIES[name]
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
        return ModelFamily(name, cross_attention=True)  # a UNet variant
    return ModelFamily(name, mask_unsupported=f"the token layout of {name} is not known to this pack")


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
    unplaceable: Optional[str] = None  # why a mask cannot be placed in this model call (e.g. a reference latent)
    reached: bool = False  # some attention call of this model call reached the override
    tied_calls: Dict[int, int] = field(default_factory=dict)  # calls per token count where self/cross tie
    served_calls: int = 0  # calls the node's approximation was asked for so far (the quality guard's layer index)

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


def is_self_attention(family: ModelFamily, query_tokens: int, key_tokens: int, model_call: Optional[ModelCall],
                      query_is_image: Optional[bool], keys_are_image: bool) -> bool:
    """Self-attention (keys from the queries' own sequence) or cross-attention (keys from another one).

    Equal token counts alone do not decide it: at some sizes an image level has as many tokens as the text
    (SD1.5 at 448x704: 77), and unequal counts can be self-attention with merged queries (ToMe) or with text
    appended to the keys (Stable Cascade). ``query_is_image``: the queries are this call's image tokens (None:
    not known for this family); ``keys_are_image``: the keys are; ``model_call``: this model call's text lengths.
    """
    context = model_call.context_tokens if model_call is not None else frozenset()
    if query_tokens == key_tokens:
        if not (family.cross_attention and key_tokens in context):
            return True
        if query_is_image is False:
            return False  # keys as long as a context, queries not an image grid: e.g. HuMo's per-frame audio attention
        return model_call.tie_break(key_tokens)
    if family.keys_append_text and key_tokens > query_tokens:
        return True
    if key_tokens in context:
        return False
    return keys_are_image  # fewer queries than image keys: merged queries (ToMe)


def call_layout(family: ModelFamily, tokens: int, model_call: Optional[ModelCall],
                activations_shape: Optional[Sequence[int]] = None) -> Optional[TokenLayout]:
    """Where the image tokens of a ``tokens``-long self-attention sequence are, or None if not known.

    UNets: the level's ``activations_shape`` (B, C, H, W) where ComfyUI provides it, else the halving of
    the latent that fits. DiTs: the patch grid, with joint text before or after it.
    """
    if model_call is None:
        return None
    if family.is_unet and activations_shape is not None and len(activations_shape) == 4:
        height, width = activations_shape[-2:]
        return TokenLayout(1, height, width) if height * width == tokens else None
    text_tokens = model_call.text_tokens if family.others_first and family.references_after_image else None
    return find_token_layout(model_call.latent_shape, tokens, family.patch_size, family.others_first, text_tokens,
                             family.temporal_patch)


HEAD_COUNT_ATTRIBUTES = ("heads", "num_heads", "n_heads", "heads_num", "n_local_heads", "num_attention_heads")
HEAD_DIM_ATTRIBUTES = ("dim_head", "head_dim", "d_head", "dim_heads", "attention_head_dim")
QUERY_PROJECTIONS = {"to_q": 1, "q": 1, "q_proj": 1, "wq": 1, "query": 1, "qkv": 3, "to_qkv": 3, "qkv_proj": 3}


def attention_widths(diffusion_model) -> frozenset:
    """The q widths (heads * dim_head) of every attention module of a diffusion model that says them: an
    integer head count beside a head dim, or beside its query projection (a Linear, or a fused q/k/v one).
    Empty when none is found, so the node cannot check ``heads`` before sampling."""
    widths = set()
    for module in diffusion_model.modules():
        heads = next((getattr(module, name) for name in HEAD_COUNT_ATTRIBUTES
                      if isinstance(getattr(module, name, None), int)), None)
        if not heads or heads <= 0:
            continue
        dim = next((getattr(module, name) for name in HEAD_DIM_ATTRIBUTES
                    if isinstance(getattr(module, name, None), int)), None)
        if dim:
            widths.add(heads * dim)
            continue
        for name, parts in QUERY_PROJECTIONS.items():
            projection = getattr(module, name, None)
            out_features = getattr(projection, "out_features", None)
            if isinstance(out_features, int) and out_features % parts == 0:
                widths.add(out_features // parts)
                break
    return frozenset(widths)
