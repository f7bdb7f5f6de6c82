"""A sampling run has a beginning and an end: per device, what the run keeps (the quality guard's measurements, the
refresh mode's residuals, the region masks on that device) lives in one SamplingRun, dropped when the run ends.

Where ComfyUI has sampler wrappers (``WrappersMP.OUTER_SAMPLE``, 0.3.x and later) one scopes the run, as
``comfy_extras/nodes_easycache.py`` scopes its cache: its end comes when sampling finishes, is interrupted or fails.
An older ComfyUI has no such wrapper: there a new run is told from a new ``sample_sigmas``, or where there is none
(before mid-2024) from a sigma above the previous model call's (a sampler walks its schedule downwards), and the
previous run's state is dropped then. Across runs only numbers are kept: the residual sizes of each latent size.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..attention import RegionMask
from ..attention.regions import RegionMasker
from .approximation import ApproximationServer
from .families import MaskVerdict
from .guard import QualityGuard
from .regional import REGIONS_KEY
from .reuse import GIB, ResidualSizes, ReuseCache
from .settings import PatchSettings, sigma_of


class SamplingRun:
    """What one sampling run keeps on one device. ``schedule``: the sample_sigmas it was told apart by (an older
    ComfyUI; None where a sampler wrapper scopes it)."""

    def __init__(self, settings: PatchSettings, residual_sizes: ResidualSizes,
                 measurements: Optional[List[tuple]] = None, schedule=None):
        guard = (QualityGuard(settings.max_error, measurements)
                 if settings.max_error > 0 or measurements is not None else None)
        cache = ReuseCache(settings.refresh, settings.cache_gb * GIB, sizes=residual_sizes) if settings.refreshes \
            else None
        self.approximations = ApproximationServer(guard, cache)
        self.regions: Dict[tuple, Optional[RegionMask]] = {}  # (layouts, query tokens, batches) -> on this device
        self.summarised = False  # the served-calls summary was logged
        self.schedule = schedule
        self.sigma = float("inf")  # without a wrapper or a schedule: the last model call's sigma
        self.regional_masks: Dict[tuple, Optional[RegionMask]] = {}  # regional prompts' masks per call layout
        self.regional_threshold: Dict[int, float] = {}  # the sigma that ends each regional rule's isolation

    def begin_model_call(self, transformer_options: dict, latent_shape: tuple, active: bool) -> Optional[str]:
        """A model call starts; returns why the refresh mode's residuals were refused (None otherwise). Cond and
        uncond in separate model calls (or conds that do not batch) are separate streams of residuals."""
        stream = (tuple(transformer_options.get("cond_or_uncond") or ()),
                  tuple(str(uuid) for uuid in transformer_options.get("uuids") or ()))
        return self.approximations.begin_model_call(stream, latent_shape, active)

    def region_mask(self, masker: RegionMasker, verdict: MaskVerdict, query_tokens: int, attention_batch: int,
                    latent_batch: int, device: torch.device) -> Optional[RegionMask]:
        """The mask's labels for one call's layouts, made and moved to the device once per run."""
        key = (verdict.query, verdict.key, query_tokens, attention_batch, latent_batch)
        if key not in self.regions:
            self.regions[key] = masker.region_mask(verdict.query, attention_batch, latent_batch, key_layout=verdict.key,
                                                   query_tokens=query_tokens, device=device)
        return self.regions[key]

    def close(self) -> None:
        self.approximations.close()
        self.regions.clear()
        self.regional_masks.clear()


class RunScope:
    """The sampling runs in progress, one per device (ComfyUI may sample one model on several GPUs at once, with
    deep copies of the patcher that share the patch)."""

    def __init__(self, settings: PatchSettings, measurements: Optional[List[tuple]] = None):
        self.settings = settings
        self.measurements = measurements
        self.runs: Dict[str, SamplingRun] = {}
        self.residual_sizes: Dict[str, ResidualSizes] = {}  # per device, numbers kept across runs
        self.scoped = 0  # sampler wrappers in progress
        self.runs_by_sigma = False  # True in a ComfyUI without keyed wrappers (March 2024): see run_for
        self.prompts_by_uuid: Dict[object, object] = {}  # regional prompts of this sampling's conds, by cond uuid

    def sample(self, executor, args: tuple, kwargs: dict):
        """Run ComfyUI's sampling (an OUTER_SAMPLE wrapper's executor) as one run: begun, and ended however it ends."""
        if not self.scoped:
            self.end()  # a run told apart without a wrapper (the model called outside a sampler)
        self.use_conds(getattr(getattr(executor, "class_obj", None), "conds", None))
        self.scoped += 1
        try:
            return executor(*args, **kwargs)
        finally:
            self.scoped -= 1
            if not self.scoped:
                self.end()

    def run_for(self, device: str, transformer_options: dict) -> SamplingRun:
        """This device's run, begun at its first model call."""
        run = self.runs.get(device)
        if self.scoped and run is not None:
            return run
        schedule = None if self.scoped else transformer_options.get("sample_sigmas")
        sigma = sigma_of(transformer_options.get("sigmas")) if self.runs_by_sigma and schedule is None else None
        if run is not None and run.schedule is schedule and (sigma is None or sigma <= run.sigma):
            if sigma is not None:
                run.sigma = sigma
            return run
        if run is not None:
            run.close()  # without a wrapper: a new schedule, a new run
        sizes = self.residual_sizes.setdefault(device, {})
        run = self.runs[device] = SamplingRun(self.settings, sizes, self.measurements, schedule)
        run.sigma = float("inf") if sigma is None else sigma
        return run

    def use_conds(self, conds) -> None:
        """Map the uuid ComfyUI gave each cond of this sampling (its guider's ``conds``: name -> list of dicts) to
        the regional prompts it carries (regional.REGIONS_KEY)."""
        for entries in (conds or {}).values():
            for entry in entries or ():
                prompts = entry.get(REGIONS_KEY) if isinstance(entry, dict) else None
                if prompts is not None and "uuid" in entry:
                    self.prompts_by_uuid[entry["uuid"]] = prompts

    def get(self, device: str) -> Optional[SamplingRun]:
        return self.runs.get(device)

    def end(self) -> None:
        """Every run is over: nothing of them is kept but numbers."""
        for run in self.runs.values():
            run.close()
        self.runs.clear()
        self.prompts_by_uuid.clear()

