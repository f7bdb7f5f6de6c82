"""The quality guard: an approximation is kept only on the attention layers where it stays within a stated error.

Layers are told apart by their place in the model call (the n-th attention call the node serves, with its
query and key counts): every model call of a sampling run makes the same calls in the same order. In the first
model call of a run every served layer computes both the approximation and exact attention and returns the
exact output; a layer keeps the approximation afterwards only if its relative L2 error,
||approx - exact|| / ||exact||, is within ``max_error``. In each later model call one layer (rotating) is
measured again and goes back to exact for the rest of the run if it drifted past the bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

LayerKey = Tuple[int, int, int]  # (index of the call in the model call, query tokens, key tokens)


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


@dataclass
class QualityGuard:
    """Per sampling run: which layers may use the approximation. ``max_error`` 0 turns the guard off (the
    approximation runs everywhere); ``measure_only`` measures every call and always returns exact (for
    benchmarks)."""

    max_error: float
    measure_only: bool = False
    layers: Dict[LayerKey, LayerRecord] = field(default_factory=dict)
    model_calls: int = 0  # model calls of this run so far
    calibrated: bool = False  # the first model call of the run is over

    @property
    def active(self) -> bool:
        return self.max_error > 0 or self.measure_only

    def start_run(self) -> None:
        self.layers.clear()
        self.model_calls = 0
        self.calibrated = False

    def end_model_call(self) -> Optional[str]:
        """Count the model call; after the first one of a run, the log table (None otherwise)."""
        self.model_calls += 1
        if self.calibrated or not self.layers:
            return None
        self.calibrated = True
        return self.table()

    def should_measure(self, key: LayerKey) -> bool:
        if self.measure_only or not self.calibrated or key not in self.layers:
            return True
        layer_keys = list(self.layers)
        return layer_keys[self.model_calls % len(layer_keys)] == key and self.layers[key].approximate

    def uses_approximation(self, key: LayerKey) -> bool:
        record = self.layers.get(key)
        return record is not None and record.approximate and not self.measure_only

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

    def record(self, key: LayerKey, query_tokens: int, error: float, cosine: float) -> None:
        record = self.layers.get(key)
        if record is None:
            record = self.layers[key] = LayerRecord(query_tokens, approximate=True)
        record.errors.append(error)
        record.cosines.append(cosine)
        if error > self.max_error:
            record.approximate = False  # over the bound: exact for the rest of the run

    def table(self) -> str:
        """layer, tokens, measured error, approximate or exact: one line each."""
        lines = ["layer  tokens  rel. error  runs"]
        for (position, _, _), record in self.layers.items():
            lines.append(f"{position:5d}  {record.tokens:6d}  {max(record.errors):10.4f}  "
                         f"{'approximate' if record.approximate else 'exact'}")
        kept = sum(record.approximate for record in self.layers.values())
        lines.append(f"{kept} of {len(self.layers)} layers keep the approximation (max_error={self.max_error:g})")
        return "\n".join(lines)
