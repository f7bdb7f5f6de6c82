"""``regional-speed``: whole sampling runs with a prompt per region, one pass (Regional Prompts (PoP)) against
ComfyUI's own masked conditioning (one model evaluation per region and step), on the same prompts and noise, rounds
interleaved in one run.

The models are ComfyUI's own classes with random weights (timing does not depend on what the weights learned): the
full-size SD1.5 UNet at 512 px, and a Flux-shaped DiT at 1024 px (Flux's token counts, patch, rotary axes and 256 T5
tokens per prompt, with fewer and narrower blocks so that a CPU run takes minutes; the width is printed). Needs
ComfyUI importable ($COMFYUI_PATH or ComfyUI's Python).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Dict, List

import torch

from .table import markdown_table

SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
            channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768, num_heads=8,
            use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
            use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False)
FLUX_SHAPED = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                   hidden_size=512, mlp_ratio=4.0, num_heads=4, depth=1, depth_single_blocks=2,
                   axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
MODELS = {  # name -> (config class, model_base class, unet config, pixels, text tokens per prompt, text width, pooled)
    "sd15": ("SD15", "BaseModel", SD15, 512, 77, 768, None),
    "flux": ("Flux", "Flux", FLUX_SHAPED, 1024, 256, 4096, 768),
}


def _seed(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's operations skip weight initialisation: unit-variance matrices, norm weights 1, small vectors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param[0].numel()))
            else:
                param.copy_(torch.ones(param.shape) if "norm" in name else torch.randn(param.shape, generator=gen) * 0.02)


def build(comfy, name: str):
    config_name, model_class, unet, *_ = MODELS[name]
    fields = getattr(getattr(comfy.ldm.flux, "model", None), "FluxParams", None)
    unet = dict(unet)
    if name == "flux" and fields is not None and "txt_ids_dims" in fields.__dataclass_fields__:
        unet["txt_ids_dims"] = []  # Flux 1: no positions over the text (newer ComfyUI asks for the field)
    config = getattr(comfy.supported_models, config_name)(unet)
    config.set_inference_dtype(torch.float32, None)
    model = getattr(comfy.model_base, model_class)(config, device=torch.device("cpu"))
    _seed(model.diffusion_model, 0)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def prompts(name: str, regions: int, seed: int = 0):
    """(ComfyUI's regional conditioning: a base prompt and ``regions`` masked prompts side by side, negative)."""
    _, _, _, pixels, tokens, width, pooled = MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    size = pixels // 8
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=gen)}
    positive = [[torch.randn(1, tokens, width, generator=gen), dict(extra)]]
    for i in range(regions):
        mask = torch.zeros(size, size)
        mask[:, i * size // regions:(i + 1) * size // regions] = 1
        positive.append([torch.randn(1, tokens, width, generator=gen), dict(extra, mask=mask)])
    negative = [[torch.zeros(1, tokens, width), {k: v * 0 for k, v in extra.items()}]]
    return positive, negative


def sample_time(comfy, model, positive, negative, name: str, steps: int) -> float:
    pixels = MODELS[name][3]
    channels = model.model.latent_format.latent_channels
    latent = torch.zeros(1, channels, pixels // 8, pixels // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    with torch.no_grad():
        comfy.sample.sample(model, noise, steps, 3.5, "euler", "simple", positive, negative, latent, disable_pbar=True,
                            seed=1)
    return time.perf_counter() - started


def run(names: List[str], region_counts: List[int], steps: int, repeats: int, isolation: float = 0.2,
        log=print) -> List[Dict]:
    from ..nodes.regional_prompts import apply_regional_prompts
    from .comfy_quality import import_comfy

    comfy = import_comfy()
    rows = []
    for name in names:
        model = build(comfy, name)
        for regions in region_counts:
            positive, negative = prompts(name, regions)
            one_pass, conditioning = apply_regional_prompts(model, positive, isolation=isolation)
            times = {"comfyui": [], "one pass": []}
            for round_index in range(repeats + 1):  # round 0 warms up
                took = {way: sample_time(comfy, m, c, negative, name, steps)
                        for way, (m, c) in (("comfyui", (model, positive)), ("one pass", (one_pass, conditioning)))}
                log(f"{name}, {regions} regions, round {round_index}: " + ", ".join(
                    f"{way} {seconds:.1f} s" for way, seconds in took.items()))
                for way, seconds in took.items():
                    if round_index:
                        times[way].append(seconds)
            ratios = [a / b for a, b in zip(times["comfyui"], times["one pass"])]
            rows.append(dict(model=name, regions=regions, steps=steps, isolation=isolation, comfyui_s=statistics.median(times["comfyui"]),
                             one_pass_s=statistics.median(times["one pass"]), speedup=statistics.median(ratios),
                             lowest=min(ratios), highest=max(ratios)))
    return rows


def format_rows(rows: List[Dict]) -> str:
    return markdown_table(
        ["model", "regions", "steps", "isolation", "ComfyUI's masked conditioning, s", "one pass, s", "speedup (rounds)"],
        [[r["model"], str(r["regions"]), str(r["steps"]), f"{r['isolation']:g}", f"{r['comfyui_s']:.1f}",
          f"{r['one_pass_s']:.1f}",
          f"{r['speedup']:.2f}x ({r['lowest']:.2f}-{r['highest']:.2f})"] for r in rows])
