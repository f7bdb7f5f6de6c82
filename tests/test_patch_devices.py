"""One patch object serves every copy of a patched model (ComfyUI deep-copies the patcher per GPU when it samples one
model on several devices); what it keeps per run must belong to one device. Without ComfyUI: the patch's own
per-model-call entry point, with latents on two devices (cpu and meta stand in for two GPUs)."""
from __future__ import annotations

import copy

import torch

from efficient_attention_pop.nodes.families import FAMILIES
from efficient_attention_pop.nodes.patch import AttentionPatch
from efficient_attention_pop.nodes.settings import PatchSettings


def _model_call(patch, device, run):
    latent = torch.zeros(2, 16, 8, 8, device=device)
    return patch.begin_model_call(latent, torch.ones(2), torch.zeros(2, 4, 8, device=device), {},
                                  {"sample_sigmas": run})


def test_deep_copies_share_the_patch_but_each_device_has_its_own_guard_and_run():
    patch = AttentionPatch(PatchSettings(backend="window", max_error=0.3), FAMILIES["Flux"], uses_override=True)
    assert copy.deepcopy(patch) is patch  # what ComfyUI's per-device deep clones hold
    schedule = torch.linspace(1, 0, 5)
    first, second = _model_call(patch, "cpu", schedule), _model_call(patch, "meta", schedule)
    assert (first.device, second.device) == ("cpu", "meta")
    cpu, meta = patch.runs.get("cpu"), patch.runs.get("meta")
    assert cpu is not meta and cpu.approximations.guard is not meta.approximations.guard
    _model_call(patch, "cpu", torch.linspace(1, 0, 7))  # a new run on cpu only (no sampler wrapper: a new schedule)
    _model_call(patch, "meta", schedule)  # the run in progress on meta goes on
    assert patch.runs.get("cpu") is not cpu and patch.runs.get("meta") is meta
    assert cpu.approximations.guard is None  # the run that ended holds nothing


def test_a_sampler_wrapper_scopes_one_run_per_device_and_ends_them_however_sampling_ends():
    patch = AttentionPatch(PatchSettings(backend="todo", refresh=2), FAMILIES["Flux"], uses_override=True)
    seen = []

    def sampling(fail):
        for step in range(3):  # the schedule a sampler passes changes nothing inside a scoped run
            _model_call(patch, "cpu", torch.ones(step + 2))
            _model_call(patch, "meta", torch.ones(step + 2))
            seen.append((patch.runs.get("cpu"), patch.runs.get("meta")))
        if fail:
            raise RuntimeError("interrupted")
        return "latent"

    assert patch.sample_wrapper(lambda fail: sampling(fail), False) == "latent"
    assert len(set(seen)) == 1 and seen[0][0] is not seen[0][1]
    assert patch.runs.runs == {}
    try:
        patch.sample_wrapper(lambda fail: sampling(fail), True)
    except RuntimeError:
        pass
    assert patch.runs.runs == {} and seen[-1][0] is not seen[0][0]
    assert all(run.approximations.cache is None for pair in seen for run in pair)  # closed: no tensor left


def test_without_a_wrapper_or_a_schedule_a_rising_sigma_starts_a_new_run():
    """The March 2024 ComfyUI passes neither sampler wrappers nor sample_sigmas: a sampler walks its sigmas down, so
    a sigma above the last model call's is the next run, and the run before it is dropped then."""
    patch = AttentionPatch(PatchSettings(backend="todo", refresh=2), FAMILIES["Flux"], uses_override=False)
    patch.runs.runs_by_sigma = True  # as patch_model sets it where ComfyUI has no keyed wrappers
    latent, context = torch.zeros(2, 16, 8, 8), torch.zeros(2, 4, 8)
    runs = []
    for sigma in (14.6, 14.6, 7.0, 7.0, 1.0, 14.6, 3.0):  # cond and uncond in separate calls; then a second run
        patch.begin_model_call(latent, torch.tensor([sigma]), context, {}, {"sigmas": torch.tensor([sigma])})
        runs.append(patch.runs.get("cpu"))
    assert runs[:5] == [runs[0]] * 5 and runs[5:] == [runs[5]] * 2 and runs[5] is not runs[0]
    assert runs[0].approximations.cache is None  # the first run holds nothing once the second began
