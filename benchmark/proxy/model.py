"""ProxyDiT: a small Flux-like diffusion transformer on pixels, a proxy with learned attention.

Layout of one forward pass at an H x W image (H, W multiples of 2), or an F x H x W video:
- 2x2 patches -> F*(H/2)*(W/2) image tokens, frame by frame (temporal patch 1); the class label ->
  ``cond_tokens`` learned tokens ("text") placed before them, as Flux puts its text tokens before the image.
- ``depth`` single-stream blocks (Flux's single blocks): adaLN modulation from timestep + class, one
  linear to q, k, v and the MLP input, joint attention over [cond tokens, image tokens] with per-head
  RMS-norm on q and k and rotary positions on image tokens: 2-D (row, column), and for a video model
  (``time_pairs`` > 0) 3-D, some pairs turning with the frame's time (cond tokens sit at 0, unrotated), then attention and MLP outputs merged by one linear and gated into the residual.
- a modulated final norm and linear back to 2x2 patches: the rectified-flow velocity (noise - image).

Every attention call goes through ``attention_fn(q, k, v, layout, layer_index)`` when one is given,
torch SDPA otherwise.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...attention.layout import TokenLayout

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout, int], torch.Tensor]
TIME_FREQUENCIES = 128  # sinusoidal timestep features: this many cosines and as many sines
FIXTURE_WEIGHTS = Path(__file__).with_name("proxy_dit.safetensors")
FIXTURE_JSON = FIXTURE_WEIGHTS.with_suffix(".json")
VIDEO_WEIGHTS = FIXTURE_WEIGHTS.with_name("proxy_video_dit.safetensors")  # the video proxy (train_video.py)


@dataclass(frozen=True)
class ProxyConfig:
    """Model hyperparameters; the label ``num_classes`` is the null class (classifier-free guidance)."""

    num_classes: int = 13
    hidden: int = 128
    depth: int = 5
    heads: int = 4
    mlp_ratio: float = 3.0
    cond_tokens: int = 4
    patch: int = 2
    channels: int = 3
    rope_theta: float = 10000.0
    time_pairs: int = 0  # rotary pairs per head that turn with the frame's time (0: an image model)
    time_theta: float = 100.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, 2 * TIME_FREQUENCIES) sinusoidal features of 1000 t."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(TIME_FREQUENCIES, device=t.device) / TIME_FREQUENCIES)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_tables(layout: TokenLayout, config: ProxyConfig, device: torch.device,
                frame_times: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotation angles, each (N_total, head_dim / 2): one angle per pair of channels.

    The first half of the pairs turns with the token's row, the second half with its column, at frequencies
    rope_theta^(-i / (head_dim / 4)). A video model (``time_pairs`` > 0) gives the last time_pairs / 2 pairs of
    each half, the slowest (nearly still across an image), to the frame's time instead, at frequencies
    time_theta^(-j / time_pairs): an image model's weights start it as a model of still frames.
    ``frame_times`` (F,): each frame's time (default 0, 1, ...). The ``layout.before`` cond tokens get angle 0.
    """
    pairs_per_axis = config.head_dim // 4
    spatial = pairs_per_axis - config.time_pairs // 2
    freqs = config.rope_theta ** (-torch.arange(spatial, device=device, dtype=torch.float32) / pairs_per_axis)
    time_freqs = config.time_theta ** (-torch.arange(config.time_pairs, device=device, dtype=torch.float32)
                                       / max(1, config.time_pairs))
    if frame_times is None:
        frame_times = torch.arange(layout.frames, dtype=torch.float32)
    per_frame = layout.height * layout.width
    times = frame_times.to(device=device, dtype=torch.float32).repeat_interleave(per_frame)[:, None] * time_freqs
    rows = torch.arange(layout.height, device=device, dtype=torch.float32).repeat_interleave(layout.width)
    cols = torch.arange(layout.width, device=device, dtype=torch.float32).repeat(layout.height)
    rows, cols = (axis.repeat(layout.frames)[:, None] * freqs for axis in (rows, cols))
    half = config.time_pairs // 2
    image_angles = torch.cat([rows, times[:, :half], cols, times[:, half:]], dim=1)
    angles = torch.cat([image_angles.new_zeros(layout.before, config.head_dim // 2), image_angles])
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (0, 1), (2, 3), ... of x (B, heads, N, head_dim) by the angles of cos/sin (N, head_dim/2)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned per-channel scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over all tokens, modulated (shift, scale, gate) by the conditioning vector."""

    def __init__(self, config: ProxyConfig):
        super().__init__()
        hidden, self.heads, self.head_dim = config.hidden, config.heads, config.head_dim
        self.mlp_hidden = int(hidden * config.mlp_ratio)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(hidden, 3 * hidden)
        self.to_qkv_mlp = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.to_out = nn.Linear(hidden + self.mlp_hidden, hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layout: TokenLayout, attention_fn: Optional[AttentionFn], layer_index: int) -> torch.Tensor:
        """x (B, N_total, hidden), cond (B, hidden) already SiLU'd -> (B, N_total, hidden)."""
        batch, tokens, hidden = x.shape
        shift, scale, gate = self.modulation(cond)[:, None].chunk(3, dim=-1)
        qkv, mlp_in = self.to_qkv_mlp(self.norm(x) * (1 + scale) + shift).split([3 * hidden, self.mlp_hidden], -1)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if attention_fn is None:
            attended = F.scaled_dot_product_attention(q, k, v)
        else:
            attended = attention_fn(q, k, v, layout, layer_index)
        attended = attended.transpose(1, 2).reshape(batch, tokens, hidden)
        merged = torch.cat([attended, F.gelu(mlp_in, approximate="tanh")], dim=-1)
        return x + gate * self.to_out(merged)


class ProxyDiT(nn.Module):
    """Class-conditional rectified-flow transformer on pixels: (image, t, label) -> velocity."""

    def __init__(self, config: ProxyConfig = ProxyConfig()):
        super().__init__()
        if config.head_dim * config.heads != config.hidden or config.head_dim % 4:
            raise ValueError("hidden must be heads * head_dim with head_dim a multiple of 4 (2-D rotary pairs)")
        if config.time_pairs % 2 or config.time_pairs // 2 > config.head_dim // 4:
            raise ValueError("time_pairs must be even and at most head_dim / 2")
        self.config = config
        hidden, patch_values = config.hidden, config.channels * config.patch ** 2
        self.patch_embed = nn.Linear(patch_values, hidden)
        self.time_embed = nn.Sequential(nn.Linear(2 * TIME_FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(config.num_classes + 1, hidden)
        self.cond_token_embed = nn.Embedding(config.num_classes + 1, config.cond_tokens * hidden)
        self.blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(hidden, 2 * hidden)
        self.to_patches = nn.Linear(hidden, patch_values)
        self._init_weights()

    def _init_weights(self) -> None:
        """adaLN-Zero: modulations and the output start at zero, so every block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
        for layer in (self.final_modulation, self.to_patches):
            nn.init.zeros_(layer.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                attention_fn: Optional[AttentionFn] = None, cond_tokens: Optional[torch.Tensor] = None,
                frame_times: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, H, W) noisy image or (B, C, F, H, W) noisy video, t (B,) in [0, 1] (1 = pure noise), labels
        (B,) int in [0, num_classes] (num_classes = no class) -> velocity, x's shape. ``cond_tokens`` (B, n,
        hidden): other cond tokens than the labels' (several classes' tokens side by side, for regional prompts);
        the labels still modulate. ``frame_times`` (F,): the frames' times for the rotary positions (default 0..F-1).

        attention_fn(q, k, v, layout, layer_index): q, k, v (B, heads, N_total, head_dim) after QK-norm
        and rotary, N_total = cond_tokens + F*(H/2)*(W/2), layout = TokenLayout(F, H/2, W/2,
        before=cond_tokens); returns (B, heads, N_total, head_dim). None: torch SDPA.
        """
        c, p = self.config, self.config.patch
        video = x.ndim == 5
        if not video:
            x = x[:, :, None]
        batch, channels, frames, height, width = x.shape
        if height % p or width % p:
            raise ValueError(f"image height and width must be multiples of {p}, got {height}x{width}")
        grid_h, grid_w = height // p, width // p
        patches = x.reshape(batch, channels, frames, grid_h, p, grid_w, p).permute(0, 2, 3, 5, 1, 4, 6)
        image_tokens = self.patch_embed(patches.reshape(batch, frames * grid_h * grid_w, channels * p * p))
        if cond_tokens is None:
            cond_tokens = self.cond_token_embed(labels).view(batch, c.cond_tokens, c.hidden)
        tokens = torch.cat([cond_tokens, image_tokens], dim=1)
        cond = F.silu(self.time_embed(timestep_features(t).to(x.dtype)) + self.class_embed(labels))
        layout = TokenLayout(frames=frames, height=grid_h, width=grid_w, before=cond_tokens.shape[1], after=0)
        cos, sin = rope_tables(layout, c, x.device, frame_times)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer_index, block in enumerate(self.blocks):
            tokens = block(tokens, cond, cos, sin, layout, attention_fn, layer_index)
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
        out = self.to_patches(self.final_norm(tokens[:, layout.before:]) * (1 + scale) + shift)
        out = out.view(batch, frames, grid_h, grid_w, channels, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        out = out.reshape(batch, channels, frames, height, width)
        return out if video else out[:, :, 0]


def load_proxy_model(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     weights: Path = FIXTURE_WEIGHTS) -> ProxyDiT:
    """The trained proxy model (eval mode, no gradients) from ``weights`` and the .json record beside it."""
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError("loading the proxy model needs safetensors (pip install safetensors); the quality "
                          "benchmark requires it") from error
    record = json.loads(Path(weights).with_suffix(".json").read_text())
    model = ProxyDiT(ProxyConfig(**record["config"]))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
