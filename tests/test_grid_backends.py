"""The approximate backends that need a token layout: todo (pooled keys), agent (agent tokens) and window
(local windows at full resolution plus pooled distant keys).

Each against its written-out reference in naive.py over many layouts, dtypes and key-padding masks; todo and
window against torch SDPA where they lose nothing (keys and values constant on every pooling window; one window
covering the whole grid); what each refuses, with the reasons; and that "auto" never picks them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attention_pop.attention import BACKENDS, RegionMask, TokenLayout, attention, explain, why_not
from efficient_attention_pop.attention.backends.agent import AGENT_SCALE_POWER, agent_grid
from efficient_attention_pop.attention.backends import window as window_backend
from efficient_attention_pop.attention.backends.window import halo_for
from efficient_attention_pop.attention.naive import naive_agent_attention, naive_todo_attention, naive_window_attention

from helpers import assert_close, on_device

attention = on_device(attention)  # EFFICIENT_ATTENTION_POP_DEVICE=cuda: the calls under test run on CUDA

layouts = st.builds(TokenLayout, frames=st.integers(1, 2), height=st.integers(1, 9), width=st.integers(1, 9),
                    before=st.integers(0, 5), after=st.integers(0, 4))


def split_inputs(layout, batch=2, heads=2, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = layout.before + layout.image_tokens + layout.after
    return tuple(torch.randn(batch, heads, m, dim, generator=gen).to(dtype) for _ in range(3))


def run(backend, q, k, v, mask=None, **options):
    return attention(q, k, v, q.shape[1], mask, backend=backend, skip_reshape=True, skip_output_reshape=True,
                     **options)


def padding_mask(layout, batch, gen, p_keep=0.7):
    """(B, 1, 1, M) boolean key padding with a fully masked first window in batch 1."""
    m = layout.before + layout.image_tokens + layout.after
    keep = torch.rand(batch, 1, 1, m, generator=gen) < p_keep
    keep[-1, ..., layout.before] = False
    return keep, torch.zeros(batch, m).masked_fill(~keep[:, 0, 0], float("-inf"))


@settings(max_examples=40, deadline=None)
@given(layout=layouts, downsample=st.sampled_from([2, 3, 4]), masked=st.booleans(), seed=st.integers(0, 99))
def test_todo_matches_its_reference(layout, downsample, masked, seed):
    q, k, v = split_inputs(layout, seed=seed)
    mask, key_bias = padding_mask(layout, 2, torch.Generator().manual_seed(seed)) if masked else (None, None)
    out = run("todo", q, k, v, mask, layout=layout, downsample=downsample)
    assert_close(out, naive_todo_attention(q, k, v, layout, downsample, key_bias), torch.float32, "todo")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_todo_half_precision(dtype):
    layout = TokenLayout(1, 6, 10, before=4)
    q, k, v = split_inputs(layout, dtype=dtype)
    out = run("todo", q, k, v, layout=layout, downsample=2)
    assert out.dtype == dtype
    assert_close(out, naive_todo_attention(q.float(), k.float(), v.float(), layout, 2), dtype, "todo half")


@pytest.mark.parametrize("downsample", [2, 3, 4])
def test_todo_is_exact_where_windows_are_constant(downsample):
    """Keys and values equal on every window: pooling loses nothing, so todo equals exact SDPA, text tokens
    included; it does only because each pooled key carries log(window size) (checked by removing it)."""
    layout = TokenLayout(2, 2 * downsample, 3 * downsample, before=5, after=3)
    q, k, v = split_inputs(layout, heads=3, seed=4)
    coarse = torch.randn(2, 3, layout.frames, 2, 3, 8, generator=torch.Generator().manual_seed(5))
    grid = coarse.repeat_interleave(downsample, 3).repeat_interleave(downsample, 4).flatten(2, 4)
    image = slice(layout.before, layout.before + layout.image_tokens)
    k[:, :, image], v[:, :, image] = grid, grid * 0.5 + 1
    out = run("todo", q, k, v, layout=layout, downsample=downsample)
    exact = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    without_bias = naive_todo_attention(q, k, v, layout, downsample, key_bias=_without_count_bias(layout, downsample))
    assert (without_bias - exact).abs().max() > 1e-2


def _without_count_bias(layout, downsample):
    """A key bias that cancels log(window size) for every full window (so the pooled keys lose their mass)."""
    bias = torch.zeros(1, layout.before + layout.image_tokens + layout.after)
    bias[:, layout.before:layout.before + layout.image_tokens] = -2 * torch.log(torch.tensor(float(downsample)))
    return bias


@settings(max_examples=30, deadline=None)
@given(layout=layouts, agents=st.integers(1, 30), masked=st.booleans(), seed=st.integers(0, 99))
def test_agent_matches_its_reference(layout, agents, masked, seed):
    q, k, v = split_inputs(layout, seed=seed)
    mask, key_bias = padding_mask(layout, 2, torch.Generator().manual_seed(seed)) if masked else (None, None)
    out = run("agent", q, k, v, mask, layout=layout, agents=agents)
    rows, columns = agent_grid(layout, agents)
    assert rows * columns <= layout.height * layout.width
    reference = naive_agent_attention(q, k, v, layout, rows, columns, AGENT_SCALE_POWER, key_bias)
    assert_close(out, reference, torch.float32, "agent")


@settings(max_examples=25, deadline=None)
@given(layout=layouts, window=st.sampled_from([8, 16]), downsample=st.sampled_from([2, 4]), masked=st.booleans(),
       seed=st.integers(0, 99))
def test_window_matches_its_reference(layout, window, downsample, masked, seed):
    q, k, v = split_inputs(layout, seed=seed)
    mask, key_bias = padding_mask(layout, 2, torch.Generator().manual_seed(seed)) if masked else (None, None)
    out = run("window", q, k, v, mask, layout=layout, window=window, downsample=downsample)
    reference = naive_window_attention(q, k, v, layout, window, downsample, halo_for(window, downsample), key_bias)
    assert_close(out, reference, torch.float32, "window")


@pytest.mark.parametrize("layout, window, downsample", [
    (TokenLayout(2, 16, 16, before=3, after=2), 8, 2),   # windows tile the grid: written in place, no padding
    (TokenLayout(1, 32, 16), 8, 4),                      # several blocks per row and column, one frame
    (TokenLayout(1, 20, 36, before=4), 16, 4),           # edge blocks padded
])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_window_on_many_blocks_matches_its_reference(monkeypatch, layout, window, downsample, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(window_backend, "CHUNK_BYTES", chunk_bytes)  # one block per SDPA call
    q, k, v = split_inputs(layout, seed=3)
    mask, key_bias = padding_mask(layout, 2, torch.Generator().manual_seed(3))
    out = run("window", q, k, v, mask, layout=layout, window=window, downsample=downsample)
    reference = naive_window_attention(q, k, v, layout, window, downsample, halo_for(window, downsample), key_bias)
    assert_close(out, reference, torch.float32, "window")


def test_window_in_chunks_of_blocks(monkeypatch):
    """Many blocks, a few per SDPA call: the same result as all blocks in one call."""
    layout = TokenLayout(2, 24, 20, before=3)
    q, k, v = split_inputs(layout)
    whole = run("window", q, k, v, layout=layout, window=8, downsample=2)
    monkeypatch.setattr(window_backend, "CHUNK_BYTES", 1)
    torch.testing.assert_close(run("window", q, k, v, layout=layout, window=8, downsample=2), whole)


def test_window_covering_the_grid_is_exact():
    layout = TokenLayout(1, 7, 8, before=4, after=2)
    q, k, v = split_inputs(layout, heads=3)
    torch.testing.assert_close(run("window", q, k, v, layout=layout, window=8, downsample=2),
                               F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_fully_masked_keys_give_zeros_not_nan():
    layout = TokenLayout(1, 4, 4, before=2)
    q, k, v = split_inputs(layout)
    mask = torch.zeros(2, 1, 1, 18, dtype=torch.bool)
    for backend, options in (("todo", dict(downsample=2)), ("agent", dict(agents=4)), ("window", dict(window=8))):
        out = run(backend, q, k, v, mask, layout=layout, **options)
        assert torch.isfinite(out).all()
    assert run("todo", q, k, v, mask, layout=layout).abs().max() == 0
    assert run("window", q, k, v, mask, layout=layout).abs().max() == 0


def test_refusals_say_why():
    layout = TokenLayout(1, 4, 4, before=2)
    q, k, v = split_inputs(layout)
    reasons = why_not("todo", q, k, v, 2, skip_reshape=True)
    assert any("needs the token layout of the keys" in r for r in reasons)
    wrong = TokenLayout(1, 4, 5)
    assert any("accounts for 20 tokens, but the keys are 18" in r for r in why_not("todo", q, k, v, 2, skip_reshape=True,
                                                                                   layout=wrong))
    labels = torch.zeros(1, 18, dtype=torch.long)
    reasons = why_not("todo", q, k, v, 2, RegionMask(labels, labels), skip_reshape=True, layout=layout)
    assert any("region masks are not supported" in r for r in reasons)
    dense = torch.ones(18, 18, dtype=torch.bool)
    assert any("not a key-padding mask" in r for r in why_not("agent", q, k, v, 2, dense, skip_reshape=True,
                                                               layout=layout))
    assert any("is_causal" in r for r in why_not("todo", q, k, v, 2, skip_reshape=True, layout=layout, is_causal=True))
    assert any("downsample=5" in r for r in why_not("todo", q, k, v, 2, skip_reshape=True, layout=layout, downsample=5))
    for name in ("agent", "window"):
        assert any("6 queries and 18 keys" in r for r in why_not(name, q[:, :, :6], k, v, 2, skip_reshape=True,
                                                                 layout=layout))
    assert any("window=12" in r for r in why_not("window", q, k, v, 2, skip_reshape=True, layout=layout, window=12))
    with pytest.raises(ValueError, match="takes no option agents"):
        run("todo", q, k, v, layout=layout, agents=4)


@pytest.mark.parametrize("backend, options", [("todo", {"downsample": 2}), ("window", {"window": 8, "downsample": 2}),
                                              ("agent", {"agents": 4}), ("linear", {})])
def test_grouped_query_keys_serve_as_if_repeated_to_every_query_head(backend, options):
    """OmniGen2, Boogu and HiDream-O1 call attention with fewer k/v heads (enable_gqa): each group of query heads
    reads its shared k/v head, exactly as the same call with those heads repeated."""
    layout = TokenLayout(1, 12, 10, before=3, after=2)
    q, k, v = split_inputs(layout, heads=4, seed=5)
    k, v = k[:, :2], v[:, :2]  # 2 k/v heads for 4 query heads: heads 0-1 read k/v head 0, heads 2-3 head 1
    grouped = attention(q, k, v, 4, backend=backend, layout=layout, skip_reshape=True, skip_output_reshape=True,
                        enable_gqa=True, **options)
    repeated = run(backend, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), layout=layout, **options)
    assert_close(grouped, repeated, torch.float32, f"{backend} with GQA")
    shuffled = run(backend, q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), layout=layout, **options)
    assert not torch.allclose(grouped, shuffled, atol=1e-3)  # heads 1 and 2 would read the wrong group


def test_auto_never_picks_them():
    layout = TokenLayout(1, 4, 4, before=2)
    q, k, v = split_inputs(layout)
    explanation = explain(q, k, v, 2, skip_reshape=True, layout=layout)
    assert explanation.chosen == "sdpa"
    for name in ("todo", "agent", "window"):
        assert not BACKENDS[name].exact
        assert explanation.passed_over[name] == ["approximate: used only when asked for by name"]


def test_todo_costs_fall_with_the_key_count(monkeypatch):
    """The reduced call really has fewer keys: N x (M_grid / f^2 + M_other) scores, not N x M."""
    layout = TokenLayout(1, 8, 8, before=4)
    q, k, v = split_inputs(layout)
    seen = []
    real = F.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        seen.append(key.shape[2])
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    run("todo", q, k, v, layout=layout, downsample=4)
    assert seen == [4 + 4]
