"""Image masks as region labels on an attention layer's token grid (see layout.py for the grid).

A RegionMasker holds one [B, H, W] mask in one mode, checked once, and gives the RegionMask of any call's token
layout: per-token labels, where tokens outside the image grid (text, reference images) get label -1 (never masked
out).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .layout import TokenLayout
from .masks import RegionMask

MASK_MODES = ("keys inside mask", "keys outside mask", "isolate regions")


def inside_mask(mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(Bm, H, W) float mask -> (Bm, image_tokens) boolean: token's cell is at least half inside."""
    cells = F.interpolate(mask[:, None].float(), size=(layout.height, layout.width), mode="area")
    inside = (cells[:, 0] >= 0.5).flatten(1)
    return inside.repeat(1, layout.frames)  # the same mask on every frame


def labels_for_mode(inside: torch.Tensor, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Bm, I) boolean inside-mask -> query and key labels (Bm, I) for one of MASK_MODES.

    keys inside mask: every query label 0, keys inside 0, keys outside 1 (queries see only keys inside).
    keys outside mask: the same with inside and outside swapped.
    isolate regions: inside tokens 0, outside 1, for queries and keys alike.
    """
    region = (~inside).long()
    if mode == "isolate regions":
        return region, region
    if mode == "keys inside mask":
        return torch.zeros_like(region), region
    if mode == "keys outside mask":
        return torch.zeros_like(region), 1 - region
    raise ValueError(f"Unknown mask mode {mode!r}; expected one of {MASK_MODES}")


def _with_other_tokens(labels: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Label -1 ("everywhere") for the tokens before and after the image grid."""
    if not layout.before and not layout.after:
        return labels
    def everywhere(count):
        return torch.full((labels.shape[0], count), -1, dtype=labels.dtype, device=labels.device)
    return torch.cat([everywhere(layout.before), labels, everywhere(layout.after)], dim=1)


def _match_batch(labels: torch.Tensor, attention_batch: int, latent_batch: int) -> torch.Tensor:
    """Labels batch 1 broadcasts; otherwise image i of every cond/uncond chunk takes mask i (cyclically)."""
    if labels.shape[0] == 1:
        return labels
    index = torch.arange(attention_batch, device=labels.device) % max(1, latent_batch) % labels.shape[0]
    return labels[index]


QUERY_PLACES_NEEDED = "isolate regions"  # the one mode whose query labels depend on where each query is


class RegionMasker:
    """One ComfyUI MASK in one of MASK_MODES, as the RegionMask of any self/joint attention call.

    mask: (B, H, W) or (H, W), white = inside; checked here, once (ValueError naming what is wrong)."""

    def __init__(self, mask: torch.Tensor, mode: str):
        if mode not in MASK_MODES:
            raise ValueError(f"Unknown mask mode {mode!r}; expected one of {MASK_MODES}")
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"Mask of shape {shape}: expected ComfyUI's [B, H, W] or [H, W] MASK")
        self.mask = (mask[None] if mask.ndim == 2 else mask).detach()
        self.mode = mode

    @property
    def needs_query_places(self) -> bool:
        """Whether each query's place must be known (queries merged by ToMe cannot be served)."""
        return self.mode == QUERY_PLACES_NEEDED

    def region_mask(self, layout: Optional[TokenLayout], attention_batch: int, latent_batch: int, *,
                    key_layout: Optional[TokenLayout] = None, query_tokens: Optional[int] = None,
                    device: Optional[torch.device] = None) -> Optional[RegionMask]:
        """The RegionMask for one call (on ``device``), or None when it would allow everything.

        ``layout``: where the queries' image tokens are; ``key_layout`` (default: the same): the keys', when
        they differ around the same image grid (Stable Cascade appends text tokens to the keys only).
        ``layout`` None with ``query_tokens``: queries whose places are unknown (merged by ToMe); only modes
        that give every query the same label can serve them (ValueError for "isolate regions").
        """
        key_layout = key_layout or layout
        query_labels, key_labels = labels_for_mode(inside_mask(self.mask, key_layout), self.mode)
        if torch.unique(torch.cat([query_labels, key_labels], dim=1)).numel() == 1:
            return None  # one label everywhere: every query may attend every key
        if layout is not None:
            query_labels = _with_other_tokens(query_labels, layout)
        elif self.needs_query_places:
            raise ValueError(f"mask mode {self.mode!r} needs to know where each query token is")
        else:
            query_labels = query_labels[:, :1].expand(-1, query_tokens)
        key_labels = _with_other_tokens(key_labels, key_layout)
        return RegionMask(_match_batch(query_labels, attention_batch, latent_batch).to(device),
                          _match_batch(key_labels, attention_batch, latent_batch).to(device))
