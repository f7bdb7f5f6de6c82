"""The quality guard: an approximation is kept only on the attention layers where it stays within a stated error.

Layers are told apart by their place in the model call (the n-th attention call the node serves, with its
query and key counts): every model call of a sampling run makes the same calls in the same order. In the first
model call of a run every served layer computes both the approximation and exact attention and returns the
exact output; a layer keeps the approximation afterwards only if its relative L2 error,
||approx - exact|| / ||exact||, is within ``max_error``. In each later model call one layer (rotating) is
measured again and goes back to exact for the rest of the run if it drifted past the bound.

With the refresh mode (reuse.py; approximation.py combines the two) the guard chooses per layer among three:
the plain approximation where its error is within the bound (cheapest: no refresh steps, no memory), else the
approximation plus the residual kept from the layer's last refresh where that is within the bound, else exact. A
layer whose plain approximation is over the bound is measured again (exact returned) until it has a residual from
an earlier step, then once more to measure the approximation plus that residual; the rotating re-measurement
covers such layers too, and every measurement refreshes the residual it measured. The log table says what each
layer runs. A guard lives for one sampling run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

LayerKey = tuple  # (index of the call in the model call, query tokens, key tokens[, stream with the refresh mode])
APPROXIMATE, RESIDUAL, EXACT = "approximate", "approximate+residual", "exact"


def compare(approximation: torch.Tensor, exact: torch.Tensor) -> Tuple[float, float]:
    """(||approximation - exact|| / ||exact||, cosine similarity) in fp32: the guard's only host read, when it
    measures."""
    approximation, exact = approximation.float().flatten(), exact.float().flatten()
    tiny = torch.finfo(torch.float32).tiny
    error = (approximation - exact).norm() / exact.norm().clamp_min(tiny)
    cosine = approximation @ exact / (approximation.norm() * exact.norm()).clamp_min(tiny)
    return float(error), float(cosine)


@dataclass
class LayerRecord:
    tokens: int
    errors: List[float] = field(default_factory=list)
    cosines: List[float] = field(default_factory=list)
    approximate: bool = False
    residual_errors: List[float] = field(default_factory=list)  # approximation + residual against exact
    residual: Optional[bool] = None  # within the bound with the residual; None: not measured yet

    def runs(self, reuse: bool) -> str:
        if self.approximate:
            return APPROXIMATE
        return RESIDUAL if reuse and self.residual else EXACT


@dataclass
class QualityGuard:
    """For one sampling run: which layers may use the approximation. ``max_error`` 0 turns the guard off (the
    approximation runs everywhere); ``measurements`` (a list) makes it measure every call, append (layer key, query
    tokens, error, cosine) to it and always return exact (for benchmarks)."""

    max_error: float
    measurements: Optional[List[tuple]] = None
    layers: Dict[LayerKey, LayerRecord] = field(default_factory=dict)
    model_calls: int = 0  # model calls of this run so far
    calibrated: bool = False  # the first model call of the run is over
    reuse_on: bool = False  # some layer measured with a refresh-mode cache this run
    table_logged: bool = False

    @property
    def measure_only(self) -> bool:
        return self.measurements is not None

    @property
    def active(self) -> bool:
        return self.max_error > 0 or self.measure_only

    def end_model_call(self) -> Optional[str]:
        """Count the model call; once per run, the log table (None otherwise): after its first model call, or with
        the refresh mode after the first model call that leaves no layer waiting for its residual's measurement."""
        self.model_calls += 1
        if not self.layers:
            return None
        self.calibrated = True
        if self.table_logged or (self.reuse_on and any(self._pending(r) for r in self.layers.values())):
            return None
        self.table_logged = True
        return self.table()

    def _pending(self, record: LayerRecord) -> bool:
        return self.reuse_on and not record.approximate and record.residual is None

    def should_measure(self, key: LayerKey, residual_possible: Optional[bool] = None) -> bool:
        """Whether this call of layer ``key`` computes both and returns exact. ``residual_possible``: None without
        the refresh mode; else whether the layer can have its residual kept or measured in this model call."""
        if self.measure_only or not self.calibrated or key not in self.layers:
            return True
        record = self.layers[key]
        if residual_possible and self._pending(record):
            return True  # its residual is still to be kept, or to be measured
        layer_keys = list(self.layers)
        return (layer_keys[self.model_calls % len(layer_keys)] == key
                and record.runs(residual_possible is not None) != EXACT)

    def uses_approximation(self, key: LayerKey) -> bool:
        record = self.layers.get(key)
        return record is not None and record.approximate and not self.measure_only

    def runs(self, key: LayerKey, residual_allowed: bool) -> str:
        """What layer ``key`` runs when not measured: APPROXIMATE, RESIDUAL or EXACT."""
        return self.layers[key].runs(residual_allowed)

    def wants_residual(self, key: LayerKey) -> bool:
        """Whether layer ``key`` may still run the approximation plus a residual (not plain, not exact for good)."""
        record = self.layers[key]
        return not record.approximate and record.residual is not False

    def attend(self, key: LayerKey, query_tokens: int, exact: Callable[[], torch.Tensor],
               approximate: Callable[[Optional[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """One served call of layer ``key``: measured (both computed, the exact output returned), else the
        approximation where the layer keeps it, else exact. ``approximate`` may reuse the exact output it is
        given (None when there is none)."""
        if self.should_measure(key):
            exact_out = exact()
            self.record(key, query_tokens, *compare(approximate(exact_out), exact_out))
            return exact_out
        return approximate(None) if self.uses_approximation(key) else exact()

    def record(self, key: LayerKey, query_tokens: int, error: float, cosine: float,
               residual_error: Optional[float] = None) -> None:
        record = self.layers.get(key)
        if record is None:
            record = self.layers[key] = LayerRecord(query_tokens, approximate=True)
        record.errors.append(error)
        record.cosines.append(cosine)
        if self.measurements is not None:
            self.measurements.append((key, query_tokens, error, cosine))
        if error > self.max_error:
            record.approximate = False  # over the bound: exact for the rest of the run
        if residual_error is not None:
            record.residual_errors.append(residual_error)
            if record.residual is not False:
                record.residual = residual_error <= self.max_error  # over it once: exact for the rest of the run

    def table(self) -> str:
        """layer, tokens, measured error, approximate or exact: one line each (with the refresh mode also the error
        with the residual, and approximate+residual)."""
        if self.reuse_on:
            return self._reuse_table()
        lines = ["layer  tokens  rel. error  runs"]
        for (position, _, _), record in self.layers.items():
            lines.append(f"{position:5d}  {record.tokens:6d}  {max(record.errors):10.4f}  "
                         f"{'approximate' if record.approximate else 'exact'}")
        kept = sum(record.approximate for record in self.layers.values())
        lines.append(f"{kept} of {len(self.layers)} layers keep the approximation (max_error={self.max_error:g})")
        return "\n".join(lines)

    def _reuse_table(self) -> str:
        lines = ["layer  tokens  rel. error  with residual  runs"]
        for key, record in self.layers.items():
            residual = f"{max(record.residual_errors):13.4f}" if record.residual_errors else f"{'-':>13s}"
            lines.append(f"{str(key[0]):>5s}  {record.tokens:6d}  {max(record.errors):10.4f}  {residual}  "
                         f"{record.runs(True)}")
        counts = {runs: sum(r.runs(True) == runs for r in self.layers.values()) for runs in (APPROXIMATE, RESIDUAL)}
        lines.append(f"{counts[APPROXIMATE]} of {len(self.layers)} layers run the plain approximation, "
                     f"{counts[RESIDUAL]} the approximation with the residual of their last refresh, the others exact "
                     f"(max_error={self.max_error:g})")
        return "\n".join(lines)
