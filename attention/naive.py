"""Plain reference implementations: obviously right, slow, computed in float64.

Shapes: q (B, H, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv) -> out (B, H, N, Dv) in q's dtype.
Masks are the 4-D boolean or additive float masks of ``masks.py`` (broadcasting to (B, H, N, M)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)


def naive_attention(q, k, v, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    is_causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ * scale + mask) v with the full (B, H, N, M) score matrix; rows that may attend
    no key give zeros."""
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * scale
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.double()
            allowed = allowed & ~torch.isneginf(mask)
    if is_causal:
        n, m = scores.shape[-2:]
        allowed = allowed & torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows -> NaN -> 0
    return torch.einsum("bhnm,bhmd->bhnd", weights, v.double()).to(q.dtype)


def naive_linear_attention(q, k, v, allowed: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None) -> torch.Tensor:
    """Efficient Attention (Shen et al., WACV 2021) with an optional (B|1, 1, N, M) boolean ``allowed``.

    Per head: softmax of q over its feature dim (after multiplying by ``scale`` if given), softmax of
    k over the tokens query i may attend, out_i = softmax(q_i) · Σ_j softmax(k)_j ⊗ v_j.
    Materialises a (B, H, N, M, D) weight tensor: only for small test shapes.
    """
    qd = q.double() * (1.0 if scale is None else scale)
    q_soft = torch.softmax(qd, dim=-1)
    b, h, n, _ = q.shape
    m = k.shape[2]
    if allowed is None:
        allowed = torch.ones(1, 1, n, m, dtype=torch.bool, device=q.device)
    logits = k.double()[:, :, None, :, :].expand(b, h, n, m, k.shape[-1])  # (B, H, N, M, D)
    logits = logits.masked_fill(~allowed[..., None], float("-inf"))
    key_weights = torch.softmax(logits, dim=3).nan_to_num(0.0)  # over the keys each query may see
    return torch.einsum("bhnd,bhnmd,bhme->bhne", q_soft, key_weights, v.double()).to(q.dtype)


def _key_bias(key_bias: Optional[torch.Tensor], batch: int, m: int) -> torch.Tensor:
    """(B, M) float64 additive bias per key (zeros without one)."""
    return torch.zeros(batch, m, dtype=torch.float64) if key_bias is None else key_bias.double().expand(batch, m)


def _grid_index(layout, frame: int, row: int, column: int) -> int:
    return layout.before + (frame * layout.height + row) * layout.width + column


def naive_todo_attention(q, k, v, layout, downsample: int, key_bias: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None) -> torch.Tensor:
    """ToDo written out window by window: q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> (B, H, N, Dv).

    Every downsample x downsample window of every frame of the grid (cut at the edges) becomes one key and
    one value, the averages of its keys and values weighted by exp(key bias) (1 without ``key_bias``, a
    (B|1, M) additive bias, -inf = masked), with logit bias log(sum of those weights). Tokens outside the grid
    keep their own key, value and bias. Then plain softmax attention with the full score matrix, float64.
    """
    batch, heads, _, _ = q.shape
    bias = _key_bias(key_bias, batch, k.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outputs = []
    for b in range(batch):
        keys, values, logits_bias = [], [], []
        for index in range(layout.before):
            keys.append(k[b, :, index].double()), values.append(v[b, :, index].double())
            logits_bias.append(bias[b, index])
        for frame in range(layout.frames):
            for row in range(0, layout.height, downsample):
                for column in range(0, layout.width, downsample):
                    window = [_grid_index(layout, frame, r, c)
                              for r in range(row, min(row + downsample, layout.height))
                              for c in range(column, min(column + downsample, layout.width))]
                    weights = torch.exp(bias[b, window])
                    total = weights.sum()
                    safe = total if total > 0 else torch.tensor(1.0, dtype=torch.float64)
                    keys.append((weights[None, :, None] * k[b][:, window].double()).sum(1) / safe)
                    values.append((weights[None, :, None] * v[b][:, window].double()).sum(1) / safe)
                    logits_bias.append(torch.log(total))
        for index in range(layout.before + layout.image_tokens, k.shape[2]):
            keys.append(k[b, :, index].double()), values.append(v[b, :, index].double())
            logits_bias.append(bias[b, index])
        scores = torch.einsum("hnd,mhd->hnm", q[b].double(), torch.stack(keys)) * scale + torch.stack(logits_bias)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        outputs.append(torch.einsum("hnm,mhd->hnd", weights, torch.stack(values)))
    return torch.stack(outputs).to(q.dtype)


def naive_agent_attention(q, k, v, layout, agent_rows: int, agent_columns: int, agent_scale_power: float,
                          key_bias: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Agent attention written out: q (B, H, N, D), k (B, H, N, D), v (B, H, N, Dv) on one layout -> (B, H, N, Dv).

    Agents: per frame, an agent_rows x agent_columns grid of query averages over adaptive windows (rows
    floor(i*h/a) to ceil((i+1)*h/a), likewise columns). Agents attend to every key with the scale (and
    ``key_bias``, (B|1, M)); image queries attend to the agents with scale ** agent_scale_power; queries
    outside the grid attend to every key. Full score matrices, float64.
    """
    batch = q.shape[0]
    bias = _key_bias(key_bias, batch, k.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    agents = []
    for frame in range(layout.frames):
        for i in range(agent_rows):
            for j in range(agent_columns):
                rows = range(i * layout.height // agent_rows, -(-(i + 1) * layout.height // agent_rows))
                columns = range(j * layout.width // agent_columns, -(-(j + 1) * layout.width // agent_columns))
                window = [_grid_index(layout, frame, r, c) for r in rows for c in columns]
                agents.append(qd[:, :, window].mean(dim=2))
    agent = torch.stack(agents, dim=2)  # (B, H, A, D)
    agent_weights = torch.softmax(torch.einsum("bhad,bhmd->bham", agent, kd) * scale + bias[:, None, None], dim=-1)
    agent_values = torch.einsum("bham,bhme->bhae", agent_weights.nan_to_num(0.0), vd)
    out = torch.softmax(torch.einsum("bhnd,bhad->bhna", qd, agent) * scale ** agent_scale_power, dim=-1)
    out = torch.einsum("bhna,bhae->bhne", out, agent_values)
    exact = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", qd, kd) * scale + bias[:, None, None], dim=-1)
    exact = torch.einsum("bhnm,bhme->bhne", exact.nan_to_num(0.0), vd)
    image = torch.zeros(q.shape[2], dtype=torch.bool)
    image[layout.before:layout.before + layout.image_tokens] = True
    return torch.where(image[None, None, :, None], out, exact).to(q.dtype)


def naive_window_attention(q, k, v, layout, window: int, downsample: int, halo: int,
                           key_bias: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Local neighbourhood + pooled keys written out query by query: q, k (B, H, N, D), v (B, H, N, Dv) on one layout.

    An image query at (frame, row, column) lies in block (row // window, column // window); its neighbourhood is
    the block grown by ``halo`` on every side. It attends to the grid tokens of its neighbourhood at full
    resolution, to every downsample x downsample window of the grid not inside the neighbourhood pooled as
    naive_todo_attention pools it (weights exp(key bias), bias log of their sum), and to the tokens outside the
    grid. Queries outside the grid attend to every key. float64.
    """
    batch = q.shape[0]
    bias = _key_bias(key_bias, batch, k.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    exact = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", qd, kd) * scale + bias[:, None, None], dim=-1)
    out = torch.einsum("bhnm,bhme->bhne", exact.nan_to_num(0.0), vd)
    others = list(range(layout.before)) + list(range(layout.before + layout.image_tokens, k.shape[2]))
    for b in range(batch):
        pooled = []  # (frame, its rows, its columns, key, value, bias)
        for frame in range(layout.frames):
            for row in range(0, layout.height, downsample):
                for column in range(0, layout.width, downsample):
                    rows = range(row, min(row + downsample, layout.height))
                    columns = range(column, min(column + downsample, layout.width))
                    cells = [_grid_index(layout, frame, r, c) for r in rows for c in columns]
                    weights = torch.exp(bias[b, cells])
                    total = weights.sum()
                    safe = total if total > 0 else torch.tensor(1.0, dtype=torch.float64)
                    pooled.append((frame, rows, columns, (weights[None, :, None] * kd[b][:, cells]).sum(1) / safe,
                                   (weights[None, :, None] * vd[b][:, cells]).sum(1) / safe, torch.log(total)))
        for frame in range(layout.frames):
            for row in range(layout.height):
                for column in range(layout.width):
                    top, left = (row // window) * window - halo, (column // window) * window - halo
                    near_rows = range(max(0, top), min(layout.height, top + window + 2 * halo))
                    near_columns = range(max(0, left), min(layout.width, left + window + 2 * halo))
                    local = [_grid_index(layout, frame, r, c) for r in near_rows for c in near_columns]
                    far = [entry for entry in pooled if not (entry[0] == frame and set(entry[1]) <= set(near_rows)
                                                             and set(entry[2]) <= set(near_columns))]
                    keys = torch.cat([kd[b][:, others + local]] + [e[3][:, None] for e in far], 1)
                    values = torch.cat([vd[b][:, others + local]] + [e[4][:, None] for e in far], 1)
                    logits_bias = torch.cat([bias[b, others + local]] + [e[5][None] for e in far])
                    query = _grid_index(layout, frame, row, column)
                    scores = torch.einsum("hd,hmd->hm", qd[b, :, query], keys) * scale + logits_bias
                    out[b, :, query] = torch.einsum("hm,hme->he", torch.softmax(scores, -1).nan_to_num(0.0), values)
    return out.to(q.dtype)


def naive_tile_attention(q, k, v, layout, tile_frames: int, tile: int, reach: int, frame_reach: int, radial: bool,
                         downsample: int, key_bias: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None) -> torch.Tensor:
    """Tile-aligned 3-D windows written out query by query: q, k (B, H, N, D), v (B, H, N, Dv) on one layout.

    The grid is cut into tiles of min(tile_frames, F) x min(tile, h) x min(tile, w) tokens. An image query in tile
    (a, b, c) attends to every grid token whose tile (a', b', c') has a' among the 2 frame_reach + 1 frame tiles
    around a and b', c' among the 2 r + 1 tiles around b, c (r = reach, or with ``radial`` max(0, reach - |a' - a|)),
    each run of tiles slid inwards to fit the grid; to every downsample x downsample window of each frame whose
    tile is not one of those, pooled as naive_todo_attention pools it (none when downsample is 0); and to the
    tokens outside the grid. Queries outside the grid attend to every key. float64.
    """
    bias = _key_bias(key_bias, q.shape[0], k.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    exact = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", qd, kd) * scale + bias[:, None, None], dim=-1)
    out = torch.einsum("bhnm,bhme->bhne", exact.nan_to_num(0.0), vd)
    others = list(range(layout.before)) + list(range(layout.before + layout.image_tokens, k.shape[2]))
    sizes = (layout.frames, layout.height, layout.width)
    sides = (min(tile_frames, sizes[0]), min(tile, sizes[1]), min(tile, sizes[2]))
    counts = [-(-size // side) for size, side in zip(sizes, sides)]

    def run_of(index, radius, count):  # the tiles along one axis around index, slid inwards
        width = min(2 * radius + 1, count)
        start = min(max(index - radius, 0), count - width)
        return set(range(start, start + width))

    def tile_of(frame, row, column):  # (frame tile, row tile, column tile)
        return frame // sides[0], row // sides[1], column // sides[2]

    for b in range(q.shape[0]):
        pooled = []  # (tile, key, value, bias)
        for frame in range(layout.frames if downsample else 0):
            for row in range(0, layout.height, downsample):
                for column in range(0, layout.width, downsample):
                    cells = [_grid_index(layout, frame, r, c) for r in range(row, min(row + downsample, layout.height))
                             for c in range(column, min(column + downsample, layout.width))]
                    weights = torch.exp(bias[b, cells])
                    safe, total = weights.sum().clamp_min(1e-300), weights.sum()
                    pooled.append((tile_of(frame, row, column), (weights[None, :, None] * kd[b][:, cells]).sum(1) / safe,
                                   (weights[None, :, None] * vd[b][:, cells]).sum(1) / safe, torch.log(total)))
        for frame in range(layout.frames):
            for row in range(layout.height):
                for column in range(layout.width):
                    a, tb, tc = tile_of(frame, row, column)
                    near = set()
                    for a_key in run_of(a, frame_reach, counts[0]):
                        radius = max(0, reach - abs(a_key - a)) if radial else reach
                        near |= {(a_key, b_key, c_key) for b_key in run_of(tb, radius, counts[1])
                                 for c_key in run_of(tc, radius, counts[2])}
                    local = [_grid_index(layout, f, r, c) for f in range(layout.frames) for r in range(layout.height)
                             for c in range(layout.width) if tile_of(f, r, c) in near]
                    far = [entry for entry in pooled if entry[0] not in near]
                    keys = torch.cat([kd[b][:, others + local]] + [e[1][:, None] for e in far], 1)
                    values = torch.cat([vd[b][:, others + local]] + [e[2][:, None] for e in far], 1)
                    logits_bias = torch.cat([bias[b, others + local]] + [e[3][None] for e in far])
                    query = _grid_index(layout, frame, row, column)
                    scores = torch.einsum("hd,hmd->hm", qd[b, :, query], keys) * scale + logits_bias
                    out[b, :, query] = torch.einsum("hm,hme->he", torch.softmax(scores, -1).nan_to_num(0.0), values)
    return out.to(q.dtype)


def naive_regional_mask(segments, masks: torch.Tensor, queries, keys, isolate: bool, base_weight: float,
                        pooling: str = "area") -> torch.Tensor:
    """The (N, M) additive mask (0, log(base_weight), -inf) of regional prompts (regional.RegionalPrompt), token
    pair by token pair from each token's kind. ``queries``/``keys``: regional.TokenMap; masks (R, 1 or F, H, W)
    with H, W multiples of every grid (so a cell's pixels are a plain block)."""
    bounds = torch.tensor(list(segments)).cumsum(0).tolist()

    def kind(side, t):
        if side.text_length and side.text_start <= t < side.text_start + side.text_length:
            place = (t - side.text_start) % bounds[-1]
            return "text", next(i for i, end in enumerate(bounds) if place < end)
        grid = side.image
        if grid is None or not grid.before <= t < grid.before + grid.image_tokens:
            return "other", None
        frame, cell = divmod(t - grid.before, grid.height * grid.width)
        row, col = divmod(cell, grid.width)
        ch, cw = masks.shape[-2] // grid.height, masks.shape[-1] // grid.width
        covered = set()
        for region in range(masks.shape[0]):
            block = masks[region, frame if masks.shape[1] > 1 else 0, row * ch:(row + 1) * ch, col * cw:(col + 1) * cw]
            inside = (block >= 0.5).double()
            if (inside.max() > 0) if pooling == "max" else (inside.mean() >= 0.5):
                covered.add(region + 1)
        return "image", frozenset(covered)

    def pair(q, k):
        (qk, qv), (kk, kv) = q, k
        if kk == "other" or qk == "other":
            return 0.0 if kk == "other" or not isolate else float("-inf")
        if qk == "text" and kk == "text":
            ok = qv == kv
        elif qk == "text":
            ok = (qv in kv) if qv else not isolate
        elif kk == "text" and kv == 0:
            if qv and segments[0]:
                return math.log(base_weight) if base_weight > 0 else float("-inf")
            ok = True
        elif kk == "text":
            ok = kv in qv
        else:
            ok = not isolate or bool(qv & kv) or (not qv and not kv)
        return 0.0 if ok else float("-inf")

    query_kinds = [kind(queries, t) for t in range(queries.tokens)]
    key_kinds = [kind(keys, t) for t in range(keys.tokens)]
    return torch.tensor([[pair(q, k) for k in key_kinds] for q in query_kinds], dtype=torch.float64)
