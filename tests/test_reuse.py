"""The refresh mode (nodes/reuse.py): exact attention every `refresh` steps, its residual against the approximation
reused in between, per layer, stream and device, within a memory budget decided before anything is kept; and the
quality guard's choice among exact, approximation + residual and the plain approximation. Without ComfyUI."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from efficient_attention_pop.attention import TokenLayout, attention
from efficient_attention_pop.benchmark.refresh_cost import amortised_speedup, cache_bytes, refresh_schedule
from efficient_attention_pop.nodes.approximation import ApproximationServer
from efficient_attention_pop.nodes.comfy_call import ComfyAttentionCall
from efficient_attention_pop.nodes.families import FAMILIES, CallPlacement
from efficient_attention_pop.nodes.guard import APPROXIMATE, EXACT, RESIDUAL, QualityGuard
from efficient_attention_pop.nodes.patch import AttentionPatch
from efficient_attention_pop.nodes.reuse import GIB, Phase, ReuseCache
from efficient_attention_pop.nodes.settings import PatchSettings


class Layer:
    """A fake layer whose exact and approximate outputs change from step to step (step-dependent constants)."""

    def __init__(self, seed):
        self.seed = seed
        self.calls = {"exact": 0, "approx": 0}

    def exact(self, step):
        self.calls["exact"] += 1
        return torch.full((2, 3), 10.0 * self.seed + step)

    def approx(self, step):
        self.calls["approx"] += 1
        return torch.full((2, 3), 1.0 * self.seed + 0.5 * step)


def step(cache, layers, number, stream="s", shape=(2, 4)):
    warning = cache.begin_model_call(stream, shape)
    outs = {name: cache.attend((name, stream), lambda: layer.exact(number), lambda e: layer.approx(number))
            for name, layer in layers.items()}
    return outs, warning or cache.end_model_call()


def test_refresh_steps_return_exact_and_the_steps_between_approximation_plus_residual():
    cache, layers = ReuseCache(refresh=3, budget_bytes=GIB), {"a": Layer(1), "b": Layer(2)}
    phases, results = [], []
    for number in range(8):
        outs, warning = step(cache, layers, number)
        assert warning is None
        phases.append(cache.phase if cache.phase != Phase.OFF else Phase.SIZE)
        results.append(outs)
    # step 0 sizes (exact, nothing kept), then refresh at 1, 4, 7
    for name, layer in layers.items():
        for number, outs in enumerate(results):
            exact = layer.exact(number)
            if number in (0, 1, 4, 7):
                assert torch.equal(outs[name], exact), (name, number)
            else:
                refreshed = 1 if number < 4 else 4
                residual = layer.exact(refreshed) - layer.approx(refreshed)
                assert torch.equal(outs[name], layer.approx(number) + residual), (name, number)
                assert not torch.equal(outs[name], exact)
    assert set(cache.kept) == {("a", "s"), ("b", "s")} and cache.kept_bytes == 2 * 6 * 4


def test_the_sizing_step_keeps_nothing_and_a_later_run_of_the_same_size_needs_none():
    sizes, layer = {}, Layer(1)  # what the node keeps across runs: numbers
    cache = ReuseCache(refresh=2, budget_bytes=GIB, sizes=sizes)
    cache.begin_model_call("s", (1,))
    assert cache.phase == Phase.SIZE
    cache.attend("k", lambda: layer.exact(0), lambda e: layer.approx(0))
    assert cache.kept == {} and layer.calls == {"exact": 1, "approx": 0}
    assert cache.end_model_call() is None
    assert sizes == {("s", (1,)): (24, frozenset({"k"}))}
    cache = ReuseCache(refresh=2, budget_bytes=GIB, sizes=sizes)  # the next run
    cache.begin_model_call("s", (1,))
    assert cache.phase == Phase.REFRESH  # sizes known: the run starts with a refresh
    cache.begin_model_call("s", (1,))
    assert cache.phase == Phase.REUSE
    cache = ReuseCache(refresh=2, budget_bytes=GIB, sizes=sizes)
    cache.begin_model_call("s", (2,))  # another latent size: sized again
    assert cache.phase == Phase.SIZE


def test_streams_keep_their_own_steps_and_residuals():
    """cond and uncond in separate model calls: each stream counts its own steps and keeps its own residuals."""
    cache, layer = ReuseCache(refresh=2, budget_bytes=GIB), Layer(1)
    for number in range(3):
        for stream in ("cond", "uncond"):
            outs, _ = step(cache, {"a": layer}, number, stream)
    assert set(cache.kept) == {("a", "cond"), ("a", "uncond")}
    assert cache.steps == {"cond": 3, "uncond": 3}


def test_a_cache_over_the_budget_is_refused_before_anything_is_kept():
    layers = {"a": Layer(1), "b": Layer(2)}
    needed = 2 * 6 * 4  # two layers of 2x3 fp32
    cache = ReuseCache(refresh=2, budget_bytes=needed - 1)
    outs, warning = step(cache, layers, 0)
    assert "0.00 GiB of residuals for 2 attention layers" in warning and "over the cache budget" in warning
    for number in range(1, 5):
        outs, again = step(cache, layers, number)
        assert again is None and cache.kept == {} and cache.kept_bytes == 0
        for name, layer in layers.items():  # the plain approximation
            assert torch.equal(outs[name], layer.approx(number))
    cache = ReuseCache(refresh=2, budget_bytes=needed - 1, sizes=cache.sizes)  # a later run of the same size:
    assert cache.begin_model_call("s", (2, 4)) is not None and cache.phase == Phase.OFF  # refused, no sizing step
    exact_budget = ReuseCache(refresh=2, budget_bytes=needed)
    assert step(exact_budget, layers, 0)[1] is None
    step(exact_budget, layers, 1)
    assert exact_budget.kept_bytes == needed


def test_a_second_stream_that_does_not_fit_beside_the_first_is_refused_alone():
    cache, layer = ReuseCache(refresh=2, budget_bytes=30), Layer(1)  # one layer of 24 bytes fits, two do not
    assert step(cache, {"a": layer}, 0, "cond")[1] is None
    warning = step(cache, {"a": layer}, 0, "uncond")[1]
    assert "+0.00 GiB for other cond/uncond calls" in warning
    step(cache, {"a": layer}, 1, "cond")
    outs, _ = step(cache, {"a": layer}, 1, "uncond")
    assert set(cache.kept) == {("a", "cond")} and torch.equal(outs["a"], layer.approx(1))


def test_cache_bytes_at_flux_2048_and_wan_720p():
    """The figures the README states: bf16 residuals, batch 2 (CFG)."""
    flux = cache_bytes(57, 2, 16384 + 512, 3072, 2)
    wan = cache_bytes(40, 2, 21 * 45 * 80, 5120, 2)
    assert round(flux / GIB, 1) == 11.0 and round(wan / GIB, 1) == 57.7


def test_the_guard_chooses_among_exact_residual_and_plain_approximation():
    """Layer p: the plain approximation is within the bound; r: only with its residual; x: not even with it."""
    guard, cache = QualityGuard(0.1), ReuseCache(refresh=4, budget_bytes=GIB)
    server = ApproximationServer(guard, cache)
    base = torch.arange(1.0, 7.0)

    def exact(name, number):
        return base * (1 + 0.01 * number) + (5.0 if name == "x" else 0.0) * number

    def approx(name, number):
        if name == "p":
            return exact(name, number) * 1.01
        return base * 0.5  # 50% off, and constant: the residual tracks exact only where exact changes slowly

    outs = []
    for number in range(6):
        server.begin_model_call("s", (1,), True)
        outs.append({name: server.serve((name, 6, 6), 6, lambda n=name: exact(n, number),
                                        lambda e, n=name: approx(n, number))
                     for name in ("p", "r", "x")})
        _, table = server.end_model_call()
        if table:
            tables = table
    runs = {key[0]: record.runs(True) for key, record in guard.layers.items()}
    assert runs == {"p": APPROXIMATE, "r": RESIDUAL, "x": EXACT}
    assert torch.equal(outs[5]["x"], exact("x", 5))  # exact for the rest of the run
    assert torch.allclose(outs[5]["p"], approx("p", 5))
    # step 3: plain approximation + the residual measured in step 2 (the rotation re-measures r in step 4)
    assert torch.equal(outs[3]["r"], approx("r", 3) + exact("r", 2) - approx("r", 2))
    assert not torch.equal(outs[3]["r"], exact("r", 3)) and torch.allclose(outs[3]["r"], exact("r", 3), rtol=0.1)
    assert set(cache.kept) == {("r", 6, 6, "s")}  # only the residual layer keeps memory
    lines = tables.splitlines()
    assert lines[0].split() == ["layer", "tokens", "rel.", "error", "with", "residual", "runs"]
    assert lines[-1].startswith("1 of 3 layers run the plain approximation, 1 the approximation with the residual")


# ---- the patch: node settings -> behaviour, per device ----
def _call(seed, tokens=(4, 8, 8)):
    text, height, width = tokens
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, text + height * width, 64, generator=gen) for _ in range(3))
    layout = TokenLayout(1, height, width, before=text)
    return ComfyAttentionCall(q, k, v, 2), CallPlacement(layout, layout, True)


def _sample(patch, steps, calls, device="cpu", run=None):
    run = torch.linspace(1, 0, steps + 1) if run is None else run
    outs = []
    for number in range(steps):
        model_call = patch.begin_model_call(torch.zeros(2, 16, 16, 16), torch.ones(2), torch.zeros(2, 4, 8), {},
                                            {"sample_sigmas": run, "cond_or_uncond": [0, 1]})
        model_call.reached = True
        state = patch.runs.get("cpu")
        outs.append([patch.server._run(call, placement, model_call, state, None) for call, placement in calls(number)])
        patch.end_model_call(model_call)
    return outs


def _exact(call):
    return attention(call.q, call.k, call.v, 2, backend="sdpa")


def _plain(call, layouts, backend="todo"):
    return attention(call.q, call.k, call.v, 2, backend=backend, layout=layouts.key, downsample=2)


def test_the_node_refresh_mode_exact_on_refresh_steps_residual_between_and_off_at_zero():
    def calls(number):  # two layers, inputs drifting from step to step
        return [_call(10 * layer + number) for layer in range(2)]

    flux = FAMILIES["Flux"]
    off = AttentionPatch(PatchSettings(backend="todo", options={"downsample": 2}), flux, uses_override=True)
    on = AttentionPatch(PatchSettings(backend="todo", options={"downsample": 2}, refresh=3), flux, uses_override=True)
    plain, refreshed = _sample(off, 6, calls), _sample(on, 6, calls)
    assert off.runs.get("cpu").approximations.cache is None  # refresh=0: today's path, no cache
    for number in range(6):
        for layer, (call, layouts) in enumerate(calls(number)):
            approx = _plain(call, layouts)
            assert torch.equal(plain[number][layer], approx)
            if number in (0, 1, 4):  # sizing step, then refresh every 3 steps
                assert torch.allclose(refreshed[number][layer], _exact(call), atol=1e-5)
            else:
                refresh_call, refresh_layouts = calls(1 if number < 4 else 4)[layer]
                residual = _exact(refresh_call) - _plain(refresh_call, refresh_layouts)
                assert torch.allclose(refreshed[number][layer], approx + residual, atol=1e-5)
                assert not torch.allclose(refreshed[number][layer], approx, atol=1e-3)
    kept = on.runs.get("cpu").approximations.cache.kept[(1, 68, 68, ((0, 1), ()))]  # (served call, q and k tokens,
    assert torch.allclose(kept, _exact(calls(4)[1][0]) - _plain(*calls(4)[1]), atol=1e-5)  # stream)
    assert set(on.runs.runs) == {"cpu"}


def test_the_node_keeps_residuals_per_device_and_refuses_a_cache_over_its_budget(caplog):
    flux = FAMILIES["Flux"]
    patch = AttentionPatch(PatchSettings(backend="todo", options={"downsample": 2}, refresh=2, cache_gb=1e-6), flux,
                           uses_override=True)
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        outs = _sample(patch, 4, lambda number: [_call(number)])
    warnings = [r.getMessage() for r in caplog.records if "cache budget" in r.getMessage()]
    assert len(warnings) == 1 and "over the cache budget of 0.00 GiB" in warnings[0]
    assert "plain todo approximation" in warnings[0]
    cpu = patch.runs.get("cpu").approximations.cache
    assert cpu.kept == {}
    for number in range(1, 4):
        call, layouts = _call(number)
        assert torch.equal(outs[number][0], _plain(call, layouts))
    patch.begin_model_call(torch.zeros(2, 16, 16, 16, device="meta"), torch.ones(2), torch.zeros(2, 4, 8), {},
                           {"sample_sigmas": torch.ones(3)})
    meta = patch.runs.get("meta").approximations.cache
    assert set(patch.runs.runs) == {"cpu", "meta"} and meta is not cpu
    assert meta.phase == Phase.SIZE and cpu.steps


def test_refresh_one_is_exact_attention_on_every_step():
    patch = AttentionPatch(PatchSettings(backend="window", options={"window": 8, "downsample": 2}, refresh=1),
                           FAMILIES["Flux"], uses_override=True)
    outs = _sample(patch, 3, lambda number: [_call(number, (4, 16, 16))])
    for number in range(3):
        call, _ = _call(number, (4, 16, 16))
        exact = attention(call.q, call.k, call.v, 2, backend="sdpa")
        assert torch.allclose(outs[number][0], exact, atol=1e-5)


@pytest.mark.parametrize("bad", [{"refresh": -1}, {"cache_gb": -1.0}])
def test_settings_refuse_negative_refresh_or_budget(bad):
    with pytest.raises(ValueError):
        PatchSettings(backend="todo", **bad)


def test_refresh_schedule_and_amortised_speedup():
    assert refresh_schedule(20, 5) == (0, 4, 16)  # refreshes at 0, 5, 10, 15
    assert refresh_schedule(20, 5, first_run=True) == (1, 4, 15)  # sizing at 0, refreshes at 1, 6, 11, 16
    assert refresh_schedule(12, 1) == (0, 12, 0)
    # the (K - 1) * approx + (exact + approx) per K steps of the issue, where K divides the steps
    assert amortised_speedup(10.0, 5, 20) == pytest.approx(5 / (4 * 0.1 + 1.1))
    assert amortised_speedup(10.0, 1, 20) == pytest.approx(1 / 1.1)
