"""The pack loads the way ComfyUI loads custom nodes: the folder imported by path, under a name with dashes."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import types

import pytest

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
    assert list(pack.NODE_CLASS_MAPPINGS) == ["EfficientAttentionPoP", "RegionalPromptsPoP"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {"EfficientAttentionPoP": "Efficient Attention (PoP)",
                                               "RegionalPromptsPoP": "Regional Prompts (PoP)"}
    node = classic_node("ComfyUI-EfficientAttention-PoP")
    assert node.RETURN_TYPES == ("MODEL",) and node.FUNCTION == "patch"
    assert node.CATEGORY == "model_patches/attention" and "input model is unchanged" in node.DESCRIPTION


@pytest.mark.parametrize("folder", ["ComfyUI-EfficientAttention-PoP", "main"])
def test_pytest_runs_in_a_checkout_under_any_folder_name(tmp_path, folder):
    """A clone under the README's folder name (not a Python identifier) runs its tests: pytest must not import
    the root ``__init__.py`` (tests/conftest.py collects the root as a plain directory). Without that, this
    test module errors there with "attempted relative import with no known parent package"."""
    link = tmp_path / folder
    os.symlink(ROOT, link)
    test = os.path.join(str(link), "tests", "test_pack_loading.py") + "::test_loads_under_a_dashed_folder_name"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                            cwd=str(link), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    assert "relative import" not in result.stdout


def test_input_types_have_every_option_with_a_tooltip():
    node = classic_node("pack-inputs")
    types = node.INPUT_TYPES()
    required, optional = types["required"], types["optional"]
    assert list(required) == ["model", "backend", "downsample", "window", "max_error", "strength", "apply_to",
                              "min_tokens", "start_percent", "end_percent", "mask_mode", "heads", "layernorm"]
    # added after the first release: optional, so prompts saved before them still run; widgets in the same order
    assert list(optional) == ["refresh", "cache_gb", "mask"] and optional["mask"][0] == "MASK"
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


def fake_comfy_api(schema_takes_search_aliases):
    """A stand-in for ``comfy_api.latest``: io.Schema as a dataclass with or without ``search_aliases`` (0.3.64's
    has none), inputs and outputs recorded as given."""
    class Slot:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    fields = [("node_id", str), ("display_name", str, None), ("category", str, "sd"), ("inputs", list, None),
              ("outputs", list, None), ("description", str, "")]
    if schema_takes_search_aliases:
        fields.append(("search_aliases", list, None))
    io = types.SimpleNamespace(Schema=dataclasses.make_dataclass("Schema", fields), ComfyNode=object, NodeOutput=tuple,
                               **{kind: types.SimpleNamespace(Input=Slot, Output=Slot)
                                  for kind in ("Combo", "Int", "Float", "Boolean", "Model", "Mask")})
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    return {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest}


@pytest.mark.parametrize("schema_takes_search_aliases", [False, True])
def test_search_aliases_where_comfyui_takes_them(monkeypatch, schema_takes_search_aliases):
    """The V1 class always carries SEARCH_ALIASES (a ComfyUI without aliases ignores it); the V3 schema gets
    search_aliases only where io.Schema has that field, so ComfyUI 0.3.64 still builds the node."""
    from efficient_attention_pop.nodes import efficient_attention

    aliases = efficient_attention.EfficientAttentionPoP.SEARCH_ALIASES
    expected = {"attention", "efficient", "sdpa", "linear attention", "mask", "speed", "fast", "flash", "todo"}
    assert expected <= set(aliases)
    for name, module in fake_comfy_api(schema_takes_search_aliases).items():
        monkeypatch.setitem(sys.modules, name, module)
    schema = efficient_attention.define_v3_node().define_schema()
    assert schema.node_id == "EfficientAttentionPoP"
    assert getattr(schema, "search_aliases", None) == (aliases if schema_takes_search_aliases else None)


def test_registry_metadata_and_literal_node_ids():
    """ComfyUI-Manager and the Comfy Registry read the pyproject and find node ids as literal strings."""
    import re
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Efficient Attention (PoP)" and comfy["Icon"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    assert project["project"]["classifiers"] and project["project"]["urls"]
    # PEP 639, as current setuptools wants it (a license table or a license classifier is deprecated there)
    assert project["project"]["license"] == "MIT" and project["project"]["license-files"] == ["LICENSE"]
    assert not [c for c in project["project"]["classifiers"] if c.startswith("License ::")]
    assert project["build-system"]["requires"] == ["setuptools>=77"]
    assert not [d for d in project["project"]["dependencies"] if d.split("=")[0].split(">")[0].strip() == "torch"]
    for path, node_id in (("nodes/efficient_attention.py", "EfficientAttentionPoP"),
                          ("nodes/regional_prompts.py", "RegionalPromptsPoP")):
        with open(os.path.join(ROOT, path)) as f:
            assert f'"{node_id}"' in f.read(), path
    with open(os.path.join(ROOT, "nodes/__init__.py")) as f:  # the node ids, literally, as Manager's scanner reads them
        mapping = re.search(r'NODE_CLASS_MAPPINGS = \{([^}]*)\}', f.read()).group(1)
    assert re.findall(r'"([^"]+)":', mapping) == ["EfficientAttentionPoP", "RegionalPromptsPoP"]


def registry_package(root=ROOT):
    """The files `comfy node pack` puts in the Comfy Registry package: git-tracked files minus .comfyignore.
    comfy-cli reads .comfyignore with gitignore rules; this reads the subset the file uses (anchored paths,
    folders with a trailing slash), and fails on any other pattern rather than guessing its meaning."""
    import re

    try:
        tracked = subprocess.run(["git", "-C", root, "ls-files"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout, so no registry package to check: {error}")
    with open(os.path.join(root, ".comfyignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert patterns and all(re.fullmatch(r"/[\w.-]+/?", p) for p in patterns), patterns
    ignored = [(p.strip("/"), p.endswith("/")) for p in patterns]

    def is_ignored(path):
        return any(path.startswith(name + "/") if folder else path == name for name, folder in ignored)

    return sorted(path for path in tracked.stdout.splitlines() if not is_ignored(path))


def test_registry_package_holds_what_comfyui_loads_and_nothing_else(tmp_path):
    package = registry_package()
    assert {"__init__.py", "requirements.txt", "pyproject.toml", "LICENSE", "README.md"} <= set(package)
    examples = [p for p in package if p.startswith("example_workflows/")]
    assert examples and len([p for p in examples if p.endswith(".json")]) == len([p for p in examples if p.endswith(".jpg")])
    unwanted = [p for p in package if p.startswith(("tests/", ".ci/", "docs/", "benchmark/"))
                or p.endswith((".safetensors", ".png"))]
    assert not unwanted, unwanted
    # Every file ComfyUI imports when it loads the pack and builds the node (kernels included, which the
    # dispatcher loads by name) is in the package ...
    code = ("import importlib.util, os, sys, json\n"
            "root, name = sys.argv[1], 'ComfyUI-EfficientAttention-PoP'\n"
            "spec = importlib.util.spec_from_file_location(name, os.path.join(root, '__init__.py'), "
            "submodule_search_locations=[root])\n"
            "pack = importlib.util.module_from_spec(spec); sys.modules[name] = pack; spec.loader.exec_module(pack)\n"
            "sys.modules[name + '.nodes.efficient_attention'].EfficientAttentionPoP.INPUT_TYPES()\n"
            "sys.modules[name + '.attention'].availability()\n"
            "files = [os.path.relpath(m.__file__, root) for k, m in list(sys.modules.items())\n"
            "         if (k == name or k.startswith(name + '.')) and getattr(m, '__file__', None)]\n"
            "print(json.dumps({'files': sorted(files), 'nodes': sorted(pack.NODE_CLASS_MAPPINGS)}))\n")

    def load(root):
        result = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        import json

        return json.loads(result.stdout.strip().splitlines()[-1])

    loaded = load(ROOT)
    assert "kernels/__init__.py" in loaded["files"] and "nodes/patch.py" in loaded["files"]
    assert set(loaded["files"]) <= set(package), sorted(set(loaded["files"]) - set(package))
    # ... and the package alone, unpacked into custom_nodes/, loads and offers the node.
    folder = tmp_path / "ComfyUI-EfficientAttention-PoP"
    for path in package:
        os.makedirs(folder / os.path.dirname(path), exist_ok=True)
        with open(os.path.join(ROOT, path), "rb") as src, open(folder / path, "wb") as dst:
            dst.write(src.read())
    assert load(str(folder)) == loaded
