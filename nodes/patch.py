"""Install the pack's attention on a clone of a ComfyUI model, and route each attention call to it.

Two mechanisms, chosen by feature detection:
- today's ComfyUI (``comfy.ldm.modules.attention.wrap_attn`` exists): an ``optimized_attention_override``
  in the clone's transformer_options. It sees every attention call of UNets and DiTs that passes
  transformer_options, with the original function, and passes the calls it declines on to the override
  installed before it, or to that original function.
- older ComfyUI: ``attn1``/``attn2`` replace patches on every transformer block of a UNet.

Once per sampling run, ComfyUI's OUTER_SAMPLE wrapper (where it exists) begins and ends the run's state (run.py).
Once per model call, a wrapper around the model (ComfyUI's keyed APPLY_MODEL wrapper where it exists, the
single-slot model-function wrapper, chained, where not) reads what every attention call of that model call reads
(families.read_model_call). Each attention call then passes through once: what it is and where its tokens are
(families.py), which backend serves it (serving.py). Everything ComfyUI is imported inside functions: importing
this module needs no ComfyUI.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, List, Optional

import torch

from .comfy_call import ComfyAttentionCall, read_call
from .families import ModelCall, ModelFamily, model_family, read_model_call
from .log import NODE_NAME, REGIONAL_NODE_NAME, OnceLog, logger
from .regional import REGIONS_KEY, regional_call
from .run import RunScope, SamplingRun
from .serving import CallServer
from .settings import PatchSettings, check_choices

WRAPPER_KEY = "efficient_attention_pop"  # key of the pack's APPLY_MODEL and OUTER_SAMPLE wrappers


class ChainedOverride:
    """The function installed as ``optimized_attention_override``: the patch, with the override it passes
    declined calls to (None: ComfyUI's own function). ComfyUI deep-copies model options on every clone;
    this object is immutable, so copies share it."""

    def __init__(self, patch: "AttentionPatch", previous: Optional[Callable]):
        self.patch = patch
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        return self.patch.override(self.previous, func, args, kwargs)

    def __deepcopy__(self, memo):
        return self

    def reaches(self, patch: "AttentionPatch") -> bool:
        """True when ``patch`` is this override or one it passes calls on to."""
        override = self
        while isinstance(override, ChainedOverride):
            if override.patch is patch:
                return True
            override = override.previous
        return False


class AttentionPatch:
    """The attention a patched model runs, for one node's settings: the family it was installed on, the log, and
    the sampling runs in progress. ComfyUI deep-copies model options on every clone (and per device); copies share
    this object. ``measurements`` (a list): every served approximate call is measured against exact and returns
    exact (the quality benchmark's probe)."""

    def __init__(self, settings: PatchSettings, family: ModelFamily, uses_override: bool,
                 measurements: Optional[List[tuple]] = None):
        self.settings = settings
        self.family = family
        self.uses_override = uses_override  # False: attn1/attn2 replace patches (ComfyUI before the override)
        self.state_key = f"{WRAPPER_KEY}.{id(self):x}"  # transformer_options entry holding this patch's ModelCall
        self.log = OnceLog()
        self.runs = RunScope(settings, measurements)
        self.server = CallServer(settings, family, self.runs, self.log)

    def __deepcopy__(self, memo):
        return self

    # ---- once per sampling run ----
    def sample_wrapper(self, executor, *args, **kwargs):
        """ComfyUI's OUTER_SAMPLE wrapper: the run's state begins here and is dropped however sampling ends."""
        return self.runs.sample(executor, args, kwargs)

    # ---- once per model call ----
    def begin_model_call(self, latent: torch.Tensor, sigmas, context, extra_conds: dict,
                         transformer_options: dict) -> ModelCall:
        """What every attention call of one model call reads, and the step of this device's sampling run."""
        model_call = read_model_call(self.family, self.settings, latent, sigmas, context, extra_conds)
        run = self.runs.run_for(model_call.device, transformer_options)
        self._refused(run.begin_model_call(transformer_options, model_call.latent_shape, model_call.active))
        return model_call

    def end_model_call(self, model_call: ModelCall) -> None:
        self.log.flush()
        run = self.runs.get(model_call.device)
        if run is not None:
            refused, table = run.approximations.end_model_call()
            self._refused(refused)
            if table:
                logger.info("%s quality guard, the layers of this run (measured in its first step):\n%s", NODE_NAME,
                            table)
            self._summarise(model_call, run)
        if not model_call.reached:
            self.log.warn("unreached", f"this {self.family.name} model made no attention call through ComfyUI's "
                          "attention override, so the node has no effect on it (families such as Hunyuan-DiT and "
                          "PixArt call attention without it; see docs/model-families.md)")

    def _refused(self, why: Optional[str]) -> None:
        if why:
            self.log.warn(("cache budget", why), f"{why}: this run uses the plain {self.settings.backend} "
                          "approximation instead (nothing was kept; raise cache_gb or lower the resolution to use "
                          "the refresh mode)")

    def _summarise(self, model_call: ModelCall, run: SamplingRun) -> None:
        """Once per sampling run and device, at its first model call that served attention: how many of its calls
        the chosen approximation ran (the others ran exact), so a user sees when it did nothing."""
        if not self.settings.approximates or not model_call.calls or run.summarised:
            return
        run.summarised = True
        level = logging.INFO if model_call.approximated else logging.WARNING
        logger.log(level, "%s: %s served %d of the %d attention calls of this %s model call (the others ran exact: "
                   "min_tokens, full-precision calls, calls without a verified image layout; see the log above)",
                   NODE_NAME, self.settings.backend, model_call.approximated, model_call.calls, self.family.name)

    def apply_model_wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        """ComfyUI's keyed APPLY_MODEL wrapper: the ModelCall, and this patch re-installed in front of an
        override that a node placed after this one put in its place."""
        options = dict(transformer_options)
        model_call = self.begin_model_call(x, options.get("sigmas", t), c_crossattn, kwargs, options)
        options[self.state_key] = model_call
        self._add_regional_call(x, options, model_call)
        current = options.get("optimized_attention_override")
        if self.uses_override and not (isinstance(current, ChainedOverride) and current.reaches(self)):
            self.log.info("reinstalled", "another attention override was installed after this node "
                          f"({getattr(current, '__qualname__', type(current).__name__)}); this node puts itself in "
                          "front of it for each model call and passes the calls it does not serve to it")
            options["optimized_attention_override"] = ChainedOverride(self, current)
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        self.end_model_call(model_call)
        return out

    def _add_regional_call(self, latent: torch.Tensor, options: dict, model_call: ModelCall) -> None:
        """The regional prompts of this model call (regional.py), where its conds carry them and no wrapper before
        this one found them."""
        if REGIONS_KEY in options or not self.runs.prompts_by_uuid:
            return
        run = self.runs.get(model_call.device)
        regional, problem = regional_call(self.runs.prompts_by_uuid, options, latent, run.regional_threshold,
                                          run.regional_masks)
        if problem:
            self.log.warn(("regional batch", problem), problem)
        if regional is not None:
            self._check_aspect(regional, latent)
            options[REGIONS_KEY] = regional

    def _check_aspect(self, regional, latent: torch.Tensor) -> None:
        (mask_h, mask_w), (h, w) = regional.prompts.mask_size, latent.shape[-2:]
        if abs(mask_w / mask_h - w / h) > 0.01 * w / h:
            self.log.warn(("aspect", mask_h, mask_w, h, w), f"the regions' masks ({mask_w}x{mask_h}) have another "
                          f"aspect ratio than the latent ({w}x{h}); they are stretched to it, as ComfyUI's own masked "
                          "conditioning does")

    def model_function_wrapper(self, previous: Optional[Callable]) -> Callable:
        """The single-slot model-function wrapper (ComfyUI before keyed wrappers), chained to ``previous``."""

        def wrapper(apply_model, args):
            c = dict(args["c"])
            options = dict(c.get("transformer_options") or {})
            model_call = self.begin_model_call(args["input"], options.get("sigmas", args["timestep"]),
                                               c.get("c_crossattn"), c, options)
            options[self.state_key] = model_call
            c["transformer_options"] = options
            args = dict(args, c=c)
            out = previous(apply_model, args) if previous is not None else apply_model(args["input"], args["timestep"], **c)
            self.end_model_call(model_call)
            return out

        return wrapper

    # ---- once per attention call ----
    def override(self, previous: Optional[Callable], func, args: tuple, kwargs: dict):
        """Today's ComfyUI: one attention call, served, or passed on to ``previous`` (or ComfyUI's ``func``)."""
        options = kwargs.get("transformer_options")
        model_call = options.get(self.state_key) if isinstance(options, dict) else None
        if model_call is not None:
            model_call.reached = True
        out = self.server.serve(read_call(args, kwargs), model_call, pack_behind=isinstance(previous, ChainedOverride))
        if out is not None:
            return out
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def replace_patch(self, is_self_attention: bool) -> Callable:
        """Older ComfyUI: a replace patch fn(q, k, v, extra_options) -> (B, N, heads*dim_head) for attn1 or attn2."""

        def patch(q, k, v, extra_options):
            call = ComfyAttentionCall(q, k, v, extra_options["n_heads"], transformer_options=extra_options)
            model_call = extra_options.get(self.state_key)
            if model_call is not None:
                model_call.reached = True
            out = self.server.serve(call, model_call, is_self_attention)
            if out is None:
                from comfy.ldm.modules.attention import optimized_attention
                out = optimized_attention(q, k, v, call.heads)
            return out

        return patch


def unet_transformer_blocks(diffusion_model):
    """(block_name, number, transformer_index) of every transformer block of a ComfyUI UNet."""
    from comfy.ldm.modules.attention import SpatialTransformer

    found = []
    for block_name, blocks in (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                               ("output", diffusion_model.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    found.extend((block_name, number, index) for index in range(len(layer.transformer_blocks)))
    return found


def patch_model(model, settings: PatchSettings, measurements: Optional[List[tuple]] = None):
    """Clone ``model`` (a ComfyUI ModelPatcher), install the attention on the clone and return it.

    Raises ValueError for a choice that cannot work here (see settings.check_choices). ``measurements``: see
    AttentionPatch (benchmarks only)."""
    import comfy.ldm.modules.attention as comfy_attention

    check_choices(settings, model.model.diffusion_model)
    patched = model.clone()
    family = model_family(patched.model.diffusion_model)
    config = getattr(patched.model, "model_config", None)  # e.g. SD15, SDXL, Flux, WAN21_I2V: the name users know
    if config is not None:
        family = replace(family, name=type(config).__name__)
    attention_patch = AttentionPatch(settings, family, hasattr(comfy_attention, "wrap_attn"), measurements)
    mechanism = _install(patched, attention_patch)
    if mechanism is None:
        logger.warning("%s: this ComfyUI has no attention override (added in 0.3.60) and %s is not a UNet, so it "
                       "cannot be patched; the model is returned unpatched. Update ComfyUI.", NODE_NAME, family.name)
        return patched
    _add_wrappers(patched, attention_patch)
    if settings.mask is not None and family.mask_unsupported:
        logger.warning("%s: the mask is not applied to %s: %s", NODE_NAME, family.name, family.mask_unsupported)
    if family.known and not family.cross_attention and settings.apply_to == "cross-attention":
        logger.warning("%s: %s attends to its text inside self-attention (joint attention, or text appended to the "
                       "keys) and has no separate cross-attention; apply_to=cross-attention patches nothing",
                       NODE_NAME, family.name)
    if settings.regions_only:
        logger.info("%s: patched %s (%s) via %s: the attention calls of its regional prompts run exact with their "
                    "masks", REGIONAL_NODE_NAME, family.name, family.recognised_as, mechanism)
        return patched
    logger.info("%s: patched %s (%s) via %s; backend=%s (min_tokens=%d, other calls auto), heads=%s, layernorm=%s, "
                "apply_to=%s, strength=%.2f, sigma window [%.4g, %.4g], mask=%s", NODE_NAME, family.name,
                family.recognised_as, mechanism,
                settings.backend, settings.min_tokens, settings.heads or "model's", settings.layernorm,
                settings.apply_to, settings.strength, settings.sigma_end, settings.sigma_start,
                "none" if settings.mask is None else f"{tuple(settings.mask.shape)} {settings.mask_mode}")
    return patched


def _install(patched, attention_patch: AttentionPatch) -> Optional[str]:
    """The override, or the replace patches of an older ComfyUI's UNet; the mechanism's name (None: neither)."""
    if attention_patch.uses_override:
        transformer_options = patched.model_options.setdefault("transformer_options", {})
        previous = transformer_options.get("optimized_attention_override")
        transformer_options["optimized_attention_override"] = ChainedOverride(attention_patch, previous)
        return "optimized_attention_override"
    diffusion_model = patched.model.diffusion_model
    if not attention_patch.family.is_unet or not hasattr(diffusion_model, "input_blocks"):
        return None
    blocks = unet_transformer_blocks(diffusion_model)
    for block_name, number, index in blocks:
        if attention_patch.server.takes(True):
            patched.set_model_attn1_replace(attention_patch.replace_patch(True), block_name, number, index)
        if attention_patch.server.takes(False):
            patched.set_model_attn2_replace(attention_patch.replace_patch(False), block_name, number, index)
    return f"attn1/attn2 replace patches on {len(blocks)} transformer blocks"


def _add_wrappers(patched, attention_patch: AttentionPatch) -> None:
    """The keyed APPLY_MODEL and OUTER_SAMPLE wrappers where ComfyUI has them (December 2024 and later), else the
    single-slot model-function wrapper, chained (there a new run is told from a new schedule, run.py)."""
    if hasattr(patched, "add_wrapper_with_key"):
        import comfy.patcher_extension

        wrappers = comfy.patcher_extension.WrappersMP
        patched.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, attention_patch.apply_model_wrapper)
        if hasattr(wrappers, "OUTER_SAMPLE"):
            patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, attention_patch.sample_wrapper)
    else:
        patched.set_model_unet_function_wrapper(
            attention_patch.model_function_wrapper(patched.model_options.get("model_function_wrapper")))
        attention_patch.runs.runs_by_sigma = True  # no sampler wrapper, and no sample_sigmas either
