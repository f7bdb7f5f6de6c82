"""The pack loads the way ComfyUI loads custom nodes: the folder imported by path, under a name with dashes."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pack_like_comfyui(module_name="ComfyUI-EfficientAttention-PoP"):
    """What ComfyUI's load_custom_node does for a folder: spec from <folder>/__init__.py, exec the module."""
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def classic_node(module_name):
    """The classic (V1) node class of a pack loaded under ``module_name``; the registered class is the V3
    one where ComfyUI has the V3 schema (tested in test_comfy_today.py)."""
    pack = load_pack_like_comfyui(module_name)
    classic = sys.modules[f"{module_name}.nodes.efficient_attention"].EfficientAttentionPoP
    registered = pack.NODE_CLASS_MAPPINGS["EfficientAttentionPoP"]
    assert registered is classic or registered.__name__ == "EfficientAttentionPoPV3"
    return classic


def test_loads_under_a_dashed_folder_name():
    pack = load_pack_like_comfyui()
    assert list(pack.NODE_CLASS_MAPPINGS) == ["EfficientAttentionPoP"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {"EfficientAttentionPoP": "Efficient Attention (PoP)"}
    node = classic_node("ComfyUI-EfficientAttention-PoP")
    assert node.RETURN_TYPES == ("MODEL",) and node.FUNCTION == "patch"
    assert node.CATEGORY == "model_patches/attention" and "input model is unchanged" in node.DESCRIPTION


def test_input_types_have_every_option_with_a_tooltip():
    node = classic_node("pack-inputs")
    types = node.INPUT_TYPES()
    required, optional = types["required"], types["optional"]
    assert list(required) == ["model", "backend", "downsample", "agents", "max_error", "strength", "apply_to",
                              "min_tokens", "start_percent", "end_percent", "mask_mode", "heads", "layernorm"]
    assert list(optional) == ["mask"] and optional["mask"][0] == "MASK"
    assert required["model"][0] == "MODEL"
    backends = required["backend"][0]
    assert backends[:4] == ["auto", "sdpa", "masked", "linear"] and required["backend"][1]["default"] == "auto"
    assert "APPROXIMATE" in required["backend"][1]["tooltip"]
    assert required["heads"][0] == "INT" and required["heads"][1]["default"] == 0
    assert required["layernorm"] == ("BOOLEAN", required["layernorm"][1]) and required["layernorm"][1]["default"] is False
    assert required["apply_to"][0] == ["both", "self-attention", "cross-attention"]
    assert required["apply_to"][1]["default"] == "both"
    assert required["strength"][1] | {"tooltip": ""} == {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                                          "tooltip": ""}
    assert required["start_percent"][1]["default"] == 0.0 and required["end_percent"][1]["default"] == 1.0
    assert required["mask_mode"][0] == ["keys inside mask", "keys outside mask", "isolate regions"]
    for name, (_kind, options) in {**required, **optional}.items():
        assert options.get("tooltip"), f"{name} has no tooltip"


def test_pack_and_library_import_without_comfyui():
    code = ("import sys, efficient_attention_pop, efficient_attention_pop.attention; "
            "assert not any(m == 'comfy' or m.startswith(('comfy.', 'comfy_api')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('comfy')); "
            "print(sorted(efficient_attention_pop.NODE_CLASS_MAPPINGS))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    assert "EfficientAttentionPoP" in result.stdout


def test_example_workflow_is_consistent_with_the_node():
    import json

    path = os.path.join(ROOT, "example_workflows", "sd15_txt2img_efficient_attention.json")
    with open(path) as f:
        workflow = json.load(f)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[source]["outputs"][source_slot]["type"] == nodes[target]["inputs"][target_slot]["type"] == kind
    ours = [n for n in workflow["nodes"] if n["type"] == "EfficientAttentionPoP"]
    assert len(ours) == 1
    required = classic_node("pack-workflow").INPUT_TYPES()["required"]
    widgets = [name for name in required if name != "model"]
    assert len(ours[0]["widgets_values"]) == len(widgets)
    for name, value in zip(widgets, ours[0]["widgets_values"]):
        kind = required[name][0]
        if isinstance(kind, list):
            assert value in kind, f"{name}={value!r} is not one of {kind}"
    downstream = [n["type"] for n in workflow["nodes"] if any(i["link"] in ours[0]["outputs"][0]["links"]
                                                              for i in n["inputs"])]
    assert downstream == ["KSampler"]


def test_registry_metadata_and_literal_node_ids():
    """ComfyUI-Manager and the Comfy Registry read the pyproject and find node ids as literal strings."""
    import re
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Efficient Attention (PoP)" and comfy["Icon"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    assert project["project"]["classifiers"] and project["project"]["license"] and project["project"]["urls"]
    assert not [d for d in project["project"]["dependencies"] if d.split("=")[0].split(">")[0].strip() == "torch"]
    for path in ("nodes/__init__.py", "nodes/efficient_attention.py"):
        with open(os.path.join(ROOT, path)) as f:
            assert '"EfficientAttentionPoP"' in f.read(), path
    with open(os.path.join(ROOT, "nodes/__init__.py")) as f:
        assert re.search(r'NODE_CLASS_MAPPINGS = \{"EfficientAttentionPoP":', f.read())
