"""Train the proxy model on skimage photo crops and write its fixture, record and pictures.

    python -m efficient_attention_pop.benchmark.proxy.train [--steps N] [--threads 1] [--out DIR]

Rectified flow: x_t = (1 - t) image + t noise, the model predicts noise - image, t ~ logit-normal(0, 1);
10% of labels are replaced by the null class (classifier-free guidance). Every 8th step trains on
64x64 crops (batch 4), the others on 32x32 crops (batch 32), so the model sees two token counts. AdamW
with linear warmup and cosine decay; the saved weights are an EMA of the trained ones, in fp16.

Writes proxy_dit.safetensors and proxy_dit.json beside this file and docs/proxy_loss.png,
docs/proxy_samples.png in the repository, or all four into --out DIR. All seeds are fixed: a rerun with
the same arguments and thread count repeats the losses.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .data import CLASS_NAMES, PhotoCrops
from .model import FIXTURE_JSON, FIXTURE_WEIGHTS, ProxyConfig, ProxyDiT, load_proxy_model
from .sampling import sample_images

REPO_DOCS = Path(__file__).resolve().parents[2] / "docs"
SMALL, SMALL_BATCH = 32, 32
LARGE, LARGE_BATCH, LARGE_EVERY = 64, 4, 8
PEAK_LR, WARMUP_STEPS, FINAL_LR_FRACTION = 1e-3, 200, 0.1
BETAS, WEIGHT_DECAY, GRADIENT_CLIP = (0.9, 0.99), 0.01, 1.0
WEIGHT_EMA_DECAY, CURVE_EVERY = 0.999, 50
LOSS_EMA_DECAY = {SMALL: 0.98, LARGE: 0.9}  # per update: 64x64 losses come 7 times less often
LABEL_DROP = 0.1
SEEDS = {"init": 0, "data": 1, "noise": 2}
SAMPLE_COLUMNS, REFERENCE_COLUMNS, LARGE_SAMPLE_CLASSES = 8, 2, ("chelsea", "coffee", "brick", "grass", "lfw_faces")
SAMPLE_GUIDANCE = 2.0


def learning_rate(step: int, steps: int, peak: float = PEAK_LR, warmup: int = WARMUP_STEPS,
                  final_fraction: float = FINAL_LR_FRACTION) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``final_fraction`` of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def flow_loss(model: ProxyDiT, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity MSE on one batch; images (B, 3, S, S) in [-1, 1], labels (B,)."""
    batch = len(images)
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    noise = torch.randn(images.shape, generator=generator)
    dropped = torch.rand(batch, generator=generator) < LABEL_DROP
    labels = torch.where(dropped, torch.full_like(labels, model.config.num_classes), labels)
    noisy = (1 - t[:, None, None, None]) * images + t[:, None, None, None] * noise
    return F.mse_loss(model(noisy, t, labels), noise - images)


def train(steps: int) -> Tuple[ProxyDiT, List[Tuple[int, float]], List[Tuple[int, float]], float]:
    """-> (EMA model, 32x32 loss curve, 64x64 loss curve, seconds); curves are (step, EMA of loss)."""
    torch.manual_seed(SEEDS["init"])
    model = ProxyDiT(ProxyConfig(num_classes=len(CLASS_NAMES)))
    ema_model = copy.deepcopy(model).requires_grad_(False)
    data = PhotoCrops(seed=SEEDS["data"])
    noise_generator = torch.Generator().manual_seed(SEEDS["noise"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    loss_ema = {SMALL: None, LARGE: None}
    curves = {SMALL: [], LARGE: []}
    start = time.perf_counter()
    for step in range(steps):
        size, batch = (LARGE, LARGE_BATCH) if step % LARGE_EVERY == LARGE_EVERY - 1 else (SMALL, SMALL_BATCH)
        images, labels = data.batch(batch, size)
        loss = flow_loss(model, images, labels, noise_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        optimizer.step()
        ema_decay = min(WEIGHT_EMA_DECAY, (step + 1) / (step + 10))  # short memory early on
        with torch.no_grad():
            for ema_param, param in zip(ema_model.parameters(), model.parameters()):
                ema_param.lerp_(param, 1 - ema_decay)
        previous = loss_ema[size]
        loss_decay = LOSS_EMA_DECAY[size]
        loss_ema[size] = loss.item() if previous is None else loss_decay * previous + (1 - loss_decay) * loss.item()
        if (step + 1) % CURVE_EVERY == 0 or step + 1 == steps:
            for curve_size, curve in curves.items():
                if loss_ema[curve_size] is not None:
                    curve.append((step + 1, round(loss_ema[curve_size], 5)))
            losses = "  ".join(f"loss{curve_size} {value:.4f}" for curve_size, value in loss_ema.items() if value is not None)
            print(f"step {step + 1}/{steps}  {losses}  lr {learning_rate(step, steps):.2e}"
                  f"  {time.perf_counter() - start:.0f}s", flush=True)
    return ema_model.eval(), curves[SMALL], curves[LARGE], time.perf_counter() - start


def to_pil(images: torch.Tensor, zoom: int) -> List[Image.Image]:
    """(B, 3, S, S) in [-1, 1] -> B PIL images enlarged ``zoom`` times (nearest neighbour)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)).resize((p.shape[1] * zoom, p.shape[0] * zoom), Image.NEAREST)
            for p in pixels]


def draw_samples(model: ProxyDiT, path: Path) -> None:
    """One row per class (real crops, then samples at 32x32), then a row of 64x64 samples; all x3."""
    zoom, cell, label_width, gap = 3, SMALL * 3, 150, 12
    reference = PhotoCrops(seed=3)
    rows = len(CLASS_NAMES)
    width = label_width + (REFERENCE_COLUMNS + SAMPLE_COLUMNS) * cell + gap
    height = 20 + rows * cell + 20 + LARGE * zoom
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((label_width, 4), "real crops", fill="black", font=font)
    draw.text((label_width + REFERENCE_COLUMNS * cell + gap, 4),
              f"samples 32x32 (12 Euler steps, guidance {SAMPLE_GUIDANCE})", fill="black", font=font)
    for label, name in enumerate(CLASS_NAMES):
        y = 20 + label * cell
        draw.text((4, y + cell // 2 - 6), name, fill="black", font=font)
        real = torch.stack([reference.crop(reference.photos[label][reference._randint(len(reference.photos[label]))], SMALL)
                            for _ in range(REFERENCE_COLUMNS)])
        samples = sample_images(model, [label] * SAMPLE_COLUMNS, size=SMALL, seed=label, guidance=SAMPLE_GUIDANCE)
        for column, image in enumerate(to_pil(real, zoom) + to_pil(samples, zoom)):
            canvas.paste(image, (label_width + column * cell + (gap if column >= REFERENCE_COLUMNS else 0), y))
    y = 20 + rows * cell
    classes = [CLASS_NAMES.index(name) for name in LARGE_SAMPLE_CLASSES]
    draw.text((4, y + 4), "samples 64x64: " + ", ".join(LARGE_SAMPLE_CLASSES), fill="black", font=font)
    for column, image in enumerate(to_pil(sample_images(model, classes, size=LARGE, seed=100, guidance=SAMPLE_GUIDANCE), zoom)):
        canvas.paste(image, (label_width + column * LARGE * zoom, y + 20))
    canvas.save(path)


def draw_loss(curves: Sequence[Tuple[str, str, Sequence[Tuple[int, float]]]], steps: int, path: Path) -> None:
    """Loss curves (name, colour, [(step, loss)]) as polylines on plain axes, loss on a log scale."""
    width, height, left, right, top, bottom = 800, 450, 70, 20, 30, 50
    values = [loss for _, _, curve in curves for _, loss in curve]
    low, high = math.log(min(values) * 0.9), math.log(max(values) * 1.1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def point(step: float, log_loss: float) -> Tuple[float, float]:
        return (left + (width - left - right) * step / steps,
                height - bottom - (height - top - bottom) * (log_loss - low) / (high - low))

    draw.line([point(0, high), point(0, low), point(steps, low)], fill="black")
    for i in range(6):
        log_loss = low + (high - low) * i / 5
        x, y = point(0, log_loss)
        draw.line([(x - 5, y), (x, y)], fill="black")
        draw.text((8, y - 6), f"{math.exp(log_loss):.3f}", fill="black", font=font)
        step = steps * i / 5
        x, y = point(step, low)
        draw.line([(x, y), (x, y + 5)], fill="black")
        draw.text((x - 15, y + 8), f"{step:.0f}", fill="black", font=font)
    draw.text((width // 2 - 20, height - 20), "step", fill="black", font=font)
    draw.text((8, 6), "loss (log scale)", fill="black", font=font)
    for index, (name, colour, curve) in enumerate(curves):
        draw.line([point(step, math.log(loss)) for step, loss in curve], fill=colour, width=2)
        draw.text((width - 300, top + 15 * index), name, fill=colour, font=font)
    canvas.save(path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4800)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write all four outputs here instead of their places in the repository")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights_path, record_path = (FIXTURE_WEIGHTS, FIXTURE_JSON) if args.out is None else (
        args.out / FIXTURE_WEIGHTS.name, args.out / FIXTURE_JSON.name)
    docs = REPO_DOCS if args.out is None else args.out
    for folder in (weights_path.parent, docs):
        folder.mkdir(parents=True, exist_ok=True)

    model, curve_small, curve_large, seconds = train(args.steps)

    from safetensors.torch import save_file
    save_file({name: tensor.half().contiguous() for name, tensor in model.state_dict().items()}, str(weights_path))
    sha256 = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    record = {
        "config": dataclasses.asdict(model.config),
        "classes": list(CLASS_NAMES),
        "command": " ".join(["python -m efficient_attention_pop.benchmark.proxy.train"] + list(sys.argv[1:] if argv is None else argv)),
        "steps": args.steps,
        "threads": args.threads,
        "batches": {f"{SMALL}x{SMALL}": SMALL_BATCH, f"{LARGE}x{LARGE} (every {LARGE_EVERY}th step)": LARGE_BATCH},
        "objective": {"flow": "rectified, predicts noise - image", "t": "logit-normal(0, 1)", "label_drop": LABEL_DROP},
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "warmup_steps": WARMUP_STEPS, "betas": list(BETAS),
                      "weight_decay": WEIGHT_DECAY, "gradient_clip": GRADIENT_CLIP, "final_lr_fraction": FINAL_LR_FRACTION,
                      "schedule": "linear warmup, cosine decay", "weights_ema_decay": WEIGHT_EMA_DECAY},
        "seeds": SEEDS,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "loss_ema_decay": {f"{size}x{size}": decay for size, decay in LOSS_EMA_DECAY.items()},
        "loss_curve": curve_small,  # (step, EMA of the 32x32 loss)
        "loss_curve_64": curve_large,  # (step, EMA of the 64x64 loss)
        "weights": weights_path.name,
        "sha256": sha256,
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    model = load_proxy_model(weights=weights_path)  # the pictures show the fp16 weights that ship
    draw_loss([(f"{SMALL}x{SMALL} loss (EMA {LOSS_EMA_DECAY[SMALL]})", "blue", curve_small),
               (f"{LARGE}x{LARGE} loss (EMA {LOSS_EMA_DECAY[LARGE]})", "red", curve_large)], args.steps, docs / "proxy_loss.png")
    draw_samples(model, docs / "proxy_samples.png")
    print(f"trained {args.steps} steps in {seconds:.0f}s; wrote {weights_path} (sha256 {sha256}), {record_path}, "
          f"{docs / 'proxy_loss.png'}, {docs / 'proxy_samples.png'}")


if __name__ == "__main__":
    main()
