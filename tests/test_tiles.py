"""The tile-aligned 3-D window backend (``tiles``) against its written-out reference naive_tile_attention and torch SDPA.

Uneven grids, frame counts that the tile does not divide, text before and after the image, box and radial
neighbourhoods, with and without pooled keys, every mask form it accepts (none, boolean and additive key padding),
chunked or not; where the neighbourhood is the whole grid it is exact attention; what it refuses, with the reasons.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attention_pop.attention import BACKENDS, RegionMask, TokenLayout, attention, explain, why_not
from efficient_attention_pop.attention.backends import tiles as tiles_backend
from efficient_attention_pop.attention.backends.tiles import TileGrid, neighbour_tiles
from efficient_attention_pop.attention.naive import naive_tile_attention

from helpers import assert_close, on_device

attention = on_device(attention)

layouts = st.builds(TokenLayout, frames=st.integers(1, 7), height=st.integers(1, 11), width=st.integers(1, 11),
                    before=st.integers(0, 4), after=st.integers(0, 3))
tile_options = st.fixed_dictionaries({
    "tile": st.sampled_from([4, 8]), "tile_frames": st.integers(1, 4), "reach": st.integers(0, 2),
    "frame_reach": st.integers(0, 2), "radial": st.booleans(), "downsample": st.sampled_from([0, 2, 4])})


def inputs(layout, batch=2, heads=2, dim=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    m = layout.before + layout.image_tokens + layout.after
    return tuple(torch.randn(batch, heads, m, dim, generator=gen).to(dtype) for _ in range(3))


def run(q, k, v, layout, mask=None, **options):
    return attention(q, k, v, q.shape[1], mask, backend="tiles", layout=layout, skip_reshape=True,
                     skip_output_reshape=True, **options)


def key_padding(layout, batch, seed, boolean=True):
    """(B, 1, 1, M) key padding (boolean, or additive with finite biases too) and its (B, M) additive bias."""
    gen = torch.Generator().manual_seed(seed)
    m = layout.before + layout.image_tokens + layout.after
    keep = torch.rand(batch, m, generator=gen) < 0.7
    keep[-1, layout.before:layout.before + min(4, layout.image_tokens)] = False  # a masked first tile corner
    bias = torch.zeros(batch, m).masked_fill(~keep, float("-inf"))
    if boolean:
        return keep[:, None, None, :], bias
    bias = bias + torch.randn(batch, m, generator=gen) * 0.5 * keep  # finite biases beside the -inf ones
    return bias[:, None, None, :], bias


@settings(max_examples=60, deadline=None)
@given(layout=layouts, options=tile_options, masked=st.sampled_from(["none", "bool", "additive"]),
       seed=st.integers(0, 99))
def test_tiles_match_their_reference(layout, options, masked, seed):
    q, k, v = inputs(layout, seed=seed)
    mask, bias = (None, None) if masked == "none" else key_padding(layout, 2, seed, masked == "bool")
    out = run(q, k, v, layout, mask, **options)
    assert_close(out, naive_tile_attention(q, k, v, layout, key_bias=bias, **options), torch.float32, "tiles")


@pytest.mark.parametrize("layout, options", [
    (TokenLayout(5, 12, 20, before=4, after=3), dict(tile=8, tile_frames=2, reach=1, frame_reach=1, radial=False,
                                                     downsample=4)),  # rows, columns, frames all uneven
    (TokenLayout(6, 16, 16), dict(tile=4, tile_frames=4, reach=1, frame_reach=1, radial=True, downsample=2)),
    (TokenLayout(3, 9, 7, before=2), dict(tile=4, tile_frames=1, reach=0, frame_reach=0, radial=False, downsample=0)),
])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_many_tiles_in_chunks_match_their_reference(monkeypatch, layout, options, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(tiles_backend, "CHUNK_BYTES", chunk_bytes)  # one query tile per SDPA call
    q, k, v = inputs(layout, seed=4)
    mask, bias = key_padding(layout, 2, 4)
    assert_close(run(q, k, v, layout, mask, **options), naive_tile_attention(q, k, v, layout, key_bias=bias, **options),
                 torch.float32, "tiles")


def test_a_neighbourhood_of_the_whole_grid_is_exact_attention():
    layout = TokenLayout(4, 8, 8, before=3, after=2)
    q, k, v = inputs(layout, heads=3)
    out = run(q, k, v, layout, tile=4, tile_frames=2, reach=1, frame_reach=1, radial=False, downsample=2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_far_keys_are_pooled_and_near_keys_exact():
    """A change to a key far from a query tile moves that tile's output only through its pooled key (not at all
    without pooling); a change inside the neighbourhood moves it."""
    layout = TokenLayout(8, 16, 16)
    options = dict(tile=4, tile_frames=2, reach=1, frame_reach=0, radial=False)
    q, k, v = inputs(layout, batch=1)
    far = 7 * 256 + 15 * 16 + 15  # last frame, bottom-right corner: far from the first tile
    moved = v.clone()
    moved[:, :, far] += 10.0
    first_tile = [f * 256 + r * 16 + c for f in range(2) for r in range(4) for c in range(4)]
    for downsample, changes in ((0, False), (4, True)):
        before = run(q, k, v, layout, downsample=downsample, **options)[:, :, first_tile]
        after = run(q, k, moved, layout, downsample=downsample, **options)[:, :, first_tile]
        assert bool((before - after).abs().max() > 1e-4) == changes
    near = 1 * 256 + 5 * 16 + 5  # frame 1, inside the 3 x 3 tiles around the first tile
    moved = v.clone()
    moved[:, :, near] += 10.0
    before = run(q, k, v, layout, downsample=0, **options)[:, :, first_tile]
    assert (before - run(q, k, moved, layout, downsample=0, **options)[:, :, first_tile]).abs().max() > 1e-2


def test_edge_tiles_read_as_many_key_tiles_as_the_middle_ones():
    """STA's sliding window: a box at the grid's edge slides inwards, so every query tile reads the same count."""
    table = neighbour_tiles((4, 5, 6), 1, 1, False)
    assert {len(keys) for keys in table} == {27}
    assert table[0] == tuple(sorted((a * 5 + b) * 6 + c for a in range(3) for b in range(3) for c in range(3)))
    # radial: 5 x 5 tiles in its own frame tile, 3 x 3 one frame tile away, 1 x 1 two away; the first and last
    # frame tiles' windows slide inwards, so they read frame tiles 0, 1, 2 away (the empty tile pads them)
    radial = neighbour_tiles((4, 5, 6), 2, 1, True)
    assert [len(radial[a * 30]) for a in range(4)] == [25 + 9 + 1, 9 + 25 + 9, 9 + 25 + 9, 1 + 9 + 25]
    assert TileGrid.of(TokenLayout(5, 12, 20), 2, 8).counts == (3, 2, 3)


def test_fully_masked_keys_give_zeros_not_nan():
    layout = TokenLayout(3, 8, 8, before=2)
    q, k, v = inputs(layout)
    mask = torch.zeros(2, 1, 1, 2 + 192, dtype=torch.bool)
    out = run(q, k, v, layout, mask, tile=4, tile_frames=1, reach=0, frame_reach=0, radial=False, downsample=2)
    assert torch.isfinite(out).all() and out.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    layout = TokenLayout(3, 10, 9, before=4)
    q, k, v = inputs(layout, dtype=dtype)
    options = dict(tile=4, tile_frames=2, reach=1, frame_reach=0, radial=False, downsample=2)
    out = run(q, k, v, layout, **options)
    assert out.dtype == dtype
    assert_close(out, naive_tile_attention(q.float(), k.float(), v.float(), layout, **options), dtype, "tiles")


def test_grouped_query_keys_serve_as_if_repeated():
    layout = TokenLayout(2, 8, 8, before=3)
    q, k, v = inputs(layout, heads=4, seed=5)
    k, v = k[:, :2], v[:, :2]
    options = dict(tile=4, tile_frames=1, reach=1, frame_reach=0, radial=False, downsample=2)
    grouped = attention(q, k, v, 4, backend="tiles", layout=layout, skip_reshape=True, skip_output_reshape=True,
                        enable_gqa=True, **options)
    assert_close(grouped, run(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), layout, **options),
                 torch.float32, "tiles with GQA")


def test_refusals_say_why_and_auto_never_picks_it():
    layout = TokenLayout(2, 4, 4, before=2)
    q, k, v = inputs(layout)
    assert any("needs the token layout" in r for r in why_not("tiles", q, k, v, 2, skip_reshape=True))
    assert any("6 queries and 34 keys" in r for r in why_not("tiles", q[:, :, :6], k, v, 2, skip_reshape=True,
                                                             layout=layout))
    labels = torch.zeros(1, 34, dtype=torch.long)
    assert any("region masks are not supported" in r
               for r in why_not("tiles", q, k, v, 2, RegionMask(labels, labels), skip_reshape=True, layout=layout))
    assert any("tile=6" in r for r in why_not("tiles", q, k, v, 2, skip_reshape=True, layout=layout, tile=6))
    assert any("does not divide tile=4" in r
               for r in why_not("tiles", q, k, v, 2, skip_reshape=True, layout=layout, tile=4, downsample=8))
    assert any("tile_frames=0" in r for r in why_not("tiles", q, k, v, 2, skip_reshape=True, layout=layout,
                                                     tile_frames=0))
    assert any("not a key-padding mask" in r for r in why_not("tiles", q, k, v, 2, torch.ones(34, 34, dtype=torch.bool),
                                                              skip_reshape=True, layout=layout))
    assert not BACKENDS["tiles"].exact
    explanation = explain(q, k, v, 2, skip_reshape=True, layout=layout)
    assert explanation.chosen == "sdpa"
    assert explanation.passed_over["tiles"] == ["approximate: used only when asked for by name"]
