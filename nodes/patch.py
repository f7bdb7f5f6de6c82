"""Install the pack's attention on a clone of a ComfyUI model.

Two mechanisms, chosen by feature detection:
- today's ComfyUI (``comfy.ldm.modules.attention.wrap_attn`` exists): an ``optimized_attention_override``
  in the clone's transformer_options. It sees every attention call of UNets and DiTs that passes
  transformer_options, with the original function, and passes the calls it declines on to the override
  installed before it, or to that original function.
- older ComfyUI: ``attn1``/``attn2`` replace patches on every transformer block of a UNet.

Once per model call, a wrapper around the model (ComfyUI's keyed APPLY_MODEL wrapper where it exists, the
single-slot model-function wrapper, chained, where not) decides what every attention call of that model
call reads: whether it is inside the schedule window, the latent's shape and the text lengths. The
per-call path only reads those decisions: it converts no tensor to a Python number, so it neither
synchronises the device nor breaks a compiled graph. Everything ComfyUI is imported inside functions:
importing this module needs no ComfyUI.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional

import torch

from ..attention import BACKENDS, BackendNotSupported, RegionMask, prepare_call, run_call, select_backend
from ..attention.backends.base import tracing
from ..attention.layout import TokenLayout
from ..attention.regions import MASK_MODES, QUERY_PLACES_NEEDED, region_mask_for_layout
from .comfy_call import ComfyAttentionCall, read_call
from .families import (ModelCall, ModelFamily, attention_widths, call_layout, is_self_attention, model_family,
                       reference_tokens)
from .guard import QualityGuard
from .reuse import GIB, OFF, ReuseCache

logger = logging.getLogger("efficient_attention_pop")

NODE_NAME = "Efficient Attention (PoP)"
WRAPPER_KEY = "efficient_attention_pop"  # key of the pack's APPLY_MODEL wrappers
APPLY_TO = ("both", "self-attention", "cross-attention")


@dataclass(frozen=True)
class PatchSettings:
    """The node's choices, translated."""

    backend: str = "auto"
    heads: int = 0
    layernorm: bool = False
    apply_to: str = "both"
    min_tokens: int = 0
    strength: float = 1.0
    sigma_start: float = float("inf")  # the patch is active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    mask: Optional[torch.Tensor] = None  # ComfyUI MASK, (B, H, W) or (H, W)
    mask_mode: str = "isolate regions"
    options: Dict[str, object] = field(default_factory=dict)  # the chosen backend's options (e.g. downsample)
    max_error: float = 0.0  # quality guard bound on an approximation's per-layer relative error; 0 = off
    refresh: int = 0  # approximations: exact attention every `refresh` steps, its residual reused between; 0 = off
    cache_gb: float = 8.0  # the refresh mode's budget for the residuals it keeps, GiB (per device)

    def __post_init__(self):
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(backend_problem(self.backend))
        if self.apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {self.apply_to!r}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"Unknown mask mode {self.mask_mode!r}; expected one of {MASK_MODES}")
        if self.mask is not None and (not isinstance(self.mask, torch.Tensor) or self.mask.ndim not in (2, 3)):
            shape = tuple(self.mask.shape) if isinstance(self.mask, torch.Tensor) else type(self.mask).__name__
            raise ValueError(f"Mask of shape {shape}: expected ComfyUI's [B, H, W] or [H, W] MASK")
        if self.refresh < 0 or self.cache_gb < 0:
            raise ValueError(f"refresh and cache_gb must be >= 0; got refresh={self.refresh}, cache_gb={self.cache_gb}")
        if self.heads < 0 or self.min_tokens < 0 or not 0.0 <= self.strength <= 1.0 or self.max_error < 0:
            raise ValueError(f"heads, min_tokens and max_error must be >= 0 and strength in [0, 1]; got "
                             f"heads={self.heads}, min_tokens={self.min_tokens}, max_error={self.max_error}, "
                             f"strength={self.strength}")

    @property
    def full_window(self) -> bool:
        return self.sigma_start == float("inf") and self.sigma_end <= 0.0


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


@dataclass(frozen=True)
class CallLayouts:
    """Where one call's image tokens are, in its queries and in its keys (None: not placed), and ``problem``: why
    they could not be placed where the tokens did not add up (None where nothing was wrong)."""

    query: Optional[TokenLayout]
    key: Optional[TokenLayout]
    problem: Optional[str] = None


class AttentionPatch:
    """The attention a patched model runs, for one node's settings. ComfyUI deep-copies model options on
    every clone; this object is configuration plus logging state, so copies share it."""

    def __init__(self, settings: PatchSettings, family: ModelFamily, uses_override: bool):
        self.settings = settings
        self.family = family
        self.uses_override = uses_override  # False: attn1/attn2 replace patches (ComfyUI before the override)
        self.state_key = f"{WRAPPER_KEY}.{id(self):x}"  # transformer_options entry holding this patch's ModelCall
        self._regions: Dict[tuple, Optional[RegionMask]] = {}
        self._logged = set()
        self._deferred = []  # (level, message) logged while torch.compile traced; written after the model call
        # Per device: ComfyUI may sample one model on several GPUs at once with deep copies of the patcher, which
        # share this object; a device's guard measurements and decisions, and its run, are its own.
        self.guards: Dict[str, QualityGuard] = {}
        self.caches: Dict[str, ReuseCache] = {}  # device -> the refresh mode's residuals (settings.refresh > 0)
        self._runs: Dict[str, object] = {}  # device -> the schedule of its sampling run in progress
        self._summarised_runs: Dict[str, object] = {}  # device -> the run whose served-calls summary was logged

    def __deepcopy__(self, memo):
        return self

    def guard_for(self, device: str) -> QualityGuard:
        """The quality guard of one device."""
        if device not in self.guards:
            self.guards[device] = QualityGuard(self.settings.max_error)
        return self.guards[device]

    def cache_for(self, device: str) -> Optional[ReuseCache]:
        """The refresh mode's cache of one device; None where the mode is off or the backend is exact."""
        settings = self.settings
        if not settings.refresh or settings.backend == "auto" or BACKENDS[settings.backend].exact:
            return None
        if device not in self.caches:
            self.caches[device] = ReuseCache(settings.refresh, settings.cache_gb * GIB)
        return self.caches[device]

    # ---- once per model call ----
    def begin_model_call(self, latent: torch.Tensor, sigmas, context, extra_conds: dict,
                         transformer_options: dict) -> ModelCall:
        """Decide what every attention call of one model call reads (the only place a tensor becomes a number)."""
        settings, family = self.settings, self.family
        active = True
        if not settings.full_window and isinstance(sigmas, torch.Tensor) and sigmas.numel():
            sigma = float(sigmas.flatten()[0])
            active = settings.sigma_end <= sigma <= settings.sigma_start
        text_tokens = context.shape[1] if isinstance(context, torch.Tensor) and context.ndim == 3 else None
        context_tokens = set(family.fixed_context_tokens) | ({text_tokens} if text_tokens is not None else set())
        for keyword in family.context_keywords:
            extra = extra_conds.get(keyword)
            if isinstance(extra, torch.Tensor) and extra.ndim >= 2:
                context_tokens.add(extra.shape[-2])
        device = str(latent.device)
        guard = self.guard_for(device)
        cache = self.cache_for(device)
        if transformer_options.get("sample_sigmas") is not self._runs.get(device, self):
            self._runs[device] = transformer_options.get("sample_sigmas")  # a new sampling run on this device
            if guard.active:
                guard.start_run()  # calibrate again
            if cache is not None:
                cache.start_run()
        if cache is not None:
            cache.phase = OFF
            if active:  # a step of the refresh mode: a model call inside the schedule window
                # cond and uncond in separate model calls (or conds that do not batch) keep their residuals apart
                stream = (tuple(transformer_options.get("cond_or_uncond") or ()),
                          tuple(str(uuid) for uuid in transformer_options.get("uuids") or ()))
                self._refused(cache.begin_model_call(stream, tuple(latent.shape)))
        changing = [keyword for keyword in family.layout_changing_keywords if extra_conds.get(keyword) is not None]
        unplaceable = f"with {changing[0]} its tokens are laid out in a way this pack cannot place" if changing else None
        return ModelCall(tuple(latent.shape), frozenset(context_tokens), text_tokens, active,
                         reference_tokens(family, extra_conds), unplaceable, device=device)

    def end_model_call(self, model_call: ModelCall) -> None:
        while self._deferred:
            logger.log(*self._deferred.pop(0))
        cache = self.cache_for(model_call.device)
        if cache is not None:
            self._refused(cache.end_model_call())
            cache.phase = OFF
        guard = self.guard_for(model_call.device)
        if guard.active:
            table = guard.end_model_call()
            if table:
                logger.info("%s quality guard, the layers of this run (measured in its first step):\n%s", NODE_NAME,
                            table)
        self._summarise(model_call)
        if not model_call.reached:
            self._warn_once("unreached", f"{NODE_NAME}: this {self.family.name} model made no attention call "
                            "through ComfyUI's attention override, so the node has no effect on it (families such "
                            "as Hunyuan-DiT and PixArt call attention without it; see docs/model-families.md)")

    def _refused(self, why: Optional[str]) -> None:
        if why:
            self._warn_once(("cache budget", why), f"{NODE_NAME}: {why}: this run uses the plain {self.settings.backend} "
                            "approximation instead (nothing was kept; raise cache_gb or lower the resolution to use "
                            "the refresh mode)")

    def _summarise(self, model_call: ModelCall) -> None:
        """Once per sampling run and device, at its first model call that served attention: how many of its calls
        the chosen approximation ran (the others ran exact), so a user sees when it did nothing."""
        backend = self.settings.backend
        run = self._runs.get(model_call.device)
        if (backend == "auto" or BACKENDS[backend].exact or not model_call.calls
                or self._summarised_runs.get(model_call.device, self) is run):
            return
        self._summarised_runs[model_call.device] = run
        level = logging.INFO if model_call.approximated else logging.WARNING
        logger.log(level, "%s: %s served %d of the %d attention calls of this %s model call (the others ran exact: "
                   "min_tokens, full-precision calls, calls without a verified image layout; see the log above)",
                   NODE_NAME, backend, model_call.approximated, model_call.calls, self.family.name)

    def apply_model_wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        """ComfyUI's keyed APPLY_MODEL wrapper: the ModelCall, and this patch re-installed in front of an
        override that a node placed after this one put in its place."""
        options = dict(transformer_options)
        model_call = self.begin_model_call(x, options.get("sigmas", t), c_crossattn, kwargs, options)
        options[self.state_key] = model_call
        current = options.get("optimized_attention_override")
        if self.uses_override and not (isinstance(current, ChainedOverride) and current.reaches(self)):
            self._log_once("reinstalled", f"{NODE_NAME}: another attention override was installed after this node "
                           f"({getattr(current, '__qualname__', type(current).__name__)}); this node puts itself in "
                           "front of it for each model call and passes the calls it does not serve to it")
            options["optimized_attention_override"] = ChainedOverride(self, current)
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        self.end_model_call(model_call)
        return out

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

    # ---- today's ComfyUI: optimized_attention_override ----
    def override(self, previous: Optional[Callable], func, args: tuple, kwargs: dict):
        """One attention call: served, or passed on to ``previous`` (or ComfyUI's ``func``) unchanged."""
        options = kwargs.get("transformer_options")
        model_call = options.get(self.state_key) if isinstance(options, dict) else None
        if model_call is not None:
            model_call.reached = True
        call = read_call(args, kwargs)
        reason = self._decline_reason(call, model_call)
        if reason is None:
            layouts = self._layouts(call, model_call)
            is_self = self._is_self_attention(call, model_call, layouts)
            if self.serves(is_self):
                out = self.run(call, is_self, model_call, layouts)
                if out is not None:
                    return out
        elif reason:
            self._log_once(("declined", reason), f"{NODE_NAME}: {reason}; such calls are passed on unchanged")
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _decline_reason(self, call: Optional[ComfyAttentionCall], model_call: Optional[ModelCall]) -> Optional[str]:
        """Why this call is passed on ("": silently, outside the schedule window), or None to serve it."""
        if call is None:
            return "an attention call with arguments this pack cannot read"
        if model_call is not None:
            active = model_call.active
        else:
            active = self.settings.full_window or self._active_without_model_call(call.transformer_options)
        if not active:
            return ""
        if call.q.shape[0] != call.k.shape[0]:
            return (f"q's batch ({call.q.shape[0]}) differs from k's ({call.k.shape[0]}), as after HyperTile's "
                    "query tiling")
        return None

    def _active_without_model_call(self, transformer_options: dict) -> bool:
        """The schedule check for a model called outside ComfyUI's apply_model (no ModelCall): per call."""
        sigmas = transformer_options.get("sigmas")
        if not isinstance(sigmas, torch.Tensor) or not sigmas.numel():
            return True
        return self.settings.sigma_end <= float(sigmas.flatten()[0]) <= self.settings.sigma_start

    def _layouts(self, call: ComfyAttentionCall, model_call: Optional[ModelCall]) -> "CallLayouts":
        """Where this call's image tokens are, in its queries and in its keys (each None where not known), and why
        they could not be placed where the tokens did not add up."""
        if model_call is not None and model_call.unplaceable:
            return CallLayouts(None, None, model_call.unplaceable)
        options = call.transformer_options
        n, m = call.query_tokens, call.key_tokens
        key_layout, problem = call_layout(self.family, m, model_call, options)
        query_layout = key_layout
        if n != m:
            query_layout, query_problem = call_layout(self.family, n, model_call, options)
            problem = problem or query_problem
        if key_layout is None and self.family.keys_append_text and query_layout is not None and m > n:
            key_layout = replace(query_layout, after=query_layout.after + m - n)  # Cascade: text after the image
            problem = None
        return CallLayouts(query_layout, key_layout, problem)

    def _is_self_attention(self, call: ComfyAttentionCall, model_call: Optional[ModelCall],
                           layouts: "CallLayouts") -> Optional[bool]:
        query_is_image = None if self.family.mask_unsupported or model_call is None else layouts.query is not None
        return is_self_attention(self.family, call.query_tokens, call.key_tokens, model_call, query_is_image,
                                 layouts.key is not None)

    def serves(self, is_self_attention: Optional[bool]) -> bool:
        """Whether apply_to takes this call; a call that cannot be told self or cross (a model the pack does not
        know) is taken only with apply_to=both."""
        apply_to = self.settings.apply_to
        if apply_to == "both":
            return True
        if is_self_attention is None:
            self._warn_once("self-or-cross", f"{NODE_NAME}: {self.family.recognised_as}: this pack cannot tell its "
                            f"self- from its cross-attention calls, so apply_to={apply_to} passes them all on")
            return False
        return (apply_to == "self-attention") == is_self_attention

    # ---- the attention itself ----
    def run(self, call: ComfyAttentionCall, is_self_attention: Optional[bool], model_call: Optional[ModelCall],
            layouts: "CallLayouts"):
        """Our attention for one served call, in the caller's layout; None when the pack cannot serve it."""
        settings = self.settings
        masks = [call.mask] if call.mask is not None else []
        if settings.mask is not None and is_self_attention:
            region = self._region(call, model_call, layouts)
            if region is not None:
                masks.append(region)
        heads = settings.heads or call.heads
        q, k, v = call.q, call.k, call.v
        regroup = heads != call.heads  # the user's own split of the same channels into heads
        if regroup:
            if call.channels % heads:
                raise ValueError(heads_mismatch_message(heads, [call.channels], call))
            if call.skip_reshape:
                q, k, v = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in (q, k, v))
        try:
            prepared = prepare_call(q, k, v, heads, masks or None, layernorm=settings.layernorm, scale=call.scale,
                                    skip_reshape=call.skip_reshape and not regroup, enable_gqa=call.enable_gqa,
                                    layout=layouts.key if is_self_attention else None, options=settings.options)
        except ValueError as error:
            self._log_once(("unreadable", str(error)), f"{NODE_NAME}: cannot serve a call ({error}); such calls are "
                           "passed on unchanged")
            return None
        name = self._backend_for(call, prepared, self._unverified(is_self_attention, layouts))
        if model_call is not None:
            model_call.count(BACKENDS[name].exact)
        skip_output_reshape = call.skip_output_reshape and not regroup
        if not BACKENDS[name].exact:
            out = self._approximation(call, prepared, name, model_call, skip_output_reshape)
        else:
            out = run_call(prepared, name, skip_output_reshape)
        if regroup and call.skip_output_reshape:  # back to the caller's heads: (B, N, C) -> (B, H, N, C/H)
            b, n, c = out.shape
            out = out.view(b, n, call.heads, c // call.heads).transpose(1, 2)
        return out

    def _approximation(self, call: ComfyAttentionCall, prepared, name: str, model_call: Optional[ModelCall],
                       skip_output_reshape: bool) -> torch.Tensor:
        """An approximate backend's output, blended by strength and kept only where the quality guard allows."""
        guard = self.guard_for(model_call.device if model_call is not None else str(call.q.device))
        strength = self.settings.strength

        def exact():
            return run_call(prepared, select_backend(prepared), skip_output_reshape)

        def approximate(exact_out=None):
            out = run_call(prepared, name, skip_output_reshape)
            if strength < 1.0:
                out = torch.lerp(exact() if exact_out is None else exact_out, out, strength)
            return out

        cache = self.cache_for(model_call.device) if model_call is not None else None
        if cache is not None and cache.phase != OFF:  # the refresh mode (reuse.py)
            key = (model_call.next_served_call(), call.query_tokens, call.key_tokens, cache.stream)
            if guard.active:
                return guard.attend_with_reuse(key, call.query_tokens, exact, approximate, cache)
            return cache.attend(key, exact, approximate)
        if not guard.active or model_call is None:
            return approximate()
        key = (model_call.next_served_call(), call.query_tokens, call.key_tokens)
        return guard.attend(key, call.query_tokens, exact, approximate)

    def _unverified(self, is_self_attention: Optional[bool], layouts: "CallLayouts") -> Optional[str]:
        """Why no approximation may serve this call, or None.

        Not on a model the pack does not know, nor on a call whose tokens do not add up to the layout its family
        has: what the model does there is not what the pack knows. (Backends that pool the image grid also refuse
        every call without a placed grid, e.g. text-only calls: those run exact too.)"""
        if not self.family.known:
            return f"{self.family.recognised_as}, whose token layout this pack cannot verify"
        if is_self_attention and layouts.problem:
            return f"{self.family.name} where {layouts.problem}"
        return None

    def _backend_for(self, call: ComfyAttentionCall, prepared, unverified: Optional[str]) -> str:
        """The chosen backend where it may and can serve the call; else the fastest exact one (auto).

        ``unverified``: why an approximation may not serve this call (see _unverified)."""
        settings = self.settings
        chosen = settings.backend
        if chosen != "auto" and call.query_tokens < settings.min_tokens:
            chosen = "auto"
        if chosen != "auto" and not BACKENDS[chosen].exact and unverified is not None:
            self._warn_once(("unverified", unverified), f"{NODE_NAME}: {chosen} runs exact on calls of {unverified}")
            chosen = "auto"
        if chosen != "auto" and not BACKENDS[chosen].exact and not call.low_precision_allowed:
            self._log_once("full-precision", f"{NODE_NAME}: calls that ask for full-precision attention "
                           f"(low_precision_attention=False) run exact instead of {chosen}")
            chosen = "auto"
        if chosen != "auto":
            try:
                name = select_backend(prepared, chosen)
                self._log_once(("backend", name), f"{NODE_NAME}: running backend {name}")
                return name
            except BackendNotSupported as error:
                self._log_once(("unsupported", chosen), f"{NODE_NAME}: {error}; those calls run exact (auto)")
        name = select_backend(prepared)
        self._log_once(("auto", name), f"{NODE_NAME}: exact calls run on backend {name} (auto)")
        return name

    def _region(self, call: ComfyAttentionCall, model_call: Optional[ModelCall],
                layouts: "CallLayouts") -> Optional[RegionMask]:
        family = self.family
        query_layout, key_layout = layouts.query, layouts.key
        if family.mask_unsupported:
            return None  # said once when the node ran (patch_model)
        if model_call is None:
            self._warn_once("no-latent", f"{NODE_NAME}: the latent size is unknown in this call, so the mask is not "
                            "applied (was the model called outside a ComfyUI sampler?)")
            return None
        if model_call.unplaceable:
            self._warn_once(("unplaceable", model_call.unplaceable), f"{NODE_NAME}: the mask is not applied to "
                            f"{family.name}: {model_call.unplaceable}")
            return None
        n, m = call.query_tokens, call.key_tokens
        if key_layout is None and not layouts.problem and (not family.is_unet
                                                           or self._without_image_tokens(call, model_call)):
            return None  # fewer tokens than the image (text refiners) or temporal attention: no image grid to mask
        if key_layout is None:
            why = layouts.problem or f"its {m} key tokens do not fit the latent {model_call.latent_shape}"
            self._warn_once(("layout", n, m), f"{NODE_NAME}: the mask is not applied to such {family.name} attention "
                            f"calls: {why}")
            return None
        if query_layout is None and self.settings.mask_mode == QUERY_PLACES_NEEDED:
            self._warn_once(("query-places", n), f"{NODE_NAME}: {n} of {m} query tokens in a self-attention call "
                            "(merged, e.g. by ToMe): 'isolate regions' needs each query's place, so the mask is "
                            "not applied to such calls")
            return None
        batch = call.q.shape[0]
        chunks = max(1, len(call.transformer_options.get("cond_or_uncond") or [0]))
        latent_batch = max(1, model_call.latent_shape[0] // chunks)
        key = (query_layout, key_layout, n, batch, latent_batch, str(call.q.device))
        if key not in self._regions:
            region = region_mask_for_layout(self.settings.mask, self.settings.mask_mode, query_layout, batch,
                                            latent_batch, key_layout=key_layout, query_tokens=n)
            if region is not None:  # labels live on the compute device, once per layout
                region = RegionMask(region.query_labels.to(call.q.device), region.key_labels.to(call.q.device))
            self._regions[key] = region
        return self._regions[key]

    @staticmethod
    def _without_image_tokens(call: ComfyAttentionCall, model_call: ModelCall) -> bool:
        """A UNet self-attention call over no image tokens: across video frames (SVD's temporal attention, beside a
        level of another size), or the text alone."""
        activations = call.transformer_options.get("activations_shape")
        if activations is not None and len(activations) == 4 and call.query_tokens != activations[-2] * activations[-1]:
            return True
        return call.query_tokens == call.key_tokens == model_call.text_tokens

    def _log_once(self, key, message, level=logging.INFO):
        """Log a message once per patch; while torch.compile traces the model (where a log call would break the
        graph) it is kept and written after the model call."""
        if key not in self._logged:
            self._logged.add(key)
            if tracing():
                self._deferred.append((level, message))
            else:
                logger.log(level, message)

    def _warn_once(self, key, message):
        self._log_once(key, message, logging.WARNING)

    # ---- older ComfyUI: attn1 / attn2 replace patches ----
    def replace_patch(self, is_self_attention: bool) -> Callable:
        """A replace patch fn(q, k, v, extra_options) -> (B, N, heads*dim_head) for attn1 or attn2."""

        def patch(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            call = ComfyAttentionCall(q, k, v, heads, None, False, False, None, False, True, extra_options)
            model_call = extra_options.get(self.state_key)
            if model_call is not None:
                model_call.reached = True
            out = None
            if self._decline_reason(call, model_call) is None:
                out = self.run(call, is_self_attention, model_call, self._layouts(call, model_call))
            if out is None:
                from comfy.ldm.modules.attention import optimized_attention
                out = optimized_attention(q, k, v, heads)
            return out

        return patch


def heads_mismatch_message(heads: int, widths, call: Optional[ComfyAttentionCall] = None) -> str:
    """The error for a ``heads`` choice that does not divide the attention widths, starting with the words
    users search for."""
    widths = sorted(set(widths))
    common = widths[0]
    for width in widths[1:]:
        common = _gcd(common, width)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    shown = ", ".join(str(d) for d in divisors[:10]) + (", ..." if len(divisors) > 10 else "")
    where = (f"this attention layer's {widths[0]} channels (q {tuple(call.q.shape)}, k {tuple(call.k.shape)})"
             if call is not None else f"this model's attention widths ({', '.join(map(str, widths))} channels)")
    return (f"Mismatch in tensor dimensions: {NODE_NAME} heads={heads} does not divide {where}; use 0 (the "
            f"model's own heads) or a divisor of {common} such as {shown}")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


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


def usable_backends():
    """"auto" and the backends the node offers that can run on this machine, in the order the node lists them."""
    return ["auto"] + [name for name, backend in BACKENDS.items()
                       if backend.not_in_node is None and backend.unavailable_reason() is None]


def backend_problem(backend: str) -> Optional[str]:
    """Why the node cannot use ``backend`` on this machine (None when it can), in words for the node's user."""
    if backend in usable_backends():
        return None
    choices = ", ".join(usable_backends())
    if backend not in BACKENDS:
        return f"{NODE_NAME}: unknown backend {backend!r}; choose one of {choices}"
    if BACKENDS[backend].not_in_node:
        return f"{NODE_NAME}: backend {backend!r} is not offered by the node: {BACKENDS[backend].not_in_node}; " \
               f"choose one of {choices}"
    return (f"{NODE_NAME}: backend {backend!r} is not available on this machine "
            f"({BACKENDS[backend].unavailable_reason()}); choose one of {choices}")


def check_choices(settings: PatchSettings, diffusion_model) -> None:
    """Refuse, before sampling starts, a choice that cannot work with this model on this machine."""
    problem = backend_problem(settings.backend)
    if problem:
        raise ValueError(problem)
    if settings.heads:
        widths = attention_widths(diffusion_model)
        if any(width % settings.heads for width in widths):
            raise ValueError(heads_mismatch_message(settings.heads, widths))


def patch_model(model, settings: PatchSettings):
    """Clone ``model`` (a ComfyUI ModelPatcher), install the attention on the clone and return it.

    Raises ValueError for a choice that cannot work here (see check_choices)."""
    import comfy.ldm.modules.attention as comfy_attention

    check_choices(settings, model.model.diffusion_model)
    patched = model.clone()
    diffusion_model = patched.model.diffusion_model
    family = model_family(diffusion_model)
    config = getattr(patched.model, "model_config", None)  # e.g. SD15, SDXL, Flux, WAN21_I2V: the name users know
    if config is not None:
        family = replace(family, name=type(config).__name__)
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    attention_patch = AttentionPatch(settings, family, uses_override=hasattr(comfy_attention, "wrap_attn"))
    if attention_patch.uses_override:
        mechanism = "optimized_attention_override"
        previous = transformer_options.get("optimized_attention_override")
        transformer_options["optimized_attention_override"] = ChainedOverride(attention_patch, previous)
    elif family.is_unet and hasattr(diffusion_model, "input_blocks"):
        blocks = unet_transformer_blocks(diffusion_model)
        for block_name, number, index in blocks:
            if attention_patch.serves(True):
                patched.set_model_attn1_replace(attention_patch.replace_patch(True), block_name, number, index)
            if attention_patch.serves(False):
                patched.set_model_attn2_replace(attention_patch.replace_patch(False), block_name, number, index)
        mechanism = f"attn1/attn2 replace patches on {len(blocks)} transformer blocks"
    else:
        logger.warning("%s: this ComfyUI has no attention override (added in 0.3.60) and %s is not a UNet, so it "
                       "cannot be patched; the model is returned unpatched. Update ComfyUI.", NODE_NAME, family.name)
        return patched
    if hasattr(patched, "add_wrapper_with_key"):
        import comfy.patcher_extension

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                     attention_patch.apply_model_wrapper)
    else:
        patched.set_model_unet_function_wrapper(
            attention_patch.model_function_wrapper(patched.model_options.get("model_function_wrapper")))
    if settings.mask is not None and family.mask_unsupported:
        logger.warning("%s: the mask is not applied to %s: %s", NODE_NAME, family.name, family.mask_unsupported)
    if family.known and not family.cross_attention and settings.apply_to == "cross-attention":
        logger.warning("%s: %s attends to its text inside self-attention (joint attention, or text appended to the "
                       "keys) and has no separate cross-attention; apply_to=cross-attention patches nothing",
                       NODE_NAME, family.name)
    logger.info("%s: patched %s (%s) via %s; backend=%s (min_tokens=%d, other calls auto), heads=%s, layernorm=%s, "
                "apply_to=%s, strength=%.2f, sigma window [%.4g, %.4g], mask=%s", NODE_NAME, family.name,
                family.recognised_as, mechanism,
                settings.backend, settings.min_tokens, settings.heads or "model's", settings.layernorm,
                settings.apply_to, settings.strength, settings.sigma_end, settings.sigma_start,
                "none" if settings.mask is None else f"{tuple(settings.mask.shape)} {settings.mask_mode}")
    return patched


def settings_for_model(model, *, start_percent: float, end_percent: float, **choices) -> PatchSettings:
    """PatchSettings with the schedule window converted by the model's own model_sampling."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent and end_percent must satisfy 0 <= start <= end <= 1; got {start_percent}, "
                         f"{end_percent}")
    sampling = (model.get_model_object("model_sampling") if hasattr(model, "get_model_object")
                else model.model.model_sampling)  # ComfyUI before mid-2024
    sigma_start = float("inf") if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent))
    sigma_end = 0.0 if end_percent >= 1.0 else float(sampling.percent_to_sigma(end_percent))
    return replace(PatchSettings(**choices), sigma_start=sigma_start, sigma_end=sigma_end)
