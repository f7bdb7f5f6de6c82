"""Where an attention call's image tokens are: a frames x height x width grid between other tokens.

An attention layer of a diffusion model sees the latent as a token sequence: a UNet level downsamples
it by 1, 2, 4, 8 (each halving rounds up, as a stride-2 convolution with padding 1 does), a DiT cuts it
into 2x2 patches, a video model keeps the frames axis, and joint-attention models put text tokens in
front of the image tokens (Flux, SD3, Qwen-Image) or behind them (HunyuanVideo). find_token_layout finds
that layout from the latent's shape and the call's token count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

MAX_DOWNSAMPLE_LEVELS = 6


@dataclass(frozen=True)
class TokenLayout:
    """Where the image tokens of one attention call are: ``before`` other tokens (e.g. text), then a
    frames x height x width grid, then ``after`` other tokens (e.g. text, or reference-image tokens)."""

    frames: int
    height: int
    width: int
    before: int = 0
    after: int = 0

    @property
    def image_tokens(self) -> int:
        return self.frames * self.height * self.width


def _halvings(height: int, width: int):
    for _ in range(MAX_DOWNSAMPLE_LEVELS):
        yield height, width
        height, width = math.ceil(height / 2), math.ceil(width / 2)


def patch_grid(latent_shape: Sequence[int], patch: Tuple[int, int, int]) -> Optional[TokenLayout]:
    """The token grid a DiT cuts a (B, C, H, W) or (B, C, T, H, W) latent into with ``patch`` (frames, height,
    width) latent cells per token, each axis padded up to its patch; None for a latent of another rank."""
    if len(latent_shape) not in (4, 5):
        return None
    frames = latent_shape[2] if len(latent_shape) == 5 else 1
    pt, ph, pw = patch
    return TokenLayout(math.ceil(frames / pt), math.ceil(latent_shape[-2] / ph), math.ceil(latent_shape[-1] / pw))


def find_token_layout(latent_shape: Sequence[int], tokens: int, patch_size: Optional[int] = None,
                      others_first: Optional[bool] = None, text_tokens: Optional[int] = None,
                      temporal_patch: int = 1) -> Optional[TokenLayout]:
    """The layout of a ``tokens``-long sequence made from a latent of ``latent_shape``, or None if none fits.

    latent_shape: (B, C, H, W) or (B, C, T, H, W). Without ``patch_size`` (a UNet) the image grid is the
    latent downsampled 1, 2, 4, ... times and must account for every token. With ``patch_size`` (a DiT)
    the grid is ceil(T/temporal_patch) x ceil(H/p) x ceil(W/p); other tokens (joint text, register tokens,
    reference images) are allowed only where ``others_first`` says where they go: True puts ``text_tokens``
    (default: all others) before the image and any remaining tokens (reference images) after it; False
    puts all others after it; None allows none.
    """
    if len(latent_shape) not in (4, 5):
        return None
    if patch_size is None:
        frames = latent_shape[2] if len(latent_shape) == 5 else 1
        for h, w in _halvings(latent_shape[-2], latent_shape[-1]):
            if frames * h * w == tokens:
                return TokenLayout(frames, h, w)
        return None
    grid = patch_grid(latent_shape, (temporal_patch, patch_size, patch_size))
    others = tokens - grid.image_tokens
    if others < 0 or (others > 0 and others_first is None):
        return None
    before = (others if text_tokens is None else text_tokens) if others_first else 0
    if before > others:
        return None
    return TokenLayout(grid.frames, grid.height, grid.width, before, others - before)
