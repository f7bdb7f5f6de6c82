"""The example workflows in example_workflows/ (ComfyUI's template browser lists them, with the .jpg beside each as
its thumbnail): UI-format graphs whose links agree, whose Efficient Attention (PoP) nodes hold values the node
accepts today, in its input order, and which explain themselves in a note on the canvas."""
from __future__ import annotations

import glob
import json
import os

import pytest

from efficient_attention_pop.nodes.efficient_attention import EfficientAttentionPoP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
NOTE_TYPES = ("Note", "MarkdownNote")
MAX_THUMBNAIL_BYTES = 100_000


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def our_widgets():
    """(name, kind, options) of the node's widgets, in the order the frontend lays them out."""
    types = EfficientAttentionPoP.INPUT_TYPES()  # required widgets first, then the optional ones (not the mask)
    return [(name, kind, options) for name, (kind, options) in {**types["required"], **types["optional"]}.items()
            if name not in ("model", "mask")]


def test_there_are_examples_for_images_and_video():
    names = [os.path.splitext(os.path.basename(path))[0] for path in EXAMPLES]
    assert len(names) >= 3 and all(name.endswith(" - Efficient Attention") for name in names), names
    assert any("video" in name for name in names) and any("Flux" in name for name in names)


def test_titles_differ_where_the_template_browser_reads_first():
    """The template browser titles a card with the file name and cuts a long one (ComfyUI 0.33
    showed "Efficient Attention - Wan 2.1 text to…"): what tells the examples apart comes first, so the first 20
    characters of the names already differ, and the model's name leads."""
    names = [os.path.splitext(os.path.basename(path))[0] for path in EXAMPLES]
    assert len({name[:20] for name in names}) == len(names), names
    assert all(not name.startswith("Efficient Attention") for name in names), names


# Where ComfyUI's loaders look for their files (folder_paths names), as ComfyUI's own templates give them.
LOADER_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "UNETLoader": "diffusion_models",
                  "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders", "VAELoader": "vae"}


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_loaders_carry_their_model_files_for_the_missing_models_dialog(path):
    """Every loader's properties.models lists each file it selects with its download URL and folder, as ComfyUI's
    templates do: the frontend offers the missing ones for download when an entry's name is one of the node's
    widget values, its URL is on huggingface.co (or civitai.com) and its name ends in .safetensors or .sft."""
    from urllib.parse import urlparse

    workflow = load(path)
    loaders = [node for node in workflow["nodes"] if node["type"] not in NOTE_TYPES
               and any(str(v).endswith(".safetensors") for v in node.get("widgets_values") or [])]
    assert loaders
    for node in loaders:
        selected = [v for v in node["widgets_values"] if str(v).endswith(".safetensors")]
        models = node.get("properties", {}).get("models")
        assert models, f"{node['type']} has no properties.models"
        assert [m["name"] for m in models] == selected, (node["type"], models)
        for model in models:
            assert set(model) == {"name", "url", "directory"}, model
            url = urlparse(model["url"])
            assert url.scheme == "https" and url.netloc == "huggingface.co", model
            assert "/resolve/" in url.path and url.path.endswith("/" + model["name"]), model
            assert model["directory"] == LOADER_FOLDERS[node["type"]], (node["type"], model)


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_links_agree_with_the_nodes(path):
    workflow = load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    links = {link[0]: link for link in workflow["links"]}
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        output, target_input = nodes[source]["outputs"][source_slot], nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and target_input["link"] == link_id
        assert output["type"] == target_input["type"] == kind, (link_id, output, target_input)
    for node in workflow["nodes"]:
        assert all(i["link"] in links for i in node.get("inputs", []) if i["link"] is not None), node["type"]
        assert all(link in links for o in node.get("outputs", []) for link in o["links"] or []), node["type"]


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_our_node_holds_values_it_accepts_in_its_input_order(path):
    workflow = load(path)
    ours = [node for node in workflow["nodes"] if node["type"] == "EfficientAttentionPoP"]
    assert ours, "no Efficient Attention (PoP) node"
    widgets = our_widgets()
    for node in ours:
        assert [i["name"] for i in node["inputs"] if "widget" in i] in ([], [name for name, _, _ in widgets])
        values = node["widgets_values"]
        assert len(values) == len(widgets), f"{len(values)} values for {len(widgets)} widgets"
        for (name, kind, options), value in zip(widgets, values):
            if isinstance(kind, list):
                assert value in kind, f"{name}={value!r} is not one of {kind}"
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), f"{name}={value!r}"
            else:
                assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{name}={value!r}"
                assert options["min"] <= value <= options["max"], f"{name}={value!r} outside {options}"
                assert kind == "FLOAT" or value == int(value), f"{name}={value!r} is not an integer"
        fed = [other["type"] for other in workflow["nodes"] for i in other.get("inputs", [])
               if i["link"] in node["outputs"][0]["links"]]
        assert fed == ["KSampler"], fed


REGIONAL = [path for path in EXAMPLES if "regional prompts" in os.path.basename(path)]


def test_there_are_regional_examples_for_a_unet_and_a_dit():
    names = [os.path.basename(path) for path in REGIONAL]
    assert any(name.startswith("SD1.5") for name in names) and any(name.startswith("Flux") for name in names)


@pytest.mark.parametrize("path", REGIONAL, ids=os.path.basename)
def test_regional_examples_join_three_masked_prompts_and_a_base_into_the_positive(path):
    """Wired as people wire regional prompts today: three Conditioning (Set Mask) entries and a base prompt combined,
    into Regional Prompts (PoP), whose values the node accepts, whose conditioning reaches the KSampler's positive
    (through Flux Guidance where the model needs it) and whose model reaches the KSampler."""
    from efficient_attention_pop.nodes.regional_prompts import INPUTS

    workflow = load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    (ours,) = [node for node in workflow["nodes"] if node["type"] == "RegionalPromptsPoP"]
    for (name, kind, options, _), value in zip(INPUTS, ours["widgets_values"], strict=True):
        assert options["min"] <= value <= options["max"], (name, value)

    def upstream(node, types):
        found = [node["type"]] if node["type"] in types else []
        for entry in node.get("inputs", []):
            if entry["link"] is not None:
                found += upstream(nodes[links[entry["link"]][1]], types)
        return found

    assert upstream(ours, {"ConditioningSetMask"}).count("ConditioningSetMask") == 3

    node, slot = ours, 1  # the joined conditioning, followed to the sampler
    while node["type"] != "KSampler":
        (link,) = node["outputs"][slot]["links"]
        node, slot = nodes[links[link][3]], 0
        target_input = node["inputs"][links[link][4]]["name"]
    assert target_input == "positive"
    sampler = node
    assert "RegionalPromptsPoP" in upstream(sampler, {"RegionalPromptsPoP"})


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_a_note_names_every_model_file_and_the_size(path):
    workflow = load(path)
    notes = [node for node in workflow["nodes"] if node["type"] in NOTE_TYPES]
    assert notes, "no Note or MarkdownNote on the canvas"
    text = "\n".join(value for note in notes for value in note["widgets_values"])
    model_files = [value for node in workflow["nodes"] if node["type"] not in NOTE_TYPES
                   for value in node.get("widgets_values") or [] if str(value).endswith(".safetensors")]
    assert model_files and all(name in text for name in model_files), (model_files, text)
    latent = next(node for node in workflow["nodes"] if node["type"].startswith("Empty"))
    width, height = latent["widgets_values"][:2]
    assert f"{width}×{height}" in text, text
    steps = next(node for node in workflow["nodes"] if node["type"] == "KSampler")["widgets_values"][2]
    assert f"{steps} steps" in text


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_a_jpeg_thumbnail_lies_beside_it(path):
    thumbnail = os.path.splitext(path)[0] + ".jpg"
    assert os.path.isfile(thumbnail), f"no thumbnail {os.path.basename(thumbnail)}"
    with open(thumbnail, "rb") as f:
        data = f.read()
    assert data[:3] == b"\xff\xd8\xff" and len(data) < MAX_THUMBNAIL_BYTES, (data[:3], len(data))
