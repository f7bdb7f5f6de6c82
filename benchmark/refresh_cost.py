"""The refresh mode's cost on paper (docs/quality.md): the residuals' memory and the speedup over a run, from the
approximation's speedup on one call. Arithmetic for the docs and their tests; the node measures, never predicts."""
from __future__ import annotations

from typing import Tuple


def cache_bytes(layers: int, batch: int, tokens: int, channels: int, bytes_per_value: int) -> int:
    """What the residuals of ``layers`` attention layers hold: one (batch, tokens, channels) tensor each."""
    return layers * batch * tokens * channels * bytes_per_value


def refresh_schedule(steps: int, refresh: int, first_run: bool = False) -> Tuple[int, int, int]:
    """(exact-only steps, refresh steps, approximation + residual steps) of a run of ``steps`` model calls per
    stream: a later run of a known size refreshes at steps 0, refresh, 2 refresh, ...; a run at a new size first
    spends one step sizing (exact), then refreshes at 1, 1 + refresh, ..."""
    sizing = 1 if first_run else 0
    refreshes = len(range(sizing, steps, refresh))
    return sizing, refreshes, steps - sizing - refreshes


def amortised_speedup(approximation_speedup: float, refresh: int, steps: int, first_run: bool = False) -> float:
    """Exact attention's time over a run / the refresh mode's, from the approximation's speedup on one call: a
    refresh step costs exact + approximation, a step in between the approximation (the residual's add is left out)."""
    approx = 1.0 / approximation_speedup
    sizing, refreshes, between = refresh_schedule(steps, refresh, first_run)
    return steps / (sizing + refreshes * (1.0 + approx) + between * approx)
