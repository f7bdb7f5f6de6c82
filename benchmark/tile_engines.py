"""Which engine should run tile-aligned windows: gathered tiles through torch SDPA, or FlexAttention block masks?

    python -m efficient_attention_pop.benchmark.tile_engines [--layout F,H,W ...] [--repeats 3] [--threads N]

Both compute the same attention: each query tile attends to the key tiles of its neighbourhood (the ``tiles``
backend with downsample 0 and no text: no pooled keys, so both see only whole tiles). For each layout and
neighbourhood it times, in interleaved rounds on the same q, k, v:
- ``sdpa``: dense torch SDPA over every key (the reference time);
- ``gathered``: the tiles backend (attention/backends/tiles.py): key tiles gathered per chunk, batched SDPA;
- ``flex``: torch's flex_attention, compiled, with a BlockMask whose blocks are the tiles (tokens reordered tile by
  tile, the block size the tile's token count); its first call (the compilation) is reported apart.
and checks that gathered and flex agree with each other. Speedup = sdpa time / engine time (median of the rounds'
ratios). FlexAttention needs torch >= 2.5 and, on a CPU, a C++ compiler for torch.compile; where it cannot run,
its row says why.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..attention import TokenLayout, attention
from ..attention.backends.tiles import TileGrid, neighbour_tiles, to_tiles, from_tiles

NEIGHBOURHOODS = {  # name -> tiles options (downsample 0: whole tiles only)
    "box 2x8x8, reach 1": dict(tile=8, tile_frames=2, reach=1, frame_reach=1, radial=False),
    "radial 2x8x8, reach 1": dict(tile=8, tile_frames=2, reach=1, frame_reach=1, radial=True),
    "box 4x8x8, reach 1": dict(tile=8, tile_frames=4, reach=1, frame_reach=1, radial=False),
}


def flex_engine(layout: TokenLayout, options: Dict[str, object], device) -> Tuple[Optional[object], str]:
    """(q, k, v) -> out running the neighbourhood through compiled flex_attention, or (None, why it cannot run)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        return None, f"torch {torch.__version__} has no flex_attention ({error})"
    grid = TileGrid.of(layout, options["tile_frames"], options["tile"])
    if any(size % side for size, side in zip((layout.frames, layout.height, layout.width), grid.shape)):
        return None, "the grid is not a whole number of tiles (padding would need a token mask)"
    table = neighbour_tiles(grid.counts, options["reach"], options["frame_reach"], options["radial"])
    allowed = torch.zeros(grid.tiles, grid.tiles, dtype=torch.bool, device=device)
    for query_tile, keys in enumerate(table):
        allowed[query_tile, list(keys)] = True
    length = grid.tile_tokens

    def mask_mod(batch, head, query, key):
        return allowed[query // length, key // length]

    tokens = layout.image_tokens
    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device=str(device), BLOCK_SIZE=length)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        batch, heads, _, dim = q.shape
        tiled = [to_tiles(t, layout, grid).permute(0, 3, 1, 2, 4).reshape(batch, heads, tokens, -1) for t in (q, k, v)]
        out = compiled(*tiled, block_mask=block_mask)
        return from_tiles(out.reshape(batch, heads, grid.tiles, length, -1).permute(0, 2, 3, 1, 4), layout, grid)

    return run, ""


def measure(layout: TokenLayout, name: str, options: Dict[str, object], repeats: int, batch: int, heads: int,
            dim: int, device) -> List[str]:
    """One Markdown row per engine for one layout and neighbourhood."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, layout.image_tokens, dim, generator=gen).to(device) for _ in range(3))
    engines = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
               "gathered": lambda: attention(q, k, v, heads, backend="tiles", layout=layout, skip_reshape=True,
                                             skip_output_reshape=True, downsample=0, **options)}
    notes = {}
    flex, why = flex_engine(layout, options, device)
    if flex is None:
        notes["flex"] = why
    else:
        start = time.perf_counter()
        flex_out = flex(q, k, v)
        notes["flex"] = f"first call (compiling) {time.perf_counter() - start:.1f} s"
        difference = (flex_out - engines["gathered"]()).abs().max().item()
        notes["gathered"] = f"max |gathered - flex| = {difference:.1e}"
        engines["flex"] = lambda: flex(q, k, v)
    times: Dict[str, List[float]] = {label: [] for label in engines}
    for round_index in range(repeats + 1):
        order = list(engines)[round_index % len(engines):] + list(engines)[:round_index % len(engines)]
        for label in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            engines[label]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:
                times[label].append(time.perf_counter() - start)
    keys = len(neighbour_tiles(TileGrid.of(layout, options["tile_frames"], options["tile"]).counts, options["reach"],
                               options["frame_reach"], options["radial"])[0])
    rows = []
    for label in engines:
        ratios = [exact / own for exact, own in zip(times["sdpa"], times[label])]
        rows.append(f"| {layout.frames}x{layout.height}x{layout.width} ({layout.image_tokens}) | {name} | {label} | "
                    f"{statistics.median(times[label]):.3f} | {statistics.median(ratios):.2f} "
                    f"({min(ratios):.2f}-{max(ratios):.2f}) | {notes.get(label, '')} |")
    if flex is None:
        rows.append(f"| {layout.frames}x{layout.height}x{layout.width} ({layout.image_tokens}) | {name} | flex | - | - | "
                    f"{notes['flex']} |")
    rows[0] = rows[0].replace(" | sdpa | ", f" | sdpa (first query tile: {keys} key tiles) | ", 1)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", action="append", metavar="F,H,W",
                        help="token grid (repeatable); default 16,32,32 and 32,32,32 (16k and 32k tokens)")
    parser.add_argument("--neighbourhood", action="append", choices=list(NEIGHBOURHOODS),
                        help="repeatable; default all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layouts = [TokenLayout(*map(int, text.split(","))) for text in args.layout or ("16,32,32", "32,32,32")]
    print(f"tile engines: batch {args.batch}, heads {args.heads}, head dim {args.dim}, fp32, device {device}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, {args.repeats} interleaved rounds after a warm-up")
    print("| grid (tokens) | neighbourhood | engine | median s | speedup vs sdpa (rounds) | note |")
    print("|---|---|---|---|---|---|")
    for layout in layouts:
        for name in args.neighbourhood or NEIGHBOURHOODS:
            for row in measure(layout, name, NEIGHBOURHOODS[name], args.repeats, args.batch, args.heads, args.dim,
                               device):
                print(row, flush=True)


if __name__ == "__main__":
    main()
