"""A zoo of tiny random-weight models of every ComfyUI model family whose attention goes through
`comfy.ldm.modules.attention.wrap_attn` (today's ComfyUI, 0.3.64), for integration tests.

Each `FamilyCase` builds a small instance from ComfyUI's OWN classes and configs
(`comfy.supported_models.<Config>(unet_config)` + `comfy.model_base.<Class>(config, device=cpu)`), with seeded
weights (`comfy_env.init_weights`), fp32, eval mode, wrapped in a `ModelPatcher`; `inputs()` gives one denoiser
call's inputs the way ComfyUI's sampler passes them (`x`, `sigma`, `conds` = apply_model keyword arguments, and
`cond_or_uncond`). `run_model` makes the call with transformer_options built like the sampler's;
`count_attention_calls` counts the calls that enter `wrap_attn` (with `sys.setprofile`, no monkeypatching).

CASES: families whose attention reaches `optimized_attention_override` (for some of them not every call does:
see CALLS_WITHOUT_OVERRIDE). UNREACHABLE: families whose attention goes through `wrap_attn` without
`transformer_options`, so an override is never consulted (Hunyuan-DiT, PixArt, Hunyuan3D 2.1, and Wan 2.2 S2V,
whose WanModel_S2V.forward_orig calls its blocks without transformer_options).

Left out: no family had to be left out; every attention-using model of `comfy/supported_models.py` (0.3.64) builds
and runs on CPU. Variants that call attention exactly like a case here are not repeated: SD2.1 unCLIP, SD x4
upscaler, Stable Zero123, SV3D, Lotus, instruct-pix2pix and inpaint models (the SD UNets), SSD-1B / Segmind Vega /
KOALA / SDXL refiner (SDXL UNet, other depths), Flux Schnell / Flux Fill (guidance_embed off / 96 input channels),
HunyuanVideo Skyreels I2V (32 input channels), HunyuanImage 2.1 refiner (3-D patch [1, 1, 1]), Cosmos v1 / Predict2
image-to-video (17 input channels), Wan 2.1 FLF2V and Fun Control (i2v blocks; FLF2V: 2 x 257 CLIP tokens), Wan 2.2 camera (t2v camera),
Hunyuan3D v2 mini (smaller depth), PixArt Alpha (PixArt Sigma's classes with micro-conditions).
Deviations from a plain build, each for CPU time only: Wan 2.2 Animate's face appearance CNN is replaced by a pooled
linear stand-in with the same output (see _PooledMotionEncoder); ACE-Step's lyric conformer and HuMo's audio
projection are seeded with uniform draws (_uniform_init). HunyuanVideo's ref_latent ("custom") path only works with
batch 1 in 0.3.64, so that case uses batch 1.
Attention never seen by wrap_attn (so not counted anywhere): VAEs (`vae_attention`), text encoders, Mochi's T5
AttentionPool (`torch.nn.functional.scaled_dot_product_attention`), ACE-Step's self-attention (ReLU linear
attention) and lyric conformer (own softmax).
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import comfy_env

CPU = torch.device("cpu")


@dataclass(frozen=True)
class FamilyCase:
    name: str
    build: Callable[[], "comfy.model_patcher.ModelPatcher"]  # noqa: F821
    inputs: Callable[[], dict]
    text_tokens: Optional[int] = None
    notes: str = ""


# --------------------------------------------------------------------------------------------------- helpers

def _comfy():
    return comfy_env.load_comfy()


# Fields that newer ComfyUI requires in a family's parameter dataclass, with the values that keep the 0.3.64 behaviour;
# given only where the loaded ComfyUI's dataclass has them (0.3.64 rejects them).
NEWER_REQUIRED_FIELDS = {
    "flux": ("comfy.ldm.flux.model", "FluxParams", dict(txt_ids_dims=[])),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams", dict(txt_ids_dims=[], vec_in_dim=None)),
    "chroma_radiance": ("comfy.ldm.chroma_radiance.model", "ChromaRadianceParams",
                        dict(txt_ids_dims=[], vec_in_dim=None, use_x0=False, use_sequential_txt_ids=False)),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams",
                      dict(use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)),
}


def fit_to_comfyui(unet_config: dict) -> dict:
    """A test config with the fields the loaded ComfyUI requires and 0.3.64 does not know (see NEWER_REQUIRED_FIELDS)."""
    import importlib

    config = dict(unet_config)
    module_name, class_name, fields = NEWER_REQUIRED_FIELDS.get(config.get("image_model"), (None, None, {}))
    if module_name:
        known = getattr(importlib.import_module(module_name), class_name).__dataclass_fields__
        config.update({name: value for name, value in fields.items() if name in known and name not in config})
    return config


def _config(config_name: str, unet_config: dict):
    comfy = _comfy()
    config = getattr(comfy.supported_models, config_name)(fit_to_comfyui(unet_config))
    # a config's unet_extra_config (a checkpoint's fixed sizes, e.g. Ideogram 4's 18 heads of 256) overrides what
    # detection found; a tiny instance keeps the sizes it gives
    config.unet_config.update({k: v for k, v in unet_config.items() if k in type(config).unet_extra_config})
    config.set_inference_dtype(torch.float32, None)  # what comfy.sd does when it loads a checkpoint
    return config


def _model_type(name: str):
    return getattr(_comfy().model_base.ModelType, name)


def _uniform_init(module: torch.nn.Module, seed: int) -> None:
    """comfy_env.init_weights' scheme (unit-variance matrices, norm weights 1, small vectors) with uniform draws:
    ~4x faster, for the few large sub-networks that do not feed attention shapes (ACE-Step's lyric conformer, 83M
    parameters; HuMo's audio projection, 39M)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                bound = math.sqrt(3.0 / param[0].numel())
                param.uniform_(-bound, bound, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.uniform_(-0.035, 0.035, generator=gen)


def _seed_weights(diffusion_model: torch.nn.Module, seed: int, uniform_children=()) -> None:
    if not uniform_children:
        comfy_env.init_weights(diffusion_model, seed)
        return
    for index, (name, child) in enumerate(diffusion_model.named_children()):
        if name in uniform_children:
            _uniform_init(child, seed * 1000 + index)
        else:
            comfy_env.init_weights(child, seed * 1000 + index)
    own = [p for n, p in diffusion_model.named_parameters(recurse=False)]
    if own:
        holder = torch.nn.ParameterList(own)
        comfy_env.init_weights(holder, seed)


def _builder(config_name: str, unet_config: dict, model_class: str, seed: int, *, model_type: Optional[str] = None,
             scale: float = 1.0, model_kwargs=None, pre: Optional[Callable] = None, post: Optional[Callable] = None,
             uniform_children=()):
    """A `build()` for one family: config -> model_base class -> seeded weights -> ModelPatcher.

    `scale` multiplies every matrix after seeding (for a family whose activations would blow up), `pre` edits the
    model before the weights are seeded, `post` after (buffers a checkpoint would fill), `uniform_children` names
    large children of the diffusion model seeded with the faster `_uniform_init`."""
    def build():
        comfy = _comfy()
        config = _config(config_name, unet_config)
        kwargs = dict(model_kwargs() if callable(model_kwargs) else (model_kwargs or {}))
        if model_type is not None:
            kwargs["model_type"] = _model_type(model_type)
        model = getattr(comfy.model_base, model_class)(config, device=CPU, **kwargs)
        if pre is not None:
            pre(model)
        _seed_weights(model.diffusion_model, seed, uniform_children)
        if scale != 1.0:
            with torch.no_grad():
                for p in model.diffusion_model.parameters():
                    if p.ndim >= 2:
                        p.mul_(scale)
        if post is not None:
            with torch.no_grad():
                post(model)
        model.eval()
        return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    return build


@functools.lru_cache(maxsize=None)
def _mid_sigma(config_name: str, unet_items: tuple, model_type: str, percent: float = 0.5) -> float:
    """The sigma a sampler uses half-way through (model_sampling.percent_to_sigma), without building weights."""
    comfy = _comfy()
    config = _config(config_name, dict(unet_items))
    sampling = comfy.model_base.model_sampling(config, _model_type(model_type))
    return float(sampling.percent_to_sigma(percent))


def _sigma(config_name, unet_config, model_type, batch):
    items = tuple(sorted((k, _freeze(v)) for k, v in unet_config.items()))
    return torch.full((batch,), _mid_sigma(config_name, items, model_type))


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _inputs(x, sigma, cond_or_uncond=None, **conds):
    if cond_or_uncond is None:
        cond_or_uncond = [0, 1][: x.shape[0]] if x.shape[0] <= 2 else [0] * x.shape[0]
    return {"x": x, "sigma": sigma, "conds": conds, "cond_or_uncond": cond_or_uncond}


# --------------------------------------------------------------------------------------------------- UNets

_UNET_COMMON = dict(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
                    use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)

SD15_UNET = dict(_UNET_COMMON, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                 context_dim=32, use_linear_in_transformer=False, adm_in_channels=None)
SD2_UNET = dict(SD15_UNET, use_linear_in_transformer=True)  # SD20 config: 64-channel heads, fp32 attention
SDXL_UNET = dict(_UNET_COMMON, model_channels=64, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
                 transformer_depth=[0, 1, 2], transformer_depth_output=[0, 0, 1, 1, 2, 2], transformer_depth_middle=2,
                 context_dim=32, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")
SVD_UNET = dict(_UNET_COMMON, in_channels=8, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                context_dim=32, use_linear_in_transformer=True, adm_in_channels=768, num_classes="sequential",
                extra_ff_mix_layer=True, use_spatial_context=True, merge_strategy="learned_with_images",
                merge_factor=0.0, video_kernel_size=[3, 1, 1], use_temporal_resblock=True,
                use_temporal_attention=True, disable_temporal_crossattention=False)
SD_TEXT = 7


def _sd15_inputs():
    g = _gen(101)
    return _inputs(_randn(g, 2, 4, 16, 16), _sigma("SD15", SD15_UNET, "EPS", 2),
                   c_crossattn=_randn(g, 2, SD_TEXT, 32))


def _sd2_inputs():
    g = _gen(102)
    return _inputs(_randn(g, 2, 4, 16, 16), _sigma("SD20", SD2_UNET, "V_PREDICTION", 2),
                   c_crossattn=_randn(g, 2, SD_TEXT, 32))


def _sdxl_inputs():
    g = _gen(103)
    return _inputs(_randn(g, 2, 4, 16, 16), _sigma("SDXL", SDXL_UNET, "EPS", 2),
                   c_crossattn=_randn(g, 2, SD_TEXT, 32), y=_randn(g, 2, 2816))


SVD_FRAMES = 3


def _svd_inputs():
    # ComfyUI passes SVD latents frame-batched: (batch * frames, C, H, W) with num_video_frames = frames; the
    # conditioning (CLIP vision embedding as a 1-token context, adm vector, concat latent) repeated per frame.
    g = _gen(104)
    n = SVD_FRAMES
    return _inputs(_randn(g, n, 4, 8, 8), _sigma("SVD_img2vid", SVD_UNET, "V_PREDICTION_EDM", n),
                   cond_or_uncond=[0],
                   c_crossattn=_randn(g, 1, 1, 32).repeat(n, 1, 1), y=_randn(g, 1, 768).repeat(n, 1),
                   c_concat=_randn(g, 1, 4, 8, 8).repeat(n, 1, 1, 1), num_video_frames=n)


# --------------------------------------------------------------------------------------------------- Stable Cascade

CASCADE_C = dict(stable_cascade_stage="c", c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=64, c_hidden=[64, 64],
                 nhead=[2, 2], blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
                 c_clip_text=32, c_clip_text_pooled=32, c_clip_img=32, c_clip_seq=4)
CASCADE_B = dict(stable_cascade_stage="b", c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=64,
                 c_hidden=[32, 32, 64, 64], nhead=[-1, -1, 2, 2], blocks=[[1, 1, 1, 1], [1, 1, 1, 1]],
                 block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]], level_config=["CT", "CT", "CTA", "CTA"], c_clip=32,
                 c_clip_seq=4, c_effnet=16, c_pixels=3)
CASCADE_TEXT = 6


def _cascade_c_inputs():
    g = _gen(105)
    return _inputs(_randn(g, 2, 16, 8, 8), _sigma("Stable_Cascade_C", CASCADE_C, "STABLE_CASCADE", 2),
                   clip_text=_randn(g, 2, CASCADE_TEXT, 32), clip_text_pooled=_randn(g, 2, 1, 32),
                   clip_img=_randn(g, 2, 1, 32), sca=torch.zeros(2), crp=torch.zeros(2))


def _cascade_b_inputs():
    g = _gen(106)
    return _inputs(_randn(g, 2, 4, 32, 32), _sigma("Stable_Cascade_B", CASCADE_B, "STABLE_CASCADE", 2),
                   clip=_randn(g, 2, 1, 32), effnet=_randn(g, 2, 16, 3, 3), sca=torch.zeros(2))


# --------------------------------------------------------------------------------------------------- MMDiT / AuraFlow

SD3_MMDIT = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, num_blocks=2, input_size=None,
                 adm_in_channels=32, pos_embed_scaling_factor=None, pos_embed_max_size=8, num_patches=64,
                 context_embedder_config={"target": "torch.nn.Linear",
                                          "params": {"in_features": 32, "out_features": 128}},
                 x_block_self_attn_layers=[])
SD35M_MMDIT = dict(SD3_MMDIT, qk_norm="rms", x_block_self_attn_layers=[0])
SD3_TEXT = 10


def _fill_pos_embed(model):
    # MMDiT's pos_embed is a torch.empty buffer that ComfyUI fills from the checkpoint
    pe = model.diffusion_model.pos_embed
    pe.copy_(torch.randn(pe.shape, generator=_gen(7)) * 0.1)


def _sd3_inputs(config=SD3_MMDIT, seed=107):
    g = _gen(seed)
    return _inputs(_randn(g, 2, 16, 16, 16), _sigma("SD3", config, "FLOW", 2),
                   c_crossattn=_randn(g, 2, SD3_TEXT, 32), y=_randn(g, 2, 32))


AURA = dict(in_channels=4, out_channels=4, patch_size=2, dim=128, n_layers=2, n_double_layers=1, n_heads=2,
            global_conddim=128, cond_seq_dim=32, max_seq=64)
AURA_TEXT = 8


def _aura_inputs():
    g = _gen(108)
    return _inputs(_randn(g, 2, 4, 16, 16), _sigma("AuraFlow", AURA, "FLOW", 2),
                   c_crossattn=_randn(g, 2, AURA_TEXT, 32))


# --------------------------------------------------------------------------------------------------- Flux family

FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=128,
            mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 28, 28], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True)
FLUX_TEXT = 8


def _flux_inputs(kontext=False):
    g = _gen(109)
    conds = dict(c_crossattn=_randn(g, 2, FLUX_TEXT, 32), y=_randn(g, 2, 32), guidance=torch.full((2,), 3.5))
    if kontext:
        # ReferenceLatent / FluxKontextImageScale: a reference latent of another size, repeated to the batch
        conds["ref_latents"] = [_randn(g, 1, 16, 12, 16).repeat(2, 1, 1, 1)]
    return _inputs(_randn(g, 2, 16, 16, 16), _sigma("Flux", FLUX, "FLUX", 2), **conds)


CHROMA = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=128,
              mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 28, 28], theta=10000,
              patch_size=2, qkv_bias=True, in_dim=64, out_dim=128, hidden_dim=64, n_layers=1)
CHROMA_RADIANCE = dict(CHROMA, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16,
                       nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=0,
                       nerf_final_head_type="linear", nerf_embedder_dtype=torch.float32)


def _chroma_inputs(radiance=False):
    g = _gen(110)
    if radiance:
        x = _randn(g, 2, 3, 64, 64)  # pixel space, 16x16 patches
        sigma = _sigma("ChromaRadiance", CHROMA_RADIANCE, "FLUX", 2)
    else:
        x = _randn(g, 2, 16, 16, 16)
        sigma = _sigma("Chroma", CHROMA, "FLUX", 2)
    return _inputs(x, sigma, c_crossattn=_randn(g, 2, FLUX_TEXT, 32), guidance=torch.zeros(2))


# --------------------------------------------------------------------------------------------------- Hunyuan

HUNYUAN_VIDEO = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                     hidden_size=128, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
                     axes_dim=[16, 24, 24], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
                     byt5=False, meanflow=False)
HUNYUAN_VIDEO_I2V = dict(HUNYUAN_VIDEO, in_channels=33)
HUNYUAN_IMAGE21 = dict(HUNYUAN_VIDEO, in_channels=64, out_channels=64, vec_in_dim=None, patch_size=[1, 1],
                       axes_dim=[32, 32], byt5=True, guidance_embed=False)
HV_TEXT = 8
HI_BYT5 = 4


def _hunyuan_video_inputs(variant="t2v"):
    g = _gen(111)
    cfg = {"t2v": HUNYUAN_VIDEO, "i2v": HUNYUAN_VIDEO_I2V, "custom": HUNYUAN_VIDEO}[variant]
    # "custom" forces batch 1: HunyuanVideo.forward_orig writes into the expanded (einops.repeat) ids of ref_latent,
    # which raises "more than one element of the written-to tensor refers to a single memory location" for batch > 1
    b = 1 if variant == "custom" else 2
    conds = dict(c_crossattn=_randn(g, b, HV_TEXT, 32), y=_randn(g, b, 32), guidance=torch.full((b,), 6.0))
    if variant == "i2v":  # HunyuanImageToVideo "v1 (concat)": concat image latent + inverted mask
        conds["c_concat"] = _randn(g, b, 17, 3, 8, 8)
    if variant == "custom":  # HunyuanImageToVideo "custom": a reference latent whose tokens precede the video's
        conds["ref_latent"] = _randn(g, b, 16, 1, 8, 8)
    return _inputs(_randn(g, b, 16, 3, 8, 8), _sigma("HunyuanVideo", cfg, "FLOW", b), **conds)


def _hunyuan_image_inputs():
    g = _gen(112)
    return _inputs(_randn(g, 2, 64, 8, 8), _sigma("HunyuanImage21", HUNYUAN_IMAGE21, "FLOW", 2),
                   c_crossattn=_randn(g, 2, HV_TEXT, 32), txt_byt5=_randn(g, 2, HI_BYT5, 1472),
                   guidance=torch.full((2,), 6.0))


# --------------------------------------------------------------------------------------------------- Wan

WAN_T2V = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=128,
               ffn_dim=256, freq_dim=256, text_dim=32, out_dim=16, num_heads=2, num_layers=1, window_size=(-1, -1),
               qk_norm=True, cross_attn_norm=True, eps=1e-6)
WAN_I2V = dict(WAN_T2V, model_type="i2v", in_dim=36)
WAN22_TI2V = dict(WAN_T2V, in_dim=48, out_dim=48)
WAN_VACE = dict(WAN_T2V, model_type="vace", num_layers=2, vace_layers=1, vace_in_dim=96)
WAN_CAMERA = dict(WAN_T2V, model_type="camera", in_dim=32, in_dim_control_adapter=24)
WAN_HUMO = dict(WAN_T2V, model_type="humo")
WAN_ANIMATE = dict(WAN_T2V, model_type="animate", in_dim=36, num_layers=5)
WAN_S2V = dict(WAN_T2V, model_type="s2v", audio_dim=32, num_audio_token=4, cond_dim=16, audio_inject_layers=[0],
               enable_adain=True, adain_mode="attn_norm", framepack_drop_mode="padd")
WAN_TEXT = 8
WAN_CLIP_TOKENS = 9  # CLIP vision penultimate hidden states (257 for a 224 px ViT-H image)
WAN_FRAMES = 3


def _wan_x(g, channels=16, frames=WAN_FRAMES, h=8, w=8, batch=2):
    return _randn(g, batch, channels, frames, h, w)


def _wan_t2v_inputs():
    g = _gen(113)
    return _inputs(_wan_x(g), _sigma("WAN21_T2V", WAN_T2V, "FLOW", 2), c_crossattn=_randn(g, 2, WAN_TEXT, 32))


def _wan_i2v_inputs():
    g = _gen(114)
    return _inputs(_wan_x(g), _sigma("WAN21_I2V", WAN_I2V, "FLOW", 2), c_crossattn=_randn(g, 2, WAN_TEXT, 32),
                   c_concat=_randn(g, 2, 20, WAN_FRAMES, 8, 8), clip_fea=_randn(g, 2, WAN_CLIP_TOKENS, 1280))


def _wan22_ti2v_inputs():
    # Wan22ImageToVideoLatent: the first latent frame is the image (denoise_mask 0 there), so WAN22.process_timestep
    # gives one timestep per latent frame
    g = _gen(115)
    mask = torch.ones(2, 1, WAN_FRAMES, 8, 8)
    mask[:, :, 0] = 0.0
    return _inputs(_wan_x(g, 48), _sigma("WAN22_T2V", WAN22_TI2V, "FLOW", 2),
                   c_crossattn=_randn(g, 2, WAN_TEXT, 32), denoise_mask=mask)


def _wan_vace_inputs():
    g = _gen(116)
    return _inputs(_wan_x(g), _sigma("WAN21_Vace", WAN_VACE, "FLOW", 2), c_crossattn=_randn(g, 2, WAN_TEXT, 32),
                   vace_context=_randn(g, 2, 1, 96, WAN_FRAMES, 8, 8), vace_strength=[1.0])


def _wan_camera_inputs():
    g = _gen(117)
    return _inputs(_wan_x(g), _sigma("WAN21_Camera", WAN_CAMERA, "FLOW", 2), c_crossattn=_randn(g, 2, WAN_TEXT, 32),
                   c_concat=_randn(g, 2, 16, WAN_FRAMES, 8, 8), clip_fea=_randn(g, 2, WAN_CLIP_TOKENS, 1280),
                   camera_conditions=_randn(g, 2, 24, WAN_FRAMES, 64, 64))


def _wan_humo_inputs():
    # HuMo 1.7B style: reference image latent frame appended after the video tokens, audio (whisper features,
    # 8-frame windows x 5 layers x 1280) projected to 16 tokens per latent frame
    g = _gen(118)
    return _inputs(_wan_x(g), _sigma("WAN21_HuMo", WAN_HUMO, "FLOW", 2), c_crossattn=_randn(g, 2, WAN_TEXT, 32),
                   reference_latent=_randn(g, 2, 16, 1, 8, 8), audio_embed=_randn(g, 2, WAN_FRAMES, 8, 5, 1280))


def _wan_animate_inputs():
    g = _gen(119)
    return _inputs(_wan_x(g, frames=2), _sigma("WAN22_Animate", WAN_ANIMATE, "FLOW", 2),
                   c_crossattn=_randn(g, 2, WAN_TEXT, 32), c_concat=_randn(g, 2, 20, 2, 8, 8),
                   clip_fea=_randn(g, 2, WAN_CLIP_TOKENS, 1280), pose_latents=_randn(g, 2, 16, 1, 8, 8),
                   face_pixel_values=_randn(g, 2, 3, 1, 512, 512).clamp(-1, 1))


class _PooledMotionEncoder(torch.nn.Module):
    """Stand-in for Wan Animate's face appearance CNN (`motion_encoder.enc`: a StyleGAN-style encoder, ~10 GFLOP
    per 512 px face frame, ~20 s per forward here): same output, (frames, motion_dim), from pooled pixels. The
    rest of the motion encoder (`dec.direction`), the face encoder and the face attention blocks are ComfyUI's."""

    def __init__(self, motion_dim=20):
        super().__init__()
        self.proj = torch.nn.Linear(3, motion_dim)

    def encode_motion(self, x):
        return self.proj(x.mean(dim=(2, 3)))


def _animate_light_motion_encoder(model):
    encoder = model.diffusion_model.motion_encoder
    encoder.enc = _PooledMotionEncoder(encoder.dec.direction.motion_dim)


def _wan_s2v_inputs():
    g = _gen(120)
    return _inputs(_wan_x(g), _sigma("WAN22_S2V", WAN_S2V, "FLOW", 2), c_crossattn=_randn(g, 2, WAN_TEXT, 32),
                   audio_embed=_randn(g, 2, 25, 32, WAN_FRAMES * 4), reference_latent=_randn(g, 2, 16, 1, 8, 8),
                   reference_motion=_randn(g, 2, 16, 19, 8, 8))


def _s2v_weights(model):
    # CausalAudioEncoder.weights (1, 25, 1, 1) is a layer-mixing parameter: keep it positive-ish
    w = model.diffusion_model.casual_audio_encoder.weights
    w.copy_(torch.ones_like(w))


# --------------------------------------------------------------------------------------------------- other DiTs

LTXV = dict(image_model="ltxv", in_channels=128, cross_attention_dim=128, attention_head_dim=64,
            num_attention_heads=2, caption_channels=32, num_layers=1)
LTXV_TEXT = 8
LTXV_VALID = 5


def _ltxv_inputs():
    # the T5 tokenizer pads to 128 tokens: LTXV always gets the text attention mask (1 = token, 0 = padding)
    g = _gen(121)
    mask = torch.zeros(2, LTXV_TEXT, dtype=torch.long)
    mask[:, :LTXV_VALID] = 1
    return _inputs(_randn(g, 2, 128, 2, 4, 4), _sigma("LTXV", LTXV, "FLUX", 2),
                   c_crossattn=_randn(g, 2, LTXV_TEXT, 32), attention_mask=mask, frame_rate=25)


QWEN = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=1,
            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 28, 28))
QWEN_TEXT = 8


def _qwen_inputs(edit=False):
    g = _gen(122)
    conds = dict(c_crossattn=_randn(g, 2, QWEN_TEXT, 32))
    if edit:  # TextEncodeQwenImageEdit: reference latent(s), appended after the image tokens
        conds["ref_latents"] = [_randn(g, 2, 16, 1, 12, 16)]
    return _inputs(_randn(g, 2, 16, 1, 16, 16), _sigma("QwenImage", QWEN, "FLUX", 2), **conds)


LUMINA2 = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=128, n_layers=1, n_refiner_layers=1,
               n_heads=2, n_kv_heads=1, multiple_of=16, qk_norm=True, cap_feat_dim=32, axes_dims=[16, 24, 24],
               axes_lens=[300, 512, 512])
LUMINA_TEXT = 8


def _lumina_inputs():
    g = _gen(123)
    return _inputs(_randn(g, 2, 16, 16, 16), _sigma("Lumina2", LUMINA2, "FLOW", 2),
                   c_crossattn=_randn(g, 2, LUMINA_TEXT, 32), num_tokens=LUMINA_TEXT)


HIDREAM = dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
               num_single_layers=1, attention_head_dim=32, num_attention_heads=2, caption_channels=[32, 32],
               text_emb_dim=32, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=[16, 8, 8],
               max_resolution=[16, 16], llama_layers=[0, 1])
HIDREAM_T5 = 6
HIDREAM_LLAMA = 5


def _hidream_inputs():
    g = _gen(124)
    return _inputs(_randn(g, 2, 16, 16, 16), _sigma("HiDream", HIDREAM, "FLOW", 2),
                   c_crossattn=_randn(g, 2, HIDREAM_T5, 32), y=_randn(g, 2, 32),
                   encoder_hidden_states_llama3=_randn(g, 2, 2, HIDREAM_LLAMA, 32))


MOCHI = dict(image_model="mochi_preview", depth=2, patch_size=2, num_heads=2, hidden_size_x=128, hidden_size_y=64,
             mlp_ratio_x=96.0, mlp_ratio_y=2.0, learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False,
             out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True,
             timestep_mlp_bias=True, attend_to_padding=False, timestep_scale=1000.0, use_t5=True, t5_feat_dim=32,
             t5_token_length=8, rope_theta=10000.0)
MOCHI_TEXT = 8
MOCHI_VALID = 5


def _mochi_inputs():
    # T5 padded to 256 tokens: attention_mask always, num_tokens = the valid ones (the joint attention crops to them)
    g = _gen(125)
    mask = torch.zeros(2, MOCHI_TEXT, dtype=torch.long)
    mask[:, :MOCHI_VALID] = 1
    return _inputs(_randn(g, 2, 12, 2, 8, 8), _sigma("GenmoMochi", MOCHI, "FLOW", 2),
                   c_crossattn=_randn(g, 2, MOCHI_TEXT, 32), attention_mask=mask, num_tokens=MOCHI_VALID)


COSMOS1 = dict(image_model="cosmos", max_img_h=32, max_img_w=32, max_frames=8, in_channels=16, out_channels=16,
               patch_spatial=2, patch_temporal=1, model_channels=128, block_config="FA-CA-MLP",
               concat_padding_mask=True, pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop",
               block_x_format="THWBD", affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=32, num_blocks=1,
               num_heads=2, extra_per_block_abs_pos_emb=True, extra_per_block_abs_pos_emb_type="learnable",
               crossattn_emb_channels=32)
COSMOS2 = dict(image_model="cosmos_predict2", max_img_h=32, max_img_w=32, max_frames=8, in_channels=16,
               out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=128, concat_padding_mask=True,
               crossattn_emb_channels=32, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
               min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=32, num_blocks=1, num_heads=2,
               extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
               rope_t_extrapolation_ratio=1.0, extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0,
               extra_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False)
COSMOS_TEXT = 8


def _cosmos1_inputs():
    g = _gen(126)
    return _inputs(_randn(g, 2, 16, 2, 8, 8), _sigma("CosmosT2V", COSMOS1, "EDM", 2),
                   c_crossattn=_randn(g, 2, COSMOS_TEXT, 32))


def _cosmos2_inputs():
    g = _gen(127)
    return _inputs(_randn(g, 2, 16, 1, 16, 16), _sigma("CosmosT2IPredict2", COSMOS2, "FLOW_COSMOS", 2),
                   c_crossattn=_randn(g, 2, COSMOS_TEXT, 32))


OMNIGEN2 = dict(image_model="omnigen2", patch_size=2, in_channels=16, out_channels=None, hidden_size=128,
                num_layers=1, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                ffn_dim_multiplier=None, norm_eps=1e-5, axes_dim_rope=[16, 24, 24], axes_lens=[1024, 1664, 1664],
                text_feat_dim=32, timestep_scale=1000.0)
OMNIGEN_TEXT = 8


def _omnigen2_inputs(ref=False):
    g = _gen(128)
    conds = dict(c_crossattn=_randn(g, 2, OMNIGEN_TEXT, 32), num_tokens=OMNIGEN_TEXT)
    if ref:
        conds["ref_latents"] = [_randn(g, 2, 16, 12, 16)]
    return _inputs(_randn(g, 2, 16, 16, 16), _sigma("Omnigen2", OMNIGEN2, "FLOW", 2), **conds)


# --------------------------------------------------------------------------------------------------- audio

STABLE_AUDIO = dict(audio_model="dit1.0", io_channels=64, embed_dim=128, depth=1, num_heads=2, cond_token_dim=64,
                    project_cond_tokens=False, global_cond_dim=64, project_global_cond=True)
AUDIO_TEXT = 6  # + 2 seconds_start / seconds_total tokens that StableAudio1.extra_conds appends


def _stable_audio_kwargs():
    comfy = _comfy()
    weights = []
    for seed in (31, 32):
        cond = comfy.ldm.audio.embedders.NumberConditioner(768, min_val=0, max_val=512)
        comfy_env.init_weights(cond, seed)
        weights.append(cond.state_dict())
    return {"seconds_start_embedder_weights": weights[0], "seconds_total_embedder_weights": weights[1]}


def _stable_audio_rope(model):
    # RotaryEmbedding.inv_freq is a torch.empty buffer loaded from the checkpoint: set the standard frequencies
    rope = model.diffusion_model.transformer.rotary_pos_emb
    dim = rope.inv_freq.shape[0] * 2
    rope.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))


def _stable_audio_inputs():
    g = _gen(129)
    return _inputs(_randn(g, 2, 64, 16), _sigma("StableAudio", STABLE_AUDIO, "V_PREDICTION_CONTINUOUS", 2),
                   c_crossattn=_randn(g, 2, AUDIO_TEXT + 2, 64), global_embed=_randn(g, 2, 64))


ACE = dict(audio_model="ace", in_channels=8, num_layers=1, attention_head_dim=64, num_attention_heads=2,
           mlp_ratio=2.5, out_channels=8, max_position=32768, rope_theta=1000000.0, speaker_embedding_dim=512,
           text_embedding_dim=32, ssl_encoder_depths=[8, 8], ssl_latent_dims=[32, 32], ssl_names=["mert", "m-hubert"],
           lyric_encoder_vocab_size=64, lyric_hidden_size=1024, patch_size=[16, 1], max_height=16, max_width=4096)
ACE_TEXT = 6
ACE_LYRICS = 5


def _ace_inputs():
    g = _gen(130)
    return _inputs(_randn(g, 2, 8, 16, 32), _sigma("ACEStep", ACE, "FLOW", 2),
                   c_crossattn=_randn(g, 2, ACE_TEXT, 32),
                   lyric_token_idx=torch.randint(0, 64, (2, ACE_LYRICS), generator=g),
                   speaker_embeds=torch.zeros(2, 512), lyrics_strength=1.0)


# --------------------------------------------------------------------------------------------------- 3D

HUNYUAN3D = dict(image_model="hunyuan3d2", in_channels=64, context_in_dim=32, hidden_size=128, mlp_ratio=2.0,
                 num_heads=2, depth=1, depth_single_blocks=1, qkv_bias=True, guidance_embed=False)
HUNYUAN3D21 = dict(image_model="hunyuan3d2_1", in_channels=64, context_dim=32, hidden_size=128, mlp_ratio=2.0,
                   num_heads=2, depth=2, qkv_bias=False, guidance_cond_proj_dim=None, num_moe_layers=1,
                   num_experts=2, moe_top_k=1)
H3D_CONTEXT = 8  # DINOv2 image tokens (1370 at 518 px)
H3D_LATENTS = 32  # shape latents (3072 for v2)


def _hunyuan3d_inputs(v21=False):
    g = _gen(131)
    name, cfg = ("Hunyuan3Dv2_1", HUNYUAN3D21) if v21 else ("Hunyuan3Dv2", HUNYUAN3D)
    return _inputs(_randn(g, 2, 64, H3D_LATENTS), _sigma(name, cfg, "FLOW", 2),
                   c_crossattn=_randn(g, 2, H3D_CONTEXT, 32))


# --------------------------------------------------------------------------------------------------- unreachable

HYDIT = dict(image_model="hydit", input_size=32, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=2,
             mlp_ratio=2.0, text_states_dim=32, text_states_dim_t5=32, text_len=6, text_len_t5=8, qk_norm=True,
             size_cond=False, use_style_cond=False, learn_sigma=True, norm="layer")


def _hydit_inputs():
    g = _gen(132)
    return _inputs(_randn(g, 2, 4, 16, 16), _sigma("HunyuanDiT", HYDIT, "V_PREDICTION", 2),
                   c_crossattn=_randn(g, 2, 6, 32), text_embedding_mask=torch.ones(2, 6),
                   encoder_hidden_states_t5=_randn(g, 2, 8, 32), text_embedding_mask_t5=torch.ones(2, 8))


PIXART = dict(image_model="pixart_sigma", input_size=32, patch_size=2, in_channels=4, hidden_size=128, depth=1,
              num_heads=2, caption_channels=32, model_max_length=8, micro_condition=False)
PIXART_TEXT = 8


def _pixart_inputs():
    g = _gen(133)
    # PixArtMS needs (H + W) / 2 >= 33 latent pixels (its base_size rounds to 0 below that)
    return _inputs(_randn(g, 2, 4, 40, 40), _sigma("PixArtSigma", PIXART, "EPS", 2),
                   c_crossattn=_randn(g, 2, PIXART_TEXT, 32))


# --------------------------------------------------------------------------------------------------- the zoo

CASES: List[FamilyCase] = [
    FamilyCase(
        "SD1.5", _builder("SD15", SD15_UNET, "BaseModel", 1), _sd15_inputs, SD_TEXT,
        "UNet CrossAttention: per transformer block attn1 = self over the h*w tokens of its level, attn2 = cross to "
        "the text; heads positional, q/k/v (B, N, heads*dim_head), attn_precision kw, no mask; 8 heads"),
    FamilyCase(
        "SD2.x (v-prediction)", _builder("SD20", SD2_UNET, "BaseModel", 2, model_type="V_PREDICTION"),
        _sd2_inputs, SD_TEXT,
        "as SD1.5 but 64-channel heads (heads = channels / 64) and attn_precision=torch.float32"),
    FamilyCase(
        "SDXL", _builder("SDXL", SDXL_UNET, "SDXL", 3), _sdxl_inputs, SD_TEXT,
        "as SD2.x (64-channel heads) with no attention at the top level and several transformer blocks per "
        "level (block_index); y = adm vector"),
    FamilyCase(
        "SVD (img2vid)", _builder("SVD_img2vid", SVD_UNET, "SVD_img2vid", 4), _svd_inputs, 1,
        "frame-batched (B*T) latents; per level spatial attn1/attn2 (batch B*T, context = 1 CLIP-vision token) "
        "then temporal time_stack attn1/attn2 over the T frames with batch B*h*w; heads positional"),
    FamilyCase(
        "Stable Cascade stage C", _builder("Stable_Cascade_C", CASCADE_C, "StableCascade_C", 5),
        _cascade_c_inputs, CASCADE_TEXT + 8,
        "Attention2D(self_attn=True): q = h*w image tokens, k/v = [image tokens, clip tokens (text, 4 pooled, "
        "4 image)]; heads positional, (B, N, C), no mask; no block keys in transformer_options"),
    FamilyCase(
        "Stable Cascade stage B", _builder("Stable_Cascade_B", CASCADE_B, "StableCascade_B", 6),
        _cascade_b_inputs, 4,
        "as stage C at the two deepest levels, k/v = [image tokens, 4 pooled-clip tokens]; up blocks repeat "
        "(block_repeat), so one module is called several times per forward"),
    FamilyCase(
        "SD3 (MMDiT)", _builder("SD3", SD3_MMDIT, "SD3", 7, post=_fill_pos_embed), _sd3_inputs, SD3_TEXT,
        "joint attention over [text, image] in every JointBlock; heads keyword (heads=), q/k/v (B, N, heads*64), "
        "no mask; heads = depth, head dim always 64"),
    FamilyCase(
        "SD3.5 Medium (MMDiT-X)", _builder("SD3", SD35M_MMDIT, "SD3", 8, post=_fill_pos_embed),
        functools.partial(_sd3_inputs, SD35M_MMDIT, 134), SD3_TEXT,
        "as SD3, plus in x_block_self_attn_layers a second image-only self-attention (x_block.attn2), heads="),
    FamilyCase(
        "AuraFlow", _builder("AuraFlow", AURA, "AuraFlow", 9), _aura_inputs, AURA_TEXT + 8,
        "DoubleAttention then SingleAttention, both over [8 register tokens, text, image]; heads positional, "
        "skip_reshape=True, no mask"),
    FamilyCase(
        "Flux (dev, guidance)", _builder("Flux", FLUX, "Flux", 10), _flux_inputs, FLUX_TEXT,
        "flux.math.attention: heads positional, skip_reshape=True, mask=None keyword; double and single blocks "
        "both joint over [text, image] (RoPE applied before the call)"),
    FamilyCase(
        "Flux Kontext (reference image)", _builder("Flux", FLUX, "Flux", 10),
        functools.partial(_flux_inputs, kontext=True), FLUX_TEXT,
        "as Flux; the reference latent's tokens come after the image: [text, image, reference]"),
    FamilyCase(
        "Chroma", _builder("Chroma", CHROMA, "Chroma", 11), _chroma_inputs, FLUX_TEXT,
        "Flux-style double/single blocks (chroma.layers), joint [text, image], skip_reshape, mask=None kw"),
    FamilyCase(
        "Chroma Radiance", _builder("ChromaRadiance", CHROMA_RADIANCE, "ChromaRadiance", 12),
        functools.partial(_chroma_inputs, radiance=True), FLUX_TEXT,
        "as Chroma on pixels with 16x16 patches (the NeRF head has no attention)"),
    FamilyCase(
        "HunyuanVideo (t2v)", _builder("HunyuanVideo", HUNYUAN_VIDEO, "HunyuanVideo", 13),
        _hunyuan_video_inputs, HV_TEXT,
        "2 token-refiner blocks: text-only self-attention; then double/single blocks joint over [image, text] "
        "(image first); heads positional, skip_reshape=True, mask kw (None without a text mask)"),
    FamilyCase(
        "HunyuanVideo I2V (concat)", _builder("HunyuanVideoI2V", HUNYUAN_VIDEO_I2V, "HunyuanVideoI2V", 14),
        functools.partial(_hunyuan_video_inputs, "i2v"), HV_TEXT,
        "as t2v (image latent + mask concatenated on channels)"),
    FamilyCase(
        "HunyuanVideo custom (ref_latent)", _builder("HunyuanVideo", HUNYUAN_VIDEO, "HunyuanVideo", 13),
        functools.partial(_hunyuan_video_inputs, "custom"), HV_TEXT,
        "as t2v with the reference latent's tokens before the video: [reference, video, text]; batch 1 only"),
    FamilyCase(
        "HunyuanImage 2.1", _builder("HunyuanImage21", HUNYUAN_IMAGE21, "HunyuanImage21", 15),
        _hunyuan_image_inputs, HV_TEXT + HI_BYT5,
        "HunyuanVideo class with 2-D patch [1, 1]: refiner on the text, then joint [image, text, byT5 glyph "
        "tokens]"),
    FamilyCase(
        "Wan 2.1 t2v", _builder("WAN21_T2V", WAN_T2V, "WAN21", 16), _wan_t2v_inputs, WAN_TEXT,
        "WanSelfAttention over the video tokens, then WanT2VCrossAttention to the text (512 padded tokens in "
        "real use); heads keyword (heads=), q/k/v (B, N, heads*d), no mask, no skip_reshape"),
    FamilyCase(
        "Wan 2.1 i2v", _builder("WAN21_I2V", WAN_I2V, "WAN21", 17, model_kwargs={"image_to_video": True}),
        _wan_i2v_inputs, WAN_TEXT,
        "as t2v; cross-attention makes two calls with the same q: first to the CLIP-vision tokens (clip_fea, 257 "
        "in real use), then to the text"),
    FamilyCase(
        "Wan 2.2 TI2V 5B", _builder("WAN22_T2V", WAN22_TI2V, "WAN22", 18, model_kwargs={"image_to_video": True}),
        _wan22_ti2v_inputs, WAN_TEXT,
        "as Wan 2.1 t2v (48-channel latents, one timestep per latent frame from denoise_mask)"),
    FamilyCase(
        "Wan VACE", _builder("WAN21_Vace", WAN_VACE, "WAN21_Vace", 19), _wan_vace_inputs, WAN_TEXT,
        "as t2v, plus VACE blocks (self over the VACE context tokens, as many as the video's, and text cross) "
        "after the mapped main blocks"),
    FamilyCase(
        "Wan Camera", _builder("WAN21_Camera", WAN_CAMERA, "WAN21_Camera", 20), _wan_camera_inputs, WAN_TEXT,
        "as Wan 2.1 i2v (camera embedding added to the patch embedding)"),
    FamilyCase(
        "Wan HuMo", _builder("WAN21_HuMo", WAN_HUMO, "WAN21_HuMo", 21, uniform_children=("audio_proj",)),
        _wan_humo_inputs, WAN_TEXT,
        "as t2v over [video, reference frame], plus per-frame audio cross-attention (WanT2VCrossAttentionGather): "
        "batch B*frames, q = h*w tokens, k = 16 audio tokens, skip_reshape and skip_output_reshape, heads="),
    FamilyCase(
        "Wan 2.2 Animate", _builder("WAN22_Animate", WAN_ANIMATE, "WAN22_Animate", 22,
                                    pre=_animate_light_motion_encoder), _wan_animate_inputs, WAN_TEXT,
        "as Wan 2.1 i2v, plus every 5th block a FaceBlock cross-attention (batch B*frames, q = h*w tokens, "
        "k = 5 face-motion tokens, heads=) called WITHOUT transformer_options"),
    FamilyCase(
        "LTXV", _builder("LTXV", LTXV, "LTXV", 23), _ltxv_inputs, LTXV_TEXT,
        "lightricks CrossAttention: attn1 self over the video tokens, attn2 cross to the text with the text mask "
        "as an additive float (B, 1, 1, L) mask, 5th positional; heads positional, (B, N, heads*d)"),
    FamilyCase(
        "Qwen-Image", _builder("QwenImage", QWEN, "QwenImage", 24), _qwen_inputs, QWEN_TEXT,
        "joint [text, image] via optimized_attention_masked(q, k, v, heads, None, ...): heads and mask (None) "
        "positional, (B, N, heads*d)"),
    FamilyCase(
        "Qwen-Image Edit (reference image)", _builder("QwenImage", QWEN, "QwenImage", 24),
        functools.partial(_qwen_inputs, edit=True), QWEN_TEXT,
        "as Qwen-Image with the reference latents' tokens after the image: [text, image, reference]"),
    FamilyCase(
        "Lumina 2", _builder("Lumina2", LUMINA2, "Lumina2", 25), _lumina_inputs, LUMINA_TEXT,
        "context refiner (text only, mask = text mask or None), noise refiner (image only, additive zero mask "
        "(B, 1, L_img)), then joint [text, image]; mask 5th positional, skip_reshape, GQA k/v repeated before"),
    FamilyCase(
        "HiDream", _builder("HiDream", HIDREAM, "HiDream", 26), _hidream_inputs, HIDREAM_T5 + 2 * HIDREAM_LLAMA,
        "heads positional (q.shape[2]), (B, N, heads*d); double and single blocks joint over [image, T5, last "
        "Llama layer, this block's Llama layer]"),
    FamilyCase(
        "Mochi (Genmo)", _builder("GenmoMochi", MOCHI, "GenmoMochi", 27), _mochi_inputs, MOCHI_VALID,
        "joint [video, text cropped to num_tokens] (padding removed, no mask); heads positional, skip_reshape"),
    FamilyCase(
        "Cosmos v1 (GeneralDIT)", _builder("CosmosT2V", COSMOS1, "CosmosVideo", 28), _cosmos1_inputs,
        COSMOS_TEXT,
        "self-attention over the video tokens and cross-attention to the text; skip_reshape and "
        "skip_output_reshape, heads positional, mask=None kw"),
    FamilyCase(
        "Cosmos Predict2", _builder("CosmosT2IPredict2", COSMOS2, "CosmosPredict2", 29), _cosmos2_inputs,
        COSMOS_TEXT,
        "self-attention over the video tokens and cross-attention to the text; skip_reshape, heads positional"),
    FamilyCase(
        "OmniGen2", _builder("Omnigen2", OMNIGEN2, "Omnigen2", 30), _omnigen2_inputs, OMNIGEN_TEXT,
        "context refiner (text), noise refiner (image), then joint [text, image]; optimized_attention_masked with "
        "mask 5th positional (None), skip_reshape, GQA k/v repeated before the call"),
    FamilyCase(
        "OmniGen2 (reference image)", _builder("Omnigen2", OMNIGEN2, "Omnigen2", 30),
        functools.partial(_omnigen2_inputs, ref=True), OMNIGEN_TEXT,
        "as OmniGen2 plus a reference-image refiner; joint [text, reference, image]"),
    FamilyCase(
        "Stable Audio", _builder("StableAudio", STABLE_AUDIO, "StableAudio1", 31,
                                 model_kwargs=_stable_audio_kwargs, post=_stable_audio_rope),
        _stable_audio_inputs, AUDIO_TEXT + 2,
        "self-attention over [1 prepended global token, audio frames], cross-attention to [text, seconds_start, "
        "seconds_total]; heads positional, skip_reshape, k/v heads repeated before the call"),
    FamilyCase(
        "ACE-Step", _builder("ACEStep", ACE, "ACEStep", 32, uniform_children=("lyric_encoder",)), _ace_inputs,
        1 + ACE_TEXT + ACE_LYRICS,
        "only the cross-attention to [speaker, text, lyrics] reaches wrap_attn (heads=, skip_reshape, mask=None "
        "kw); the self-attention is ReLU linear attention outside wrap_attn"),
    FamilyCase(
        "Hunyuan3D v2", _builder("Hunyuan3Dv2", HUNYUAN3D, "Hunyuan3Dv2", 33), _hunyuan3d_inputs, H3D_CONTEXT,
        "Flux double/single blocks over [image-condition tokens, shape latents], no RoPE; heads positional, "
        "skip_reshape"),
]

UNREACHABLE: List[FamilyCase] = [
    FamilyCase(
        "Hunyuan-DiT", _builder("HunyuanDiT", HYDIT, "HunyuanDiT", 40), _hydit_inputs, 6 + 8,
        "T5 attention pooler, self and cross attention (to [CLIP, T5] text), none with transformer_options"),
    FamilyCase(
        "PixArt Sigma", _builder("PixArtSigma", PIXART, "PixArt", 41), _pixart_inputs, PIXART_TEXT,
        "self (AttentionKVCompress) and cross attention, none with transformer_options"),
    FamilyCase(
        "Hunyuan3D 2.1", _builder("Hunyuan3Dv2_1", HUNYUAN3D21, "Hunyuan3Dv2_1", 42),
        functools.partial(_hunyuan3d_inputs, v21=True), H3D_CONTEXT,
        "self over [timestep token, latents] and cross to the image tokens, heads=, no transformer_options; "
        "even batch only (it swaps the cond/uncond halves)"),
]

# ------------------------------------------------------------------------ families of ComfyUI after 0.3.64 (0.33)

FLUX2 = dict(image_model="flux2", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=32, hidden_size=128,
             mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 16, 16, 16], theta=2000,
             patch_size=1, qkv_bias=False, guidance_embed=False, global_modulation=True, mlp_silu_act=True,
             ops_bias=False, txt_ids_dims=[3], default_ref_method="index")
ZIMAGE = dict(LUMINA2, pad_tokens_multiple=32)  # Z-Image: caption and image each padded to a multiple of 32 tokens
HUNYUAN_VIDEO15 = dict(HUNYUAN_VIDEO, vec_in_dim=None, guidance_embed=False, byt5=True, use_cond_type_embedding=True,
                       vision_in_dim=24)


def _flux2_inputs():
    g = _gen(150)  # a 12 x 10 latent at patch 1: 120 image tokens after 8 text tokens
    return _inputs(_randn(g, 2, 16, 12, 10), _sigma("Flux2", FLUX2, "FLUX", 2), c_crossattn=_randn(g, 2, FLUX_TEXT, 32))


def _zimage_inputs():
    g = _gen(151)  # 8 x 10 = 80 image tokens, padded to 96; 8 caption tokens, padded to 32
    return _inputs(_randn(g, 2, 16, 16, 20), _sigma("ZImage", ZIMAGE, "FLOW", 2),
                   c_crossattn=_randn(g, 2, LUMINA_TEXT, 32), num_tokens=LUMINA_TEXT)


def _hunyuan_video15_inputs():
    g = _gen(152)  # [3 CLIP-vision, 5 byT5, 7 LLM text | 16 reference, 48 video] tokens
    return _inputs(_randn(g, 1, 16, 3, 8, 8), _sigma("HunyuanVideo15", HUNYUAN_VIDEO15, "FLOW", 1),
                   c_crossattn=_randn(g, 1, 7, 32), txt_byt5=_randn(g, 1, 5, 1472), clip_fea=_randn(g, 1, 3, 24),
                   ref_latent=_randn(g, 1, 16, 1, 8, 8))


KREA2 = dict(image_model="krea2", features=128, tdim=32, txtdim=32, heads=2, kvheads=1, multiplier=2, layers=1, patch=2,
             channels=16, bias=False, theta=1000, txtlayers=2, txtheads=2, txtkvheads=2)
KREA2_TEXT = 8
IDEOGRAM4 = dict(image_model="ideogram4", in_channels=128, num_layers=1, num_attention_heads=2, attention_head_dim=32,
                 intermediate_size=128, adaln_dim=32, llm_features_dim=32, rope_theta=10000, mrope_section=[6, 5, 5],
                 norm_eps=1e-5)
IDEOGRAM4_TEXT = 8
BOOGU = dict(image_model="boogu", patch_size=2, in_channels=16, out_channels=None, hidden_size=128, num_layers=1,
             num_double_stream_layers=1, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
             ffn_dim_multiplier=None, norm_eps=1e-5, axes_dim_rope=[16, 24, 24], axes_lens=[1024, 1664, 1664],
             instruction_feat_dim=32, timestep_scale=1000.0)


def _krea2_inputs(ref=False):
    g = _gen(153)  # Wan 2.1's latent: (B, 16, 1, H, W); 8 x 8 image tokens after the fused text (2 layers of 32)
    conds = dict(c_crossattn=_randn(g, 2, KREA2_TEXT, 2 * 32))
    if ref:  # [text, image, reference]: ComfyUI says the reference's count in reference_image_num_tokens
        conds.update(ref_latents=[_randn(g, 2, 16, 1, 12, 16)], ref_latents_method="index")
    return _inputs(_randn(g, 2, 16, 1, 16, 16), _sigma("Krea2", KREA2, "FLUX", 2), **conds)


def _ideogram4_inputs():
    g = _gen(154)  # Flux 2's 128-channel latent: one token per latent cell (2 x 2 pixels packed in the channels)
    return _inputs(_randn(g, 2, 128, 8, 6), _sigma("Ideogram4", IDEOGRAM4, "FLOW", 2),
                   c_crossattn=_randn(g, 2, IDEOGRAM4_TEXT, 32))


def _boogu_inputs(ref=False):
    g = _gen(155)
    conds = dict(c_crossattn=_randn(g, 2, OMNIGEN_TEXT, 32), num_tokens=OMNIGEN_TEXT)
    if ref:
        conds["ref_latents"] = [_randn(g, 2, 16, 12, 16)]
    return _inputs(_randn(g, 2, 16, 16, 16), _sigma("Boogu", BOOGU, "FLOW", 2), **conds)


# Kandinsky 5, CogVideoX, JoyImage, Lens, PixelDiT T2I (issue 24)
KANDINSKY5 = dict(image_model="kandinsky5", in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=32,
                  time_dim=32, model_dim=64, ff_dim=128, visual_embed_dim=132, patch_size=(1, 2, 2), num_text_blocks=1,
                  num_visual_blocks=1, axes_dims=(8, 12, 12))  # video: 16 latent + 17 concat channels, 2x2 patches
KANDINSKY5_IMAGE = dict(KANDINSKY5, visual_embed_dim=64)  # Kandinsky 5 Image: no concat channels
KANDINSKY5_TEXT = 8
COGVIDEOX = dict(image_model="cogvideox", num_attention_heads=2, attention_head_dim=48, in_channels=16, out_channels=16,
                 time_embed_dim=32, text_embed_dim=32, num_layers=1, sample_width=16, sample_height=16,
                 sample_frames=9, patch_size=2, max_text_seq_length=16)  # CogVideoX 2B: sin-cos positions, 2-D patches
COGVIDEOX15 = dict(COGVIDEOX, patch_size_t=2, use_rotary_positional_embeddings=True)  # 1.5: 2 latent frames a token
COGVIDEOX_TEXT = 8
JOYIMAGE = dict(image_model="joyimage", patch_size=[1, 2, 2], in_channels=16, hidden_size=256, num_attention_heads=2,
                text_dim=32, num_layers=1, rope_dim_list=[16, 56, 56], theta=10000)  # the config's RoPE: heads of 128
JOYIMAGE_TEXT = 8
LENS = dict(image_model="lens", patch_size=2, in_channels=128, out_channels=32, num_layers=1, attention_head_dim=32,
            num_attention_heads=2, enc_hidden_dim=16, axes_dims_rope=(8, 12, 12))  # 4 text-encoder layers of 16
LENS_TEXT = 8
PIXELDIT = dict(image_model="pixeldit_t2i", in_channels=3, num_groups=2, hidden_size=64, pixel_hidden_size=8,
                pixel_attn_hidden_size=32, pixel_num_groups=2, patch_depth=1, pixel_depth=1, patch_size=16,
                txt_embed_dim=32, txt_max_length=6)  # text cut to 6 tokens (300 in the checkpoint)
PIXELDIT_TEXT = 8


def _kandinsky5_inputs(image=False):
    g = _gen(160)
    if image:  # Kandinsky 5 Image: a 4-D Flux latent, 8 x 8 tokens
        x, sigma, conds = _randn(g, 2, 16, 16, 16), _sigma("Kandinsky5Image", KANDINSKY5_IMAGE, "FLOW", 2), {}
    else:  # video: 3 x 4 x 4 tokens; concat_cond: a zero image and the mask (17 channels)
        x, sigma = _wan_x(g), _sigma("Kandinsky5", KANDINSKY5, "FLOW", 2)
        conds = dict(c_concat=torch.cat([torch.zeros(2, 16, WAN_FRAMES, 8, 8), torch.ones(2, 1, WAN_FRAMES, 8, 8)], 1))
    return _inputs(x, sigma, c_crossattn=_randn(g, 2, KANDINSKY5_TEXT, 32), y=_randn(g, 2, 32), **conds)


def _cogvideox_inputs(v15=False):
    g = _gen(161)  # 3 latent frames of 8 x 8: 3 x 4 x 4 tokens (1.5: frames padded to 4, 2 x 4 x 4 tokens)
    return _inputs(_wan_x(g), _sigma("CogVideoX_T2V", COGVIDEOX15 if v15 else COGVIDEOX, "V_PREDICTION_DDPM", 2),
                   c_crossattn=_randn(g, 2, COGVIDEOX_TEXT, 32))


def _joyimage_inputs(ref=False):
    g = _gen(162)  # Wan 2.1's 5-D latent, one frame: 8 x 8 image tokens; a reference of 6 x 8 after them
    conds = dict(c_crossattn=_randn(g, 2, JOYIMAGE_TEXT, 32))
    if ref:
        conds["ref_latents"] = [_randn(g, 2, 16, 1, 12, 16)]
    return _inputs(_randn(g, 2, 16, 1, 16, 16), _sigma("JoyImage", JOYIMAGE, "FLOW", 2), **conds)


def _lens_inputs():
    g = _gen(163)  # Flux 2's 128-channel latent, one token per latent cell: 8 x 6; the last text token padding
    mask = torch.ones(2, LENS_TEXT)
    mask[:, -1] = 0.0
    return _inputs(_randn(g, 2, 128, 8, 6), _sigma("Lens", LENS, "FLUX", 2),
                   c_crossattn=_randn(g, 2, LENS_TEXT, 4 * 16), attention_mask=mask)


def _pixeldit_inputs():
    g = _gen(164)  # pixels, 16 x 16 patches: 96 x 80, 6 x 5 tokens; 8 text tokens cut to 6
    return _inputs(_randn(g, 2, 3, 96, 80), _sigma("PixelDiTT2I", PIXELDIT, "FLOW", 2),
                   c_crossattn=_randn(g, 2, PIXELDIT_TEXT, 32))


# (config class that must exist in the loaded ComfyUI, case)
NEWER_CASES = [
    ("Flux2", FamilyCase(
        "Flux 2 (patch 1)", _builder("Flux2", FLUX2, "Flux2", 50), _flux2_inputs, FLUX_TEXT,
        "the Flux class with patch size 1 (from the checkpoint): joint [text, image] over every latent cell")),
    ("ZImage", FamilyCase(
        "Z-Image", _builder("ZImage", ZIMAGE, "Lumina2", 51), _zimage_inputs, LUMINA_TEXT,
        "Lumina 2's NextDiT with pad_tokens_multiple=32: [caption + padding, image + padding], refiners over each")),
    ("HunyuanVideo15", FamilyCase(
        "HunyuanVideo 1.5 (i2v, reference latent)", _builder("HunyuanVideo15", HUNYUAN_VIDEO15, "HunyuanVideo15", 52),
        _hunyuan_video15_inputs, 7,
        "the HunyuanVideo class, text first: [CLIP vision, byT5, LLM text, reference latent, video]; img_slice set "
        "for the single blocks")),
    ("Krea2", FamilyCase(
        "Krea 2", _builder("Krea2", KREA2, "Krea2", 53), _krea2_inputs, KREA2_TEXT,
        "text fusion over each of the text encoder's layers (batch B x layers) and refiners (text only), then single "
        "stream [text, image] blocks with img_slice; k/v heads repeated before the call")),
    ("Krea2", FamilyCase(
        "Krea 2 (reference image)", _builder("Krea2", KREA2, "Krea2", 53), functools.partial(_krea2_inputs, ref=True),
        KREA2_TEXT, "as Krea 2 with the reference's tokens after the image: [text, image, reference]")),
    ("Ideogram4", FamilyCase(
        "Ideogram 4", _builder("Ideogram4", IDEOGRAM4, "Ideogram4", 54), _ideogram4_inputs, IDEOGRAM4_TEXT,
        "single stream [text, image] over a 128-channel latent, one token per latent cell (the model's patch_size 2 "
        "counts pixels already packed into channels); image only where the conditioning has no text")),
    ("Boogu", FamilyCase(
        "Boogu", _builder("Boogu", BOOGU, "Boogu", 55), _boogu_inputs, OMNIGEN_TEXT,
        "OmniGen2's refiners, then double-stream blocks (joint [text, image] and image self-attention) and single "
        "stream [text, image]; GQA (enable_gqa)")),
    ("Boogu", FamilyCase(
        "Boogu (reference image)", _builder("Boogu", BOOGU, "Boogu", 55), functools.partial(_boogu_inputs, ref=True),
        OMNIGEN_TEXT, "as Boogu with [text, reference, image] joint and [reference, image] image self-attention")),
    ("Kandinsky5", FamilyCase(
        "Kandinsky 5 (video)", _builder("Kandinsky5", KANDINSKY5, "Kandinsky5", 60), _kandinsky5_inputs,
        KANDINSKY5_TEXT,
        "text blocks (self-attention over the text alone), then visual blocks: self-attention over the video tokens "
        "and cross-attention to the text; heads=, skip_reshape")),
    ("Kandinsky5Image", FamilyCase(
        "Kandinsky 5 Image", _builder("Kandinsky5Image", KANDINSKY5_IMAGE, "Kandinsky5Image", 61),
        functools.partial(_kandinsky5_inputs, image=True), KANDINSKY5_TEXT,
        "the Kandinsky5 class on a 4-D image latent (one frame)")),
    ("CogVideoX_T2V", FamilyCase(
        "CogVideoX", _builder("CogVideoX_T2V", COGVIDEOX, "CogVideoX", 62), _cogvideox_inputs, COGVIDEOX_TEXT,
        "joint [text, video] self-attention in every block; heads=, (B, N, heads*d), no mask")),
    ("CogVideoX_T2V", FamilyCase(
        "CogVideoX 1.5 (temporal patch 2)", _builder("CogVideoX_T2V", COGVIDEOX15, "CogVideoX", 63),
        functools.partial(_cogvideox_inputs, v15=True), COGVIDEOX_TEXT,
        "as CogVideoX with patch_size_t=2 (2 latent frames a token, frames padded) and rotary positions")),
    ("JoyImage", FamilyCase(
        "JoyImage", _builder("JoyImage", JOYIMAGE, "JoyImage", 64), _joyimage_inputs, JOYIMAGE_TEXT,
        "double blocks joint over [image, text]; heads=, (B, N, heads*d)")),
    ("JoyImage", FamilyCase(
        "JoyImage Edit (reference image)", _builder("JoyImage", JOYIMAGE, "JoyImage", 64),
        functools.partial(_joyimage_inputs, ref=True), JOYIMAGE_TEXT,
        "as JoyImage with the reference latents' tokens between image and text: [image, reference, text]")),
    ("Lens", FamilyCase(
        "Lens", _builder("Lens", LENS, "Lens", 65), _lens_inputs, LENS_TEXT,
        "joint [image, text] over a 128-channel latent, one token per latent cell (the model's patch_size 2 counts "
        "pixels packed in the channels); the text mask as an additive (B, 1, 1, N) mask, skip_reshape")),
    ("PixelDiTT2I", FamilyCase(
        "PixelDiT T2I", _builder("PixelDiTT2I", PIXELDIT, "PixelDiTT2I", 66), _pixeldit_inputs, 6,
        "pixel space, 16 x 16 pixel patches: patch blocks joint [text cut to txt_max_length, image], then pixel "
        "blocks' self-attention over the patch tokens; heads positional, skip_reshape")),
]

# Wan 2.2 S2V: ComfyUI 0.3.64's WanModel_S2V calls its blocks without transformer_options (they get the {} default);
# later ComfyUI (0.33) passes them, so its calls reach the override. Which list it joins is measured below.
WAN_S2V_CASE = FamilyCase(
    "Wan 2.2 S2V", _builder("WAN22_S2V", WAN_S2V, "WAN22_S2V", 43, post=_s2v_weights), _wan_s2v_inputs, WAN_TEXT,
    "self over [video, reference, motion frames] (tokens the pack does not place: mask declined), text cross, and "
    "per-frame audio-injector cross-attention")

# Families in CASES where some wrap_attn calls carry no transformer_options, so the override misses them.
CALLS_WITHOUT_OVERRIDE: Dict[str, str] = {
    "Wan 2.2 S2V": "the audio injector's per-frame cross-attention (comfy/ldm/wan/model.py, WanModel_S2V) calls "
                   "attention without transformer_options, in ComfyUI that passes them to the blocks (0.33)",
    "Wan 2.2 Animate": "FaceAdapter/FaceBlock (comfy/ldm/wan/model_animate.py) calls optimized_attention(q, k, v, "
                       "heads=...) without transformer_options: the face-motion cross-attention of every 5th block",
}


# --------------------------------------------------------------------------------------------------- running

def reaches_override(case: FamilyCase) -> bool:
    """Whether any attention call of ``case`` carries transformer_options to ComfyUI's wrap_attn (run once)."""
    model = case.build()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
        lambda func, *args, **kwargs: func(*args, **kwargs))
    return count_attention_calls(lambda: run_model(model, case.inputs()))[2] > 0


def _add_cases_of_the_loaded_comfyui() -> None:
    """Wan 2.2 S2V to CASES where its calls reach the override, else to UNREACHABLE; the families of newer ComfyUI
    where the loaded ComfyUI has them."""
    todays = comfy_env.ROOT is not None and comfy_env.is_todays_comfyui()
    (CASES if todays and reaches_override(WAN_S2V_CASE) else UNREACHABLE).append(WAN_S2V_CASE)
    if todays:
        CASES.extend(case for config, case in NEWER_CASES if hasattr(_comfy().supported_models, config))


def run_model(patcher, case_inputs: dict, transformer_options_extra: Optional[dict] = None):
    """One denoiser call the way ComfyUI's sampler makes it (comfy_env.run_model) with a case's inputs; a real
    sampler also adds "sample_sigmas" and "uuids": pass them in ``transformer_options_extra`` if needed."""
    x = case_inputs["x"]
    return comfy_env.run_model(patcher, x, case_inputs["sigma"],
                               cond_or_uncond=case_inputs.get("cond_or_uncond", [0, 1][: x.shape[0]]),
                               options_extra=transformer_options_extra, **case_inputs.get("conds", {}))


@functools.lru_cache(maxsize=None)
def _wrapper_code():
    comfy = _comfy()
    codes = [c for c in comfy.ldm.modules.attention.wrap_attn.__code__.co_consts
             if hasattr(c, "co_name") and c.co_name == "wrapper"]
    if not codes:
        raise RuntimeError("comfy.ldm.modules.attention.wrap_attn has no inner `wrapper` function")
    return codes[0]


def count_attention_calls(fn, keywords: Optional[list] = None) -> Tuple[object, int, int]:
    """Run fn(); return (its result, number of calls that entered ComfyUI's wrap_attn wrapper from outside
    (i.e. kwargs without "_inside_attn_wrapper"), number of those that carried transformer_options with an
    "optimized_attention_override" entry). ``keywords``: a list that gets the keyword arguments of each of those."""
    code = _wrapper_code()
    counts = [0, 0]

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code is code:
            kwargs = frame.f_locals.get("kwargs", {})
            if "_inside_attn_wrapper" not in kwargs:
                counts[0] += 1
                options = kwargs.get("transformer_options")
                if options is not None and "optimized_attention_override" in options:
                    counts[1] += 1
                    if keywords is not None:
                        keywords.append(dict(kwargs))

    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        result = fn()
    finally:
        sys.setprofile(previous)
    return result, counts[0], counts[1]


_add_cases_of_the_loaded_comfyui()
