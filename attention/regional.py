"""Regional prompts as one label mask: a prompt per image region, all prompts in one attention pass.

The prompts' text tokens are concatenated, base prompt first: [base, region 1, ..., region R]. Every token of a call
gets a label: text tokens their prompt's (0 the base, i region i), image tokens the set of regions that cover them
(one label per distinct set), other tokens (reference images, registers, padding) one label of their own. One
(labels x labels) table then says who may attend whom (``allowed_between``), so no N x M mask exists and the masked
backend runs each group on its own keys (Σ|group|·|its keys| instead of N·M):

- a region's text attends its own text and its region's image, never another prompt;
- the base text attends itself, and the whole image outside the isolation phase;
- an image token attends the text of the regions covering it, and the base text weighted by ``base_weight`` (a bias
  of log(base_weight) on its scores; fully where no region covers it);
- in the isolation phase (``isolate``) image tokens attend only image tokens of a region they share, and tokens no
  region covers only each other; outside it, the whole image;
- every token attends the other tokens (a reference image is context for every region), which in the isolation
  phase attend only each other, so that no region reaches another through them.

Pure PyTorch; the rules' reference is ``naive.naive_regional_mask``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .layout import TokenLayout
from .masks import RegionMask

POOLINGS = ("max", "area")  # a region covers a token cell: any of its pixels inside / at least half of them inside
MAX_REGIONS = 62  # regions are bits of an int64


@dataclass(frozen=True)
class TokenMap:
    """Where one side's tokens (the queries or the keys of a call) are: ``tokens`` in all, the image grid ``image``
    (None: no image tokens), and the concatenated text at ``text_start`` for ``text_length`` tokens (0: none)."""

    tokens: int
    image: Optional[TokenLayout] = None
    text_start: int = 0
    text_length: int = 0


def region_cover(masks: torch.Tensor, layout: TokenLayout, pooling: str) -> torch.Tensor:
    """(R, Fm, H, W) masks (white = inside, read at 0.5) -> (image_tokens,) int64: bit i set where region i covers
    the token's cell. ``pooling``: "max" (any pixel of the cell inside; small regions survive coarse grids) or
    "area" (at least half). Fm == 1: the same mask on every frame; else the masks are resampled along the frames."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    inside = (masks >= 0.5).float()[:, None]  # (R, 1, Fm, H, W)
    frames = layout.frames if masks.shape[1] > 1 else 1
    size = (frames, layout.height, layout.width)
    if pooling == "max":
        cells = F.adaptive_max_pool3d(inside, size) > 0
    else:
        cells = F.adaptive_avg_pool3d(inside, size) >= 0.5
    cells = cells[:, 0].expand(-1, layout.frames, -1, -1).reshape(masks.shape[0], -1)  # (R, image_tokens)
    bits = torch.tensor([1 << i for i in range(masks.shape[0])], dtype=torch.int64)
    return (cells.long() * bits[:, None]).sum(0)


def allowed_between(query: Tuple[str, int], key: Tuple[str, int], isolate: bool) -> bool:
    """The rule for one pair of token kinds: ("text", prompt) with 0 the base prompt, ("image", region bits), or
    ("other", 0)."""
    (q_kind, q), (k_kind, k) = query, key
    if k_kind == "other":
        return True
    if q_kind == "other":
        return not isolate
    if q_kind == "text":
        if k_kind == "text":
            return q == k
        return bool(k >> (q - 1) & 1) if q else not isolate
    if k_kind == "text":
        return k == 0 or bool(q >> (k - 1) & 1)
    return not isolate or bool(q & k) or q == k == 0


class RegionalPrompt:
    """Prompts and their regions, as the RegionMask of any call.

    segments: the token count of each prompt in the concatenated text, the base prompt first (0: no base prompt).
    masks: (R, Fm, H, W) float, region i's mask (Fm 1, or a mask per frame of a video).
    base_weight: in [0, 1], how strongly the base text speaks to image tokens inside regions.
    """

    def __init__(self, segments: Sequence[int], masks: torch.Tensor, base_weight: float):
        if masks.ndim != 4 or masks.shape[0] != len(segments) - 1 or not 1 <= masks.shape[0] <= MAX_REGIONS:
            raise ValueError(f"{len(segments) - 1} region prompts need masks (regions, frames, H, W) of as many "
                             f"regions (1 to {MAX_REGIONS}); got {tuple(masks.shape)}")
        if not 0.0 <= base_weight <= 1.0:
            raise ValueError(f"base_weight must be in [0, 1], got {base_weight}")
        self.segments = tuple(int(s) for s in segments)
        self.masks = masks.detach().float().cpu()
        self.base_weight = float(base_weight)

    @property
    def regions(self) -> int:
        return len(self.segments) - 1

    @property
    def tokens(self) -> int:
        """Text tokens of all prompts together."""
        return sum(self.segments)

    def text_prompts(self, length: int) -> torch.Tensor:
        """(length,) the prompt of each text token (0 base, i region i), the concatenated text tiled to ``length``
        tokens as ComfyUI tiles a shorter text to batch it with a longer one."""
        if length % self.tokens:
            raise ValueError(f"{length} text tokens are not the {self.tokens} tokens of the prompts, tiled")
        prompts = torch.repeat_interleave(torch.arange(len(self.segments)), torch.tensor(self.segments))
        return prompts.repeat(length // self.tokens)

    def text_places(self, length: int) -> torch.Tensor:
        """(length,) each text token's place within its own prompt (0, 1, ...), the text tiled as in text_prompts."""
        places = torch.cat([torch.arange(count) for count in self.segments])
        return places.repeat(length // self.tokens)

    def _labels(self, side: TokenMap, pooling: str, groups: Dict[int, int]) -> torch.Tensor:
        """(tokens,) labels of one side: prompts 0..R for text, R + 1 for other tokens, R + 2 + group for image cover
        sets."""
        labels = torch.full((side.tokens,), self.regions + 1, dtype=torch.int64)
        if side.text_length:
            labels[side.text_start:side.text_start + side.text_length] = self.text_prompts(side.text_length)
        if side.image is not None:
            bits, group = torch.unique(region_cover(self.masks, side.image, pooling), return_inverse=True)
            label = torch.tensor([self.regions + 2 + groups.setdefault(b, len(groups)) for b in bits.tolist()])
            labels[side.image.before:side.image.before + side.image.image_tokens] = label[group]
        return labels

    def region_mask(self, queries: TokenMap, keys: TokenMap, isolate: bool, rows: torch.Tensor,
                    pooling: str = "area", device=None) -> Optional[RegionMask]:
        """The RegionMask of one call whose batch rows ``rows`` ((B,) boolean) hold these prompts (the other rows'
        labels are -1: unmasked); None where it would allow everything."""
        groups: Dict[int, int] = {}
        query_labels = self._labels(queries, pooling, groups)
        key_labels = self._labels(keys, pooling, groups)
        kinds = [("text", p) for p in range(len(self.segments))] + [("other", 0)] + [
            ("image", bits) for bits in sorted(groups, key=groups.get)]
        allowed = torch.tensor([[allowed_between(q, k, isolate) for k in kinds] for q in kinds], dtype=torch.bool)
        bias = None
        inside = torch.tensor([kind == "image" and bits != 0 for kind, bits in kinds])  # image tokens in regions
        if self.segments[0] and 0.0 < self.base_weight < 1.0:  # there the base text is weighted
            bias = torch.zeros(allowed.shape)
            bias[inside, 0] = math.log(self.base_weight)
        elif self.base_weight == 0.0:
            allowed[inside, 0] = False
        present_q, present_k = torch.unique(query_labels), torch.unique(key_labels)
        sub = allowed[present_q][:, present_k]
        if bool(sub.all()) and (bias is None or not bool(bias[present_q][:, present_k].any())):
            return None
        rows = rows.cpu()[:, None]
        return RegionMask(torch.where(rows, query_labels, -1).to(device), torch.where(rows, key_labels, -1).to(device),
                          allowed, bias)
