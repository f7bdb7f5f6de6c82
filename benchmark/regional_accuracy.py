"""``regional-accuracy``: does each prompt land in its region? Measured on the trained proxy model, whose prompts are
its classes (one photograph each): an image of R squares side by side, each region given another class.

- One pass: the regions' cond tokens side by side ([base, region 1, ..., region R], the base prompt the null class,
  which also modulates), attention masked by attention/regional.py's rules at the given isolation and base_weight.
- ComfyUI's way: one evaluation per region with its own class, blended by the masks, as comfy/samplers.py does;
  and the same with each class given as cond tokens only (the null class modulating, as in one pass), which tells
  what the proxy takes from its global class modulation, which one pass cannot give each region.
Both with classifier-free guidance against the null class (one more evaluation per step).

A small CNN trained here on the same photographs (its accuracy on fresh crops is printed) judges each region's
square. Reported: the share of regions showing their own class, a seam score (mean absolute step across the region
borders over the mean step between neighbouring columns elsewhere: 1 = no visible border), and the time per image.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention
from ..attention.regional import RegionalPrompt, TokenMap
from ..nodes.regional import RegionRules
from .table import markdown_table

DEFAULTS = RegionRules()  # the node's defaults

SIZE = 32  # one region: the proxy's training size
TOKENS_ONLY = "comfyui, tokens only"  # ComfyUI's way with the class as cond tokens only (no per-region modulation)


class Judge(nn.Module):
    """A small CNN: (B, 3, 32, 32) in [-1, 1] -> (B, classes) logits."""

    def __init__(self, classes: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, classes))

    def forward(self, x):
        return self.layers(x)


def train_judge(classes: int, steps: int = 800, seed: int = 5, log=print):
    """The judge, trained on seeded 32 x 32 crops of the proxy's photographs; (judge, accuracy on fresh crops)."""
    from .proxy.data import PhotoCrops

    torch.manual_seed(seed)
    judge = Judge(classes)
    crops = PhotoCrops(seed)
    optimiser = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    for step in range(steps):
        images, labels = crops.batch(64, SIZE)
        loss = F.cross_entropy(judge(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 200 == 0:
            log(f"judge step {step}: loss {loss.item():.3f}")
    judge.eval().requires_grad_(False)
    held_out = PhotoCrops(seed + 1000)
    images, labels = held_out.batch(512, SIZE)
    return judge, float((judge(images).argmax(1) == labels).float().mean())


def _masks(regions: int) -> torch.Tensor:
    """(R, 1, 32, 32 R): region i is the i-th square from the left."""
    masks = torch.zeros(regions, 1, SIZE, SIZE * regions)
    for i in range(regions):
        masks[i, :, :, i * SIZE:(i + 1) * SIZE] = 1
    return masks


def one_pass_velocity(model, x, t, classes: Sequence[int], isolation_now: bool, base_weight: float):
    """The conditional velocity of one pass, (B, 3, H, W): the regions' classes as prompts, the null class as the
    base prompt (and as the modulating label)."""
    c = model.config
    null = c.num_classes
    labels = [null] + list(classes)
    tokens = model.cond_token_embed(torch.tensor(labels)).view(1, -1, c.hidden).expand(x.shape[0], -1, -1)
    prompt = RegionalPrompt([c.cond_tokens] * len(labels), _masks(len(classes)), base_weight)
    side_cache = {}

    def attention_fn(q, k, v, layout, layer_index):
        if "mask" not in side_cache:
            side = TokenMap(q.shape[2], layout, 0, layout.before)
            side_cache["mask"] = prompt.region_mask(side, side, isolation_now, torch.ones(q.shape[0], dtype=torch.bool),
                                                    "area")
        return attention(q, k, v, q.shape[1], mask=side_cache["mask"], skip_reshape=True, skip_output_reshape=True)

    return model(x, t.expand(x.shape[0]), torch.full((x.shape[0],), null), attention_fn=attention_fn,
                 cond_tokens=tokens)


@torch.no_grad()
def sample(model, classes: Sequence[int], way: str, steps: int, seed: int, guidance: float = 2.0,
           isolation: float = DEFAULTS.isolation, base_weight: float = DEFAULTS.base_weight) -> torch.Tensor:
    """One image of len(classes) regions side by side, (3, 32, 32 R) in [-1, 1]; way: "one pass", "comfyui" or
    TOKENS_ONLY."""
    regions = len(classes)
    x = torch.randn(1, 3, SIZE, SIZE * regions, generator=torch.Generator().manual_seed(seed))
    times = torch.linspace(1.0, 0.0, steps + 1)
    masks = _masks(regions)[:, None, 0]  # (R, 1, H, W)
    null = torch.tensor([model.config.num_classes])
    isolated_steps = round(isolation * steps)
    for step, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        unconditional = model(x, t.expand(1), null)
        if way.startswith("comfyui"):
            labels = torch.tensor(list(classes))
            tokens = None
            if way == TOKENS_ONLY:  # each region's class as cond tokens only, the null class modulating
                tokens = model.cond_token_embed(labels).view(regions, model.config.cond_tokens, -1)
                labels = null.expand(regions)
            per_region = model(x.expand(regions, -1, -1, -1), t.expand(regions), labels, cond_tokens=tokens)
            conditional = (per_region * masks).sum(0, keepdim=True) / masks.sum(0, keepdim=True)
        else:
            conditional = one_pass_velocity(model, x, t, classes, step < isolated_steps, base_weight)
        x = x + (t_next - t) * (unconditional + guidance * (conditional - unconditional))
    return x.clamp(-1, 1)[0]


def seam_score(image: torch.Tensor, regions: int) -> float:
    """Mean absolute step across the region borders / mean absolute step between neighbouring columns elsewhere."""
    steps = (image[:, :, 1:] - image[:, :, :-1]).abs().mean(dim=(0, 1))  # (W - 1,) step after column j
    borders = torch.tensor([i * SIZE - 1 for i in range(1, regions)])
    inside = torch.ones_like(steps, dtype=torch.bool)
    inside[borders] = False
    return float(steps[borders].mean() / steps[inside].mean())


@dataclass
class AccuracyRow:
    way: str
    isolation: Optional[float]
    base_weight: Optional[float]
    regions: int
    images: int
    correct: float
    seam: float
    seconds_per_image: float


def measure(model, judge, way: str, layouts: List[List[int]], steps: int, isolation=None, base_weight=None):
    right, seams, started = [], [], time.perf_counter()
    for seed, classes in enumerate(layouts):
        options = {} if way.startswith("comfyui") else dict(isolation=isolation, base_weight=base_weight)
        image = sample(model, classes, way, steps, seed, **options)
        squares = image.view(3, SIZE, len(classes), SIZE).permute(2, 0, 1, 3)
        right += (judge(squares).argmax(1) == torch.tensor(classes)).tolist()
        seams.append(seam_score(image, len(classes)))
    seconds = (time.perf_counter() - started) / len(layouts)
    return AccuracyRow(way, isolation, base_weight, len(layouts[0]), len(layouts), sum(right) / len(right),
                       sum(seams) / len(seams), seconds)


def layouts_of(regions: int, count: int, classes: int, seed: int = 0) -> List[List[int]]:
    """``count`` seeded lists of ``regions`` distinct classes."""
    gen = torch.Generator().manual_seed(seed + regions)
    return [torch.randperm(classes, generator=gen)[:regions].tolist() for _ in range(count)]


def run(region_counts: Sequence[int], count: int, steps: int, isolations: Sequence[float],
        base_weights: Sequence[float], log=print):
    from .proxy import load_proxy_model

    model = load_proxy_model()
    classes = model.config.num_classes
    judge, judge_accuracy = train_judge(classes, log=log)
    rows = []
    for regions in region_counts:
        layouts = layouts_of(regions, count, classes)
        for way in ("comfyui", TOKENS_ONLY):
            rows.append(measure(model, judge, way, layouts, steps))
            log(f"{regions} regions, {way}: {rows[-1].correct:.2f}")
        for isolation, base_weight in itertools.product(isolations, base_weights):
            rows.append(measure(model, judge, "one pass", layouts, steps, isolation, base_weight))
            log(f"{regions} regions, one pass isolation {isolation} base_weight {base_weight}: {rows[-1].correct:.2f}")
    return rows, judge_accuracy


def format_rows(rows: List[AccuracyRow]) -> str:
    return markdown_table(
        ["way", "isolation", "base_weight", "regions", "images", "regions right", "seam (1 = none)", "s / image"],
        [[r.way, "-" if r.isolation is None else f"{r.isolation:g}", "-" if r.base_weight is None else
          f"{r.base_weight:g}", str(r.regions), str(r.images), f"{r.correct:.0%}", f"{r.seam:.2f}",
          f"{r.seconds_per_image:.2f}"] for r in rows])


def picture(model, layouts: List[List[int]], steps: int, path, isolation: float, base_weight: float) -> None:
    """A PNG: per layout, ComfyUI's way above one pass, region borders drawn in red."""
    from PIL import Image

    rows = []
    for seed, classes in enumerate(layouts):
        for way in ("comfyui", "one pass"):
            image = (sample(model, classes, way, steps, seed, isolation=isolation, base_weight=base_weight) + 1) / 2
            for i in range(1, len(classes)):
                image[:, :, i * SIZE - 1] = torch.tensor([1.0, 0.0, 0.0])[:, None]
            rows.append(F.pad(image, (0, 0, 0, 2), value=1.0))
    grid = torch.cat(rows, dim=1)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(pixels).resize((pixels.shape[1] * 4, pixels.shape[0] * 4), Image.NEAREST).save(path)

