"""Train the video proxy on camera clips over the photographs, starting from the image proxy; write its fixture.

    python -m efficient_attention_pop.benchmark.proxy.train_video [--steps N] [--threads 1] [--out DIR]
        [--checkpoint FILE]

The video proxy is the image proxy's ProxyDiT with 3-D rotary positions (``time_pairs`` = 4: the slowest two
row pairs and two column pairs of each head turn with the frame's time instead) and the image proxy's trained
weights to start from, as video diffusion models start from image models. It learns motion from PhotoClips
(video_data.py): a cycle of three steps, 8 frames at time stride 1 (batch 4), 8 frames at stride 2 (batch
4) and 4 frames at stride 1 or 2 (batch 8), all 32x32 pixels, i.e. 2048 or 1024 image tokens a clip. The
objective is the image proxy's (rectified flow, logit-normal t, 10% null labels); AdamW with a short warmup
and cosine decay; the saved weights are an EMA of the trained ones, in fp16.

--checkpoint FILE: every CHECKPOINT_EVERY steps the whole state (weights, EMA, optimiser, both generators,
the loss curve, the time spent) goes to FILE, and a run started with an existing FILE goes on from it; with
the same thread count a resumed run repeats the losses of an unbroken one.

Writes proxy_video_dit.safetensors and proxy_video_dit.json beside this file, docs/proxy_video_loss.png and
docs/proxy_video_samples.png (16 frames of 64x64 pixels, beyond the training size), or all four into --out.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .data import CLASS_NAMES
from .model import FIXTURE_WEIGHTS, VIDEO_WEIGHTS, ProxyDiT, load_proxy_model
from .sampling import sample_images
from .train import REPO_DOCS, draw_loss, to_pil
from .train import learning_rate as image_learning_rate
from .video_data import PhotoClips

TIME_PAIRS = 4
SIZE = 32
CYCLE = ((8, 1, 4), (8, 2, 4), (4, 0, 8))  # (frames, time stride (0: 1 or 2 at random), batch) of successive steps
PEAK_LR, WARMUP_STEPS, FINAL_LR_FRACTION = 5e-4, 100, 0.1
BETAS, WEIGHT_DECAY, GRADIENT_CLIP = (0.9, 0.99), 0.01, 1.0
WEIGHT_EMA_DECAY, CURVE_EVERY, CHECKPOINT_EVERY, LOSS_EMA_DECAY = 0.998, 25, 100, 0.97
LABEL_DROP = 0.1
SEEDS = {"data": 11, "noise": 12}
SAMPLE_CLASSES = ("motorcycle", "coffee")
SAMPLE_FRAMES, SAMPLE_SIZE, SAMPLE_STEPS, SAMPLE_GUIDANCE = 16, 64, 12, 2.0


def learning_rate(step: int, steps: int) -> float:
    """The image proxy's schedule (train.learning_rate) with this run's peak, warmup and final fraction."""
    return image_learning_rate(step, steps, PEAK_LR, WARMUP_STEPS, FINAL_LR_FRACTION)


def video_model_from_image_proxy() -> ProxyDiT:
    """A video ProxyDiT (time_pairs = TIME_PAIRS) holding the image proxy's weights, in float32, trainable."""
    image = load_proxy_model()
    model = ProxyDiT(dataclasses.replace(image.config, time_pairs=TIME_PAIRS))
    model.load_state_dict(image.state_dict())
    return model.float().train().requires_grad_(True)


def flow_loss(model: ProxyDiT, clips: torch.Tensor, labels: torch.Tensor, frame_times: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity MSE on clips (B, 3, F, S, S) in [-1, 1]."""
    batch = len(clips)
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    noise = torch.randn(clips.shape, generator=generator)
    dropped = torch.rand(batch, generator=generator) < LABEL_DROP
    labels = torch.where(dropped, torch.full_like(labels, model.config.num_classes), labels)
    noisy = (1 - t[:, None, None, None, None]) * clips + t[:, None, None, None, None] * noise
    return F.mse_loss(model(noisy, t, labels, frame_times=frame_times), noise - clips)


def train(steps: int, checkpoint: Optional[Path]) -> Tuple[ProxyDiT, List[Tuple[int, float]], float]:
    """-> (EMA model, loss curve [(step, EMA of loss)], seconds spent in all runs)."""
    model = video_model_from_image_proxy()
    ema_model = copy.deepcopy(model).requires_grad_(False)
    data = PhotoClips(seed=SEEDS["data"])
    noise_generator = torch.Generator().manual_seed(SEEDS["noise"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    first_step, curve, loss_ema, spent = 0, [], None, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["steps"] != steps:
            raise ValueError(f"{checkpoint} is of a run of {state['steps']} steps, not {steps} (the schedule differs)")
        model.load_state_dict(state["model"])
        ema_model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        data.generator.set_state(state["data_generator"])
        noise_generator.set_state(state["noise_generator"])
        first_step, curve, loss_ema, spent = state["step"], state["curve"], state["loss_ema"], state["seconds"]
        print(f"resuming at step {first_step} from {checkpoint}", flush=True)
    start = time.perf_counter() - spent
    for step in range(first_step, steps):
        frames, stride, batch = CYCLE[step % len(CYCLE)]
        stride = stride or 1 + int(torch.randint(2, (), generator=data.generator))
        clips, labels, frame_times = data.clips(batch, frames, SIZE, stride)
        loss = flow_loss(model, clips, labels, frame_times, noise_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        optimizer.step()
        ema_decay = min(WEIGHT_EMA_DECAY, (step + 1) / (step + 10))
        with torch.no_grad():
            for ema_param, param in zip(ema_model.parameters(), model.parameters()):
                ema_param.lerp_(param, 1 - ema_decay)
        loss_ema = loss.item() if loss_ema is None else LOSS_EMA_DECAY * loss_ema + (1 - LOSS_EMA_DECAY) * loss.item()
        if (step + 1) % CURVE_EVERY == 0 or step + 1 == steps:
            curve.append((step + 1, round(loss_ema, 5)))
            print(f"step {step + 1}/{steps}  loss {loss_ema:.4f}  lr {learning_rate(step, steps):.2e}"
                  f"  {time.perf_counter() - start:.0f}s", flush=True)
        if checkpoint is not None and ((step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps):
            state = {"steps": steps, "step": step + 1, "model": model.state_dict(), "ema": ema_model.state_dict(),
                     "optimizer": optimizer.state_dict(), "data_generator": data.generator.get_state(),
                     "noise_generator": noise_generator.get_state(), "curve": curve, "loss_ema": loss_ema,
                     "seconds": time.perf_counter() - start}
            torch.save(state, str(checkpoint) + ".tmp")
            os.replace(str(checkpoint) + ".tmp", checkpoint)
    return ema_model.eval(), curve, time.perf_counter() - start


def frame_differences(videos: torch.Tensor, gaps: Sequence[int] = (1, 2, 4, 8, 15)) -> dict:
    """Mean |frame t + gap - frame t| of videos (B, 3, F, S, S) in [-1, 1], per gap: a camera moving steadily gives
    differences growing with the gap; frames of unrelated images, or flicker, give the same difference at every
    gap."""
    return {gap: round(float((videos[:, :, gap:] - videos[:, :, :-gap]).abs().mean()), 4)
            for gap in gaps if gap < videos.shape[2]}


def draw_samples(model: ProxyDiT, path: Path) -> dict:
    """One row per class of SAMPLE_CLASSES: its SAMPLE_FRAMES frames at SAMPLE_SIZE pixels, left to right; returns
    the samples' frame_differences."""
    classes = [CLASS_NAMES.index(name) for name in SAMPLE_CLASSES]
    videos = sample_images(model, classes, size=SAMPLE_SIZE, steps=SAMPLE_STEPS, seed=0, guidance=SAMPLE_GUIDANCE,
                           frames=SAMPLE_FRAMES)
    label_width, top = 110, 18
    canvas = Image.new("RGB", (label_width + SAMPLE_FRAMES * SAMPLE_SIZE, top + len(classes) * SAMPLE_SIZE), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((label_width, 3), f"video proxy samples: {SAMPLE_FRAMES} frames x {SAMPLE_SIZE}x{SAMPLE_SIZE} px "
              f"({SAMPLE_STEPS} Euler steps, guidance {SAMPLE_GUIDANCE}), frame 0 on the left", fill="black", font=font)
    for row, (name, video) in enumerate(zip(SAMPLE_CLASSES, videos)):
        y = top + row * SAMPLE_SIZE
        draw.text((4, y + SAMPLE_SIZE // 2 - 6), name, fill="black", font=font)
        for frame, image in enumerate(to_pil(video.transpose(0, 1), 1)):
            canvas.paste(image, (label_width + frame * SAMPLE_SIZE, y))
    canvas.save(path)
    return frame_differences(videos)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write all four outputs here instead of their places in the repository")
    parser.add_argument("--checkpoint", type=Path, help="save the training state here, and resume from it if it exists")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights_path = VIDEO_WEIGHTS if args.out is None else args.out / VIDEO_WEIGHTS.name
    record_path = weights_path.with_suffix(".json")
    docs = REPO_DOCS if args.out is None else args.out
    for folder in (weights_path.parent, docs):
        folder.mkdir(parents=True, exist_ok=True)

    model, curve, seconds = train(args.steps, args.checkpoint)

    from safetensors.torch import save_file
    save_file({name: tensor.half().contiguous() for name, tensor in model.state_dict().items()}, str(weights_path))
    sha256 = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    record = {
        "config": dataclasses.asdict(model.config),
        "classes": list(CLASS_NAMES),
        "command": " ".join(["python -m efficient_attention_pop.benchmark.proxy.train_video"]
                            + list(sys.argv[1:] if argv is None else argv)),
        "started_from": f"{FIXTURE_WEIGHTS.name} (the image proxy), its weights unchanged; the time pairs start "
                        "as the slowest spatial pairs",
        "steps": args.steps,
        "threads": args.threads,
        "clips": {"size": f"{SIZE}x{SIZE} px", "cycle (frames, stride (0: 1 or 2), batch)": [list(c) for c in CYCLE],
                  "motion": "pan, zoom, a third turn (video_data.py)"},
        "objective": {"flow": "rectified, predicts noise - clip", "t": "logit-normal(0, 1)", "label_drop": LABEL_DROP},
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "warmup_steps": WARMUP_STEPS, "betas": list(BETAS),
                      "weight_decay": WEIGHT_DECAY, "gradient_clip": GRADIENT_CLIP, "final_lr_fraction": FINAL_LR_FRACTION,
                      "schedule": "linear warmup, cosine decay", "weights_ema_decay": WEIGHT_EMA_DECAY},
        "seeds": SEEDS,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "loss_ema_decay": LOSS_EMA_DECAY,
        "loss_curve": curve,
        "weights": weights_path.name,
        "sha256": sha256,
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    model = load_proxy_model(weights=weights_path)
    draw_loss([(f"loss (EMA {LOSS_EMA_DECAY})", "blue", curve)], args.steps, docs / "proxy_video_loss.png")
    print(f"samples' mean |frame t + gap - frame t| by gap: {draw_samples(model, docs / 'proxy_video_samples.png')}")
    print(f"trained {args.steps} steps in {seconds:.0f}s; wrote {weights_path} (sha256 {sha256}), {record_path}, "
          f"{docs / 'proxy_video_loss.png'}, {docs / 'proxy_video_samples.png'}")


if __name__ == "__main__":
    main()
