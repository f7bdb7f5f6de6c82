"""ProxyDiT: a small Flux-like diffusion transformer on pixels, a proxy with learned attention.

Layout of one forward pass at an H x W image (H, W multiples of 2):
- 2x2 patches -> (H/2)*(W/2) image tokens; the class label -> ``cond_tokens`` learned tokens ("text")
  placed before them, as Flux puts its text tokens before the image.
- ``depth`` single-stream blocks (Flux's single blocks): adaLN modulation from timestep + class, one
  linear to q, k, v and the MLP input, joint attention over [cond tokens, image tokens] with per-head
  RMS-norm on q and k and 2-D rotary positions (row, column) on image tokens (cond tokens sit at (0, 0),
  i.e. unrotated), then attention and MLP outputs merged by one linear and gated into the residual.
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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, 2 * TIME_FREQUENCIES) sinusoidal features of 1000 t."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(TIME_FREQUENCIES, device=t.device) / TIME_FREQUENCIES)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_tables(layout: TokenLayout, head_dim: int, theta: float,
                device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotation angles, each (N_total, head_dim / 2): one angle per pair of channels.

    The first half of the pairs turns with the token's row, the second half with its column; the
    ``layout.before`` cond tokens get angle 0 (position (0, 0), no rotation).
    """
    pairs_per_axis = head_dim // 4
    freqs = theta ** (-torch.arange(pairs_per_axis, device=device, dtype=torch.float32) / pairs_per_axis)
    rows = torch.arange(layout.height, device=device, dtype=torch.float32).repeat_interleave(layout.width)
    cols = torch.arange(layout.width, device=device, dtype=torch.float32).repeat(layout.height)
    image_angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)
    angles = torch.cat([image_angles.new_zeros(layout.before, head_dim // 2), image_angles])
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
                attention_fn: Optional[AttentionFn] = None, cond_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, H, W) noisy image, t (B,) in [0, 1] (1 = pure noise), labels (B,) int in
        [0, num_classes] (num_classes = no class) -> velocity (B, C, H, W). ``cond_tokens`` (B, n, hidden): other
        cond tokens than the labels' (several classes' tokens side by side, for regional prompts); the labels
        still modulate.

        attention_fn(q, k, v, layout, layer_index): q, k, v (B, heads, N_total, head_dim) after QK-norm
        and rotary, N_total = cond_tokens + (H/2)*(W/2), layout = TokenLayout(1, H/2, W/2,
        before=cond_tokens); returns (B, heads, N_total, head_dim). None: torch SDPA.
        """
        c, p = self.config, self.config.patch
        batch, channels, height, width = x.shape
        if height % p or width % p:
            raise ValueError(f"image height and width must be multiples of {p}, got {height}x{width}")
        grid_h, grid_w = height // p, width // p
        patches = x.view(batch, channels, grid_h, p, grid_w, p).permute(0, 2, 4, 1, 3, 5)
        image_tokens = self.patch_embed(patches.reshape(batch, grid_h * grid_w, channels * p * p))
        if cond_tokens is None:
            cond_tokens = self.cond_token_embed(labels).view(batch, c.cond_tokens, c.hidden)
        tokens = torch.cat([cond_tokens, image_tokens], dim=1)
        cond = F.silu(self.time_embed(timestep_features(t).to(x.dtype)) + self.class_embed(labels))
        layout = TokenLayout(frames=1, height=grid_h, width=grid_w, before=cond_tokens.shape[1], after=0)
        cos, sin = rope_tables(layout, c.head_dim, c.rope_theta, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer_index, block in enumerate(self.blocks):
            tokens = block(tokens, cond, cos, sin, layout, attention_fn, layer_index)
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
        out = self.to_patches(self.final_norm(tokens[:, layout.before:]) * (1 + scale) + shift)
        out = out.view(batch, grid_h, grid_w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)


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
