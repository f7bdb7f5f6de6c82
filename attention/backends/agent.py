"""Agent attention (Han et al., ECCV 2024, "Agent Attention: On the Integration of Softmax and Linear
Attention"): a few agent tokens, pooled from the image queries, first attend to every key (softmax), then
every image query attends to the agents (softmax). O(N x agents) instead of O(N x M).

As AgentSD applies it to Stable Diffusion without training, the second softmax uses the scale
head_dim ** (-0.5 * AGENT_SCALE_POWER), sharper than the first. AgentSD also adds 0.075 x v of the query's
own token to the output; on the quality benchmark's trained model that made every image worse (e.g. 64 px,
256 agents: 21.0 / 18.7 dB PSNR with it, 25.5 / 23.3 dB without), so it is left out. Queries outside the
image grid (joint text) attend to every key exactly: they are few.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from .base import KEY_PADDING, AttentionCall, Backend, compute_dtype
from .sdpa import sdpa_dense
from .todo import grid_region_reason, key_padding_bias, layout_reasons, self_attention_reasons

AGENT_SCALE_POWER = 0.3  # AgentSD's k_scale2: the query-agent softmax uses scale ** 0.3


def agent_grid(layout: TokenLayout, agents: int) -> Tuple[int, int]:
    """Agents per frame as a grid close to the image's aspect ratio: (rows, columns), at most the grid's size."""
    rows = min(layout.height, max(1, round(math.sqrt(agents * layout.height / layout.width))))
    columns = min(layout.width, max(1, round(agents / rows)))
    return rows, columns


def agent_tokens(q: torch.Tensor, layout: TokenLayout, agents: int) -> torch.Tensor:
    """Image queries (B, H, F*h*w, D) averaged over an adaptive agent grid per frame -> (B, H, F*a_h*a_w, D)."""
    batch, heads, _, dim = q.shape
    rows, columns = agent_grid(layout, agents)
    grid = q.reshape(batch * heads * layout.frames, layout.height, layout.width, dim).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, (rows, columns))  # (B*H*F, D, rows, columns)
    return pooled.permute(0, 2, 3, 1).reshape(batch, heads, layout.frames * rows * columns, dim)


def agent_attention(call: AttentionCall, layout: TokenLayout, agents: int) -> torch.Tensor:
    """(B, H, N, Dv) in q's dtype; queries and keys on the same layout (self-attention)."""
    work = compute_dtype(call.q)
    q, k, v = call.q.to(work), call.k.to(work), call.v.to(work)
    grid = slice(layout.before, layout.before + layout.image_tokens)
    key_bias = key_padding_bias(call)
    mask = None if key_bias is None else key_bias[:, None, None, :].to(work)
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    agent = agent_tokens(q[:, :, grid], layout, agents)
    agent_values = sdpa_dense(agent, k, v, mask, scale)  # agents attend to every key
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=work, device=q.device)
    out[:, :, grid] = F.scaled_dot_product_attention(q[:, :, grid], agent, agent_values, scale=scale ** AGENT_SCALE_POWER)
    for others in (slice(0, layout.before), slice(grid.stop, q.shape[2])):
        if others.stop > others.start:  # text queries: exact
            out[:, :, others] = sdpa_dense(q[:, :, others], k, v, mask, scale)
    return out.to(call.q.dtype)


class AgentBackend(Backend):
    name = "agent"
    exact = False
    description = ("approximate; agent attention (Han et al. 2024) as AgentSD applies it: agent tokens pooled from "
                   "the image queries attend to every key, queries attend to the agents; O(N x agents); needs a "
                   "layout and self-attention")
    option_defaults = {"agents": 256}
    not_in_node = ("on the quality benchmark's trained model its images fall short of window's at the same speed "
                   "(docs/quality.md), so it stays in the library")
    benchmark_options = ({"agents": 64}, {"agents": 256}, {"agents": 1024})
    causal = False
    dense_masks = KEY_PADDING
    region_masks = grid_region_reason("pooling queries into agents")

    def not_supported_reasons(self, call: AttentionCall):
        reasons = super().not_supported_reasons(call) + layout_reasons(call) + self_attention_reasons(call)
        agents = self.option(call, "agents")
        if not isinstance(agents, int) or isinstance(agents, bool) or agents < 1:
            reasons.append(f"agents={agents!r}; expected a positive integer")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        return agent_attention(call.with_kv_heads_repeated(), call.layout, self.option(call, "agents"))
