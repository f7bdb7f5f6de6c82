"""Which backend serves one attention call: whether the node takes the call at all (readable, inside the schedule
window, apply_to), the node's mask on it, its heads and layernorm, and the chosen backend where it may and can
serve the call, else the fastest exact one. Approximations are served through the sampling run (approximation.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..attention import BACKENDS, BackendNotSupported, RegionMask, prepare_call, run_call, select_backend
from .comfy_call import ComfyAttentionCall
from .families import CallPlacement, ModelCall, ModelFamily, mask_verdict, place_call
from .log import OnceLog
from .regional import REGIONS_KEY, RegionalCall
from .run import RunScope, SamplingRun
from .settings import PatchSettings, heads_mismatch_message


class CallServer:
    """Serves the attention calls of one patched model, for one node's settings."""

    def __init__(self, settings: PatchSettings, family: ModelFamily, runs: RunScope, log: OnceLog):
        self.settings = settings
        self.family = family
        self.runs = runs
        self.log = log

    def serve(self, call: Optional[ComfyAttentionCall], model_call: Optional[ModelCall],
              self_attention: Optional[bool] = None, pack_behind: bool = False) -> Optional[torch.Tensor]:
        """Our attention for one call, in the caller's layout; None: passed on unchanged (declined, or a call the
        pack cannot serve). ``self_attention``: known from where the call comes (attn1/attn2 replace patches).
        A call of a model call with regional prompts (regional.py) that this patch declines is served exact with
        their mask, unless ``pack_behind``: the override it passes calls to is one of the pack's, which applies them."""
        reason = self.decline_reason(call, model_call)
        regional = call.transformer_options.get(REGIONS_KEY) if call is not None else None
        if reason is not None and (regional is None or pack_behind):
            if reason:
                self.log.info(("declined", reason), f"{reason}; such calls are passed on unchanged")
            return None
        placement = place_call(self.family, call.query_tokens, call.key_tokens, model_call, call.transformer_options,
                               self_attention)
        taken = reason is None and (self_attention is not None or self.takes(placement.self_attention))
        if not taken and (regional is None or pack_behind):
            return None
        run = self.runs.get(model_call.device) if model_call is not None else None
        if regional is not None:
            region = self._regional(call, placement, model_call, regional)
        else:
            region = self._region(call, placement, model_call, run) if placement.self_attention else None
        return self._run(call, placement, model_call, run, region, not taken)

    def decline_reason(self, call: Optional[ComfyAttentionCall], model_call: Optional[ModelCall]) -> Optional[str]:
        """Why this call is passed on ("": silently, outside the schedule window or a patch for regional prompts
        only), or None to serve it."""
        if call is None:
            return "an attention call with arguments this pack cannot read"
        if self.settings.regions_only:
            return ""
        # a model called outside ComfyUI's apply_model (no ModelCall): the schedule read per call
        active = (model_call.active if model_call is not None
                  else self.settings.active_for(call.transformer_options.get("sigmas")))
        if not active:
            return ""
        if call.q.shape[0] != call.k.shape[0]:
            return (f"q's batch ({call.q.shape[0]}) differs from k's ({call.k.shape[0]}), as after HyperTile's "
                    "query tiling")
        return None

    def takes(self, self_attention: Optional[bool]) -> bool:
        """Whether apply_to takes this call; a call that cannot be told self or cross (a model the pack does not
        know) is taken only with apply_to=both."""
        apply_to = self.settings.apply_to
        if apply_to == "both":
            return True
        if self_attention is None:
            self.log.warn("self-or-cross", f"{self.family.recognised_as}: this pack cannot tell its self- from its "
                          f"cross-attention calls, so apply_to={apply_to} passes them all on")
            return False
        return (apply_to == "self-attention") == self_attention

    def _region(self, call: ComfyAttentionCall, placement: CallPlacement, model_call: Optional[ModelCall],
                run: Optional[SamplingRun]) -> Optional[RegionMask]:
        """The node's mask on one self-attention call, where its verdict lets it apply."""
        masker = self.settings.masker
        if masker is None:
            return None
        verdict = mask_verdict(self.family, placement, model_call, call.query_tokens, call.key_tokens,
                               masker.needs_query_places, call.transformer_options)
        if verdict.warning:
            self.log.warn(*verdict.warning)
        if not verdict.applies or run is None:
            return None
        chunks = max(1, len(call.transformer_options.get("cond_or_uncond") or [0]))
        latent_batch = max(1, model_call.latent_shape[0] // chunks)
        return run.region_mask(masker, verdict, call.query_tokens, call.q.shape[0], latent_batch, call.q.device)

    def _regional(self, call: ComfyAttentionCall, placement: CallPlacement, model_call: Optional[ModelCall],
                  regional: RegionalCall) -> Optional[RegionMask]:
        """The regional prompts' mask on one call (the node's own MASK gives way to them)."""
        if self.settings.masker is not None:
            self.log.warn("mask-and-regions", "a MASK on this node and regional prompts in the same model call: the "
                          "regional prompts' masks apply, this node's MASK does not")
        if model_call is None:
            return None
        region, why = regional.region_mask(self.family, placement, model_call, call.query_tokens, call.key_tokens,
                                           call.q.shape[0], call.q.device)
        if why:
            self.log.warn(("regional", why), f"regional prompts are not applied to {self.family.name} attention calls "
                          f"with {why}: there every prompt speaks to every image token")
        return region

    def _run(self, call: ComfyAttentionCall, placement: CallPlacement, model_call: Optional[ModelCall],
             run: Optional[SamplingRun], region: Optional[RegionMask], exact: bool = False) -> Optional[torch.Tensor]:
        """The chosen backend (or exact) on the node's heads, layernorm and masks; None where it cannot be prepared.
        ``exact``: a call served only for the regional prompts' mask, exact and on the model's own heads."""
        settings = self.settings
        masks = [mask for mask in (call.mask, region) if mask is not None]
        heads = (settings.heads if not exact else 0) or call.heads
        q, k, v = call.q, call.k, call.v
        regroup = heads != call.heads  # the user's own split of the same channels into heads
        if regroup:
            if call.channels % heads:
                raise ValueError(heads_mismatch_message(heads, [call.channels], call.q.shape, call.k.shape))
            if call.skip_reshape:
                q, k, v = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in (q, k, v))
        try:
            prepared = prepare_call(q, k, v, heads, masks or None, layernorm=settings.layernorm and not exact,
                                    scale=call.scale,
                                    skip_reshape=call.skip_reshape and not regroup, enable_gqa=call.enable_gqa,
                                    layout=placement.key if placement.self_attention else None,
                                    options=settings.options)
        except ValueError as error:
            self.log.info(("unreadable", str(error)), f"cannot serve a call ({error}); such calls are passed on "
                          "unchanged")
            return None
        name = select_backend(prepared) if exact else self._backend_for(call, prepared, placement.exact_only)
        if model_call is not None:
            model_call.count(BACKENDS[name].exact)
        skip_output_reshape = call.skip_output_reshape and not regroup
        if BACKENDS[name].exact:
            out = run_call(prepared, name, skip_output_reshape)
        else:
            out = self._approximation(call, prepared, name, model_call, run, skip_output_reshape)
        if regroup and call.skip_output_reshape:  # back to the caller's heads: (B, N, C) -> (B, H, N, C/H)
            b, n, c = out.shape
            out = out.view(b, n, call.heads, c // call.heads).transpose(1, 2)
        return out

    def _approximation(self, call: ComfyAttentionCall, prepared, name: str, model_call: Optional[ModelCall],
                       run: Optional[SamplingRun], skip_output_reshape: bool) -> torch.Tensor:
        """An approximate backend's output, blended by strength, served through the run (guard, refresh mode)."""
        strength = self.settings.strength

        def exact():
            return run_call(prepared, select_backend(prepared), skip_output_reshape)

        def approximate(exact_out=None):
            out = run_call(prepared, name, skip_output_reshape)
            if strength < 1.0:
                out = torch.lerp(exact() if exact_out is None else exact_out, out, strength)
            return out

        if model_call is None or run is None:
            return approximate()
        key = (model_call.next_served_call(), call.query_tokens, call.key_tokens)
        return run.approximations.serve(key, call.query_tokens, exact, approximate)

    def _backend_for(self, call: ComfyAttentionCall, prepared, exact_only: Optional[str]) -> str:
        """The chosen backend where it may and can serve the call; else the fastest exact one (auto).

        ``exact_only``: why no approximation may serve this call (see families.place_call)."""
        chosen = self.settings.backend
        if chosen != "auto" and call.query_tokens < self.settings.min_tokens:
            chosen = "auto"
        if chosen != "auto" and not BACKENDS[chosen].exact and exact_only is not None:
            self.log.warn(("unverified", exact_only), f"{chosen} runs exact on calls of {exact_only}")
            chosen = "auto"
        if chosen != "auto" and not BACKENDS[chosen].exact and not call.low_precision_allowed:
            self.log.info("full-precision", "calls that ask for full-precision attention "
                          f"(low_precision_attention=False) run exact instead of {chosen}")
            chosen = "auto"
        if chosen != "auto":
            try:
                name = select_backend(prepared, chosen)
                self.log.info(("backend", name), f"running backend {name}")
                return name
            except BackendNotSupported as error:
                self.log.info(("unsupported", chosen), f"{error}; those calls run exact (auto)")
        name = select_backend(prepared)
        self.log.info(("auto", name), f"exact calls run on backend {name} (auto)")
        return name
