"""Serving an approximation in one sampling run on one device: plain, under the quality guard (guard.py), with the
refresh mode's residuals (reuse.py), or both. The one place that combines them: the guard decides and measures,
the cache keeps residuals, and neither reaches into the other."""
from __future__ import annotations

from typing import Callable, Hashable, Optional, Tuple

import torch

from .guard import APPROXIMATE, RESIDUAL, LayerKey, QualityGuard, compare
from .reuse import ReuseCache

Exact = Callable[[], torch.Tensor]
Approximate = Callable[[Optional[torch.Tensor]], torch.Tensor]  # may reuse the exact output it is given, or None


class ApproximationServer:
    """The served layers of one sampling run. ``guard`` None: no quality guard; ``cache`` None: no refresh mode."""

    def __init__(self, guard: Optional[QualityGuard] = None, cache: Optional[ReuseCache] = None):
        self.guard = guard
        self.cache = cache

    def begin_model_call(self, stream: Hashable, shape: Hashable, active: bool) -> Optional[str]:
        """A model call (a step) starts: ``stream`` its cond/uncond rows, ``shape`` its latent's, ``active`` inside
        the schedule window. Returns why its stream's residuals were refused by the budget (None otherwise)."""
        if self.cache is not None and active:
            return self.cache.begin_model_call(stream, shape)
        return None

    def end_model_call(self) -> Tuple[Optional[str], Optional[str]]:
        """(why the residuals were refused after a sizing step, the guard's table once per run), each or None."""
        refused = self.cache.end_model_call() if self.cache is not None else None
        table = self.guard.end_model_call() if self.guard is not None else None
        return refused, table

    def serve(self, key: LayerKey, query_tokens: int, exact: Exact, approximate: Approximate) -> torch.Tensor:
        """One served call of layer ``key`` (its place in the model call, query and key tokens)."""
        cache, guard = self.cache, self.guard
        if cache is not None and cache.on:
            key = key + (cache.stream,)
            if guard is None:
                return cache.attend(key, exact, approximate)
            return self._guarded_refresh(key, query_tokens, exact, approximate)
        if guard is None:
            return approximate(None)
        return guard.attend(key, query_tokens, exact, approximate)

    def _guarded_refresh(self, key: LayerKey, query_tokens: int, exact: Exact, approximate: Approximate):
        """The guard's choice among exact, approximation + residual and the plain approximation."""
        guard, cache = self.guard, self.cache
        guard.reuse_on = True
        if guard.should_measure(key, cache.sizing or cache.allows(key)):
            exact_out = exact()
            approx_out = approximate(exact_out)
            kept = cache.residual(key, approx_out)
            residual_error = compare(approx_out + kept, exact_out)[0] if kept is not None else None
            guard.record(key, query_tokens, *compare(approx_out, exact_out), residual_error=residual_error)
            if cache.sizing:
                cache.note_size(key, exact_out)  # every layer: one that drifts later may need its residual
            if not guard.wants_residual(key):
                cache.drop(key)  # the plain approximation, or exact: nothing to keep
            elif cache.allows(key):
                cache.store(key, exact_out, approx_out)
            return exact_out
        runs = guard.runs(key, cache.allows(key))
        if runs == APPROXIMATE:
            return approximate(None)
        if runs == RESIDUAL:
            return cache.attend(key, exact, approximate)
        return exact()

    def close(self) -> None:
        """The run is over: drop the residuals and the measurements."""
        if self.cache is not None:
            self.cache.close()
        self.guard = self.cache = None
