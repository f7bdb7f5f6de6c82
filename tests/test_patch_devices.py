"""One patch object serves every copy of a patched model (ComfyUI deep-copies the patcher per GPU when it samples one
model on several devices); what it keeps per run must belong to one device. Without ComfyUI: the patch's own
per-model-call entry point, with latents on two devices (cpu and meta stand in for two GPUs)."""
from __future__ import annotations

import copy

import torch

from efficient_attention_pop.nodes.families import FAMILIES
from efficient_attention_pop.nodes.patch import AttentionPatch, PatchSettings


def _model_call(patch, device, run):
    latent = torch.zeros(2, 16, 8, 8, device=device)
    return patch.begin_model_call(latent, torch.ones(2), torch.zeros(2, 4, 8, device=device), {},
                                  {"sample_sigmas": run})


def test_deep_copies_share_the_patch_but_each_device_has_its_own_guard_and_run():
    patch = AttentionPatch(PatchSettings(backend="window", max_error=0.3), FAMILIES["Flux"], uses_override=True)
    assert copy.deepcopy(patch) is patch  # what ComfyUI's per-device deep clones hold
    run = torch.linspace(1, 0, 5)
    first, second = _model_call(patch, "cpu", run), _model_call(patch, "meta", run)
    assert (first.device, second.device) == ("cpu", "meta")
    assert patch.guard_for("cpu") is not patch.guard_for("meta")
    patch.guard_for("cpu").measure_only = True  # a decision on one device
    assert not patch.guard_for("meta").measure_only  # is not the other's
    started = []
    for device in ("cpu", "meta"):
        patch.guard_for(device).start_run = (lambda d=device: started.append(d))
    _model_call(patch, "cpu", torch.linspace(1, 0, 7))  # a new run on cpu only
    _model_call(patch, "meta", run)  # the run in progress on meta goes on
    assert started == ["cpu"]

