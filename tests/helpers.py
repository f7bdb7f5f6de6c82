"""Shared test helpers: random ComfyUI-layout inputs and mask builders, and the device the tests run on.

EFFICIENT_ATTENTION_POP_DEVICE=cuda (set by ``gpu-report``) runs the library calls of the device-parametrised
test modules on CUDA: they call ``attention = on_device(attention)``, so inputs are built and references
computed on the CPU as always, and only the call under test runs on the device.
"""
from __future__ import annotations

import functools
import os

import torch

DEVICE = torch.device(os.environ.get("EFFICIENT_ATTENTION_POP_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("EFFICIENT_ATTENTION_POP_DEVICE asks for CUDA, but torch sees no CUDA device")


def to_device(value, device):
    """Tensors (also inside lists, tuples and RegionMasks) moved to ``device``, strides kept where dense."""
    from efficient_attention_pop.attention import RegionMask

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, RegionMask):
        return value.with_query_labels(value.query_labels.to(device))  # the rest moves with the call
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def on_device(function):
    """``function`` run with its tensor arguments on DEVICE and its result brought back to the CPU (as is on CPU)."""
    if DEVICE.type == "cpu":
        return function

    @functools.wraps(function)
    def run(*args, **kwargs):
        result = function(*to_device(args, DEVICE), **{key: to_device(value, DEVICE) for key, value in kwargs.items()})
        return to_device(result, torch.device("cpu"))

    return run

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def comfy_inputs(batch, n, m, heads, dim, dim_v, dtype=torch.float32, seed=0, kv_heads=None):
    """q (B, N, H*D), k (B, M, Hkv*D), v (B, M, Hkv*Dv) drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(batch, n, heads * dim, generator=gen)
    k = torch.randn(batch, m, kv_heads * dim, generator=gen)
    v = torch.randn(batch, m, kv_heads * dim_v, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def to_heads(t, heads):
    """(B, N, H*D) -> (B, H, N, D)."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def from_heads(t):
    """(B, H, N, D) -> (B, N, H*D)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def assert_close(actual, expected, dtype, what=""):
    tol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    assert err <= tol * scale * 4, f"{what}: max abs error {err:.3g} > {tol * scale * 4:.3g}"


def random_mask(form, batch, heads, n, m, gen, dtype=torch.float32, p_keep=0.6):
    """A dense mask of the named form with random holes, and a fully masked query row where the form allows it.

    Returns (mask, mask4d): mask4d holds the same values as a (B|1, H|1, N|1, M) tensor (bool for bool and
    int masks, float64 for additive ones), written out here independently of the library.
    """
    shapes = {
        "2d": (n, m), "3d": (batch, n, m), "3d_b1": (1, n, m), "key_padding": (batch, 1, m),
        "4d": (batch, heads, n, m), "4d_h1": (batch, 1, n, m), "4d_b1h1": (1, 1, n, m),
        "4d_key_padding": (batch, 1, 1, m),
    }
    kind, _, shape_name = form.partition(":")
    shape = shapes[shape_name]
    keep = torch.rand(shape, generator=gen) < p_keep
    if shape[-2] > 1 and shape_name != "key_padding":
        keep[..., min(1, shape[-2] - 1), :] = False  # one fully masked query row
    if kind == "bool":
        return keep, _as4d(keep)
    if kind == "int":
        return keep.to(torch.int64), _as4d(keep)
    additive = torch.zeros(shape).masked_fill(~keep, float("-inf"))
    if kind == "bias":  # finite bias on allowed keys too
        additive = additive + torch.randn(shape, generator=gen).masked_fill(~keep, 0.0)
    additive = additive.to(dtype)
    return additive, _as4d(additive.double())


def _as4d(mask):
    """ComfyUI's reading of mask ranks: 2-D (N, M), 3-D (B, N, M), 4-D as is."""
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask[:, None]
    return mask
