"""``quality --comfyui-model FILE``: what each approximate backend does to a user's own diffusion model.

ComfyUI loads the file with its own loader (a diffusion-model file, or a whole checkpoint) and samples a few
steps at a small size from fixed noise, with stand-in conditioning (seeded random text embeddings of the
model's own width: no text encoder is needed). For every approximate backend and option set it reports the
attention error on the exact trajectory (every served call of every step computes the approximation beside
exact attention: mean cosine and relative L2 over layers, and the worst layer), and the final latent's
relative L2 error against the exact final latent from the same noise. The calls run through the node's own
patch (today's ComfyUI override), so the layouts, masks and families are the node's.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch

from .metrics import relative_l2
from .table import markdown_table

# model_config class -> (text tokens, context width key, pooled width) of the stand-in conditioning.
CONDITIONING = {
    "SD15": (77, 768, None), "SD20": (77, 1024, None), "SD21UnclipL": (77, 1024, None),
    "SDXL": (77, 2048, 1280), "SDXLRefiner": (77, 1280, 1280), "SSD1B": (77, 2048, 1280),
    "Flux": (256, 4096, 768), "FluxSchnell": (256, 4096, 768), "SD3": (154, 4096, 2048),
}


@dataclass
class ComfyQualityRow:
    backend: str
    options: Dict[str, object]
    exact: bool
    image_size: int
    layers: int
    attn_cosine: float
    attn_rel_l2: float
    worst_layer_rel_l2: float
    latent_rel_l2: float


def import_comfy():
    """ComfyUI's modules: importable already (inside ComfyUI's Python), or from $COMFYUI_PATH."""
    root = os.environ.get("COMFYUI_PATH")
    if root and root not in sys.path:
        sys.path.insert(0, os.path.abspath(root))
    try:
        import comfy.cli_args
    except ImportError as error:
        raise SystemExit(f"error: --comfyui-model needs ComfyUI importable: run inside ComfyUI's Python, or set "
                         f"COMFYUI_PATH to a ComfyUI checkout ({error})") from error
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sample
    import comfy.sd
    return comfy


def load_model(comfy, path: str):
    """A ModelPatcher from a diffusion-model file or a whole checkpoint, loaded as ComfyUI loads them."""
    try:
        return comfy.sd.load_diffusion_model(path)
    except RuntimeError:
        model, _clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)
        return model


def stand_in_conditioning(model, seed: int):
    """(positive, negative) in ComfyUI's conditioning format: seeded random text embeddings of the model's width."""
    config = type(model.model.model_config).__name__
    if config not in CONDITIONING:
        unet = model.model.model_config.unet_config
        width = unet.get("context_dim") or unet.get("context_in_dim")
        if not width:
            raise SystemExit(f"error: --comfyui-model does not know the text width of {config} models yet; it knows "
                             f"{', '.join(sorted(CONDITIONING))} and UNets/DiTs whose config names context_dim")
        tokens, pooled = 77, None
    else:
        tokens, width, pooled = CONDITIONING[config]
    gen = torch.Generator().manual_seed(seed)
    conds = []
    for scale in (1.0, 0.0):  # positive: random text; negative: empty-prompt-like zeros
        extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=gen) * scale}
        conds.append([[torch.randn(1, tokens, width, generator=gen) * scale, extra]])
    return conds[0], conds[1]


def sample_latent(comfy, model, positive, negative, size: int, steps: int, seed: int) -> torch.Tensor:
    """The final latent of ``steps`` euler steps from seeded noise at ``size`` pixels (square)."""
    latent_format = model.model.latent_format
    downscale = getattr(latent_format, "spacial_downscale_ratio", 8)
    latent = torch.zeros(1, latent_format.latent_channels, size // downscale, size // downscale)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=seed).float()


def measure(comfy, model, variant, positive, negative, size, steps, seed, exact_latent) -> ComfyQualityRow:
    """One variant: its attention error along the exact trajectory, and its final latent error."""
    from ..attention import BACKENDS
    from ..nodes.patch import PatchSettings, patch_model

    settings = PatchSettings(backend=variant.backend, options=dict(variant.options))
    measurements = []  # every served call computes the variant beside exact and returns exact
    sample_latent(comfy, patch_model(model, settings, measurements), positive, negative, size, steps, seed)
    layers = {}
    for key, _, error, cosine in measurements:
        layers.setdefault(key, []).append((error, cosine))
    if not layers:
        raise SystemExit(f"error: no attention call of this model was served by {variant.label}")
    cosines = [statistics.fmean(cosine for _, cosine in records) for records in layers.values()]
    errors = [statistics.fmean(error for error, _ in records) for records in layers.values()]
    latent = sample_latent(comfy, patch_model(model, settings), positive, negative, size, steps, seed)
    return ComfyQualityRow(variant.backend, dict(variant.options), BACKENDS[variant.backend].exact, size, len(layers),
                           statistics.fmean(cosines), statistics.fmean(errors), max(errors),
                           relative_l2(latent, exact_latent))


def run_on_comfyui_model(args) -> int:
    import json

    from .quality import variants

    comfy = import_comfy()
    started = time.perf_counter()
    model = load_model(comfy, args.comfyui_model)
    size, steps, seed = args.sizes[0] if args.sizes else 512, args.steps, 0
    positive, negative = stand_in_conditioning(model, seed)
    measured, notes = variants(args.backends)
    measured = [variant for variant in measured if variant.backend != "sdpa"]
    print(f"efficient_attention_pop quality --comfyui-model {os.path.basename(args.comfyui_model)}: "
          f"{type(model.model.model_config).__name__}, {size} px, {steps} euler steps, stand-in conditioning, "
          f"torch {torch.__version__}")
    exact_latent = sample_latent(comfy, model, positive, negative, size, steps, seed)
    rows = []
    for index, variant in enumerate(measured, 1):
        print(f"[{index}/{len(measured)}] {variant.label} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        rows.append(measure(comfy, model, variant, positive, negative, size, steps, seed, exact_latent))
    print(format_rows(rows))
    for note in notes:
        print(f"note: {note}")
    print(f"attn cosine / rel L2: mean over the served attention layers along the exact trajectory (worst: the "
          f"layer with the largest mean error); latent rel L2: final latent vs the exact one from the same noise; "
          f"total {time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(row) for row in rows], f, indent=1)
    return 0


def format_rows(rows: List[ComfyQualityRow]) -> str:
    header = ["backend", "options", "px", "layers", "attn cosine", "attn rel L2", "worst layer rel L2",
              "latent rel L2"]
    return markdown_table(header, [[
        row.backend + (" (exact)" if row.exact else ""), " ".join(f"{k}={v}" for k, v in row.options.items()) or "-",
        str(row.image_size), str(row.layers), f"{row.attn_cosine:.4f}", f"{row.attn_rel_l2:.4f}",
        f"{row.worst_layer_rel_l2:.4f}", f"{row.latent_rel_l2:.4f}"] for row in rows])
