"""The quality guard's bookkeeping (nodes/guard.py), without ComfyUI: calibration in a run's first model call,
one layer re-measured per later call in rotation, a layer that drifts past the bound goes back to exact."""
from __future__ import annotations

import torch

from efficient_attention_pop.nodes.guard import QualityGuard, compare

LAYERS = [(0, 256, 256), (1, 64, 64), (2, 256, 256)]


def model_call(guard, errors):
    """One model call through every layer; errors: key -> the error the approximation would have.
    -> (keys measured, keys that ran the approximation)."""
    measured, approximated = [], []
    for key in LAYERS:
        if guard.should_measure(key):
            guard.record(key, key[1], errors[key], 1.0 - errors[key])
            measured.append(key)
        elif guard.uses_approximation(key):
            approximated.append(key)
    guard.end_model_call()
    return measured, approximated


def test_first_call_measures_every_layer_and_keeps_those_within_the_bound():
    guard = QualityGuard(0.2)
    errors = {LAYERS[0]: 0.1, LAYERS[1]: 0.3, LAYERS[2]: 0.2}
    measured, approximated = model_call(guard, errors)
    assert measured == LAYERS and approximated == []
    assert guard.calibrated
    assert [guard.uses_approximation(key) for key in LAYERS] == [True, False, True]
    table = guard.table().splitlines()
    assert table[-1] == "2 of 3 layers keep the approximation (max_error=0.2)"
    assert table[2].split() == ["1", "64", "0.3000", "exact"]


def test_later_calls_measure_one_kept_layer_in_rotation():
    guard = QualityGuard(0.5)
    errors = dict.fromkeys(LAYERS, 0.1)
    model_call(guard, errors)
    seen = []
    for _ in range(6):
        measured, approximated = model_call(guard, errors)
        assert len(measured) <= 1 and len(measured) + len(approximated) == len(LAYERS)
        seen.extend(measured)
    assert set(seen) == set(LAYERS)  # every layer is checked again within a few calls


def test_a_layer_that_drifts_past_the_bound_goes_back_to_exact_for_the_run():
    guard = QualityGuard(0.2)
    errors = dict.fromkeys(LAYERS, 0.1)
    model_call(guard, errors)
    errors[LAYERS[1]] = 0.9  # layer 1 drifts
    for _ in range(len(LAYERS) + 1):
        model_call(guard, errors)
    assert not guard.uses_approximation(LAYERS[1])
    assert guard.uses_approximation(LAYERS[0]) and guard.uses_approximation(LAYERS[2])


def test_measure_only_never_uses_the_approximation_and_hands_out_every_measurement():
    measurements = []
    guard = QualityGuard(0.0, measurements)
    model_call(guard, dict.fromkeys(LAYERS, 0.0))
    measured, approximated = model_call(guard, dict.fromkeys(LAYERS, 0.0))
    assert measured == LAYERS and approximated == []
    assert [key for key, *_ in measurements] == LAYERS * 2


def test_compare_gives_relative_error_and_cosine():
    exact = torch.tensor([3.0, 4.0])
    error, cosine = compare(torch.tensor([3.0, 4.0]) * 1.1, exact)
    assert abs(error - 0.1) < 1e-6 and abs(cosine - 1.0) < 1e-6
    error, cosine = compare(torch.tensor([-4.0, 3.0]), exact)
    assert abs(error - 2 ** 0.5) < 1e-6 and abs(cosine) < 1e-6
    error, _ = compare(torch.zeros(2), torch.zeros(2))
    assert error == 0.0
