"""The proxy model fixture of the quality benchmark: integrity, shapes, sampler determinism, attention hook."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("safetensors")

from efficient_attention_pop.attention.layout import TokenLayout
from efficient_attention_pop.benchmark.proxy import load_proxy_model, sample_images
from efficient_attention_pop.benchmark.proxy.model import FIXTURE_JSON, FIXTURE_WEIGHTS


@pytest.fixture(scope="module")
def model():
    return load_proxy_model()


def noisy_batch(model, height: int, width: int):
    """Two noisy images (one with a class, one with the null class) at times 0.3 and 0.9."""
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([0.3, 0.9]), torch.tensor([1, model.config.num_classes])


def test_fixture_matches_its_recorded_sha256():
    recorded = json.loads(FIXTURE_JSON.read_text())["sha256"]
    assert hashlib.sha256(FIXTURE_WEIGHTS.read_bytes()).hexdigest() == recorded


@pytest.mark.parametrize("height,width", [(32, 32), (64, 64), (128, 128), (32, 64)])
def test_forward_gives_finite_velocity_of_the_image_shape(model, height, width):
    x, t, labels = noisy_batch(model, height, width)
    with torch.no_grad():
        velocity = model(x, t, labels)
    assert velocity.shape == x.shape
    assert torch.isfinite(velocity).all()


def test_sampler_is_deterministic(model):
    first = sample_images(model, [0, 12], size=32, steps=3, seed=7)
    again = sample_images(model, [0, 12], size=32, steps=3, seed=7)
    other_seed = sample_images(model, [0, 12], size=32, steps=3, seed=8)
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


def test_attention_hook_sees_every_layer_and_replaces_attention(model):
    x, t, labels = noisy_batch(model, 32, 32)
    calls = []

    def exact(q, k, v, layout, layer_index):
        calls.append((layer_index, layout, q.shape))
        return F.scaled_dot_product_attention(q, k, v)

    def zeros(q, k, v, layout, layer_index):
        return torch.zeros_like(q)

    config = model.config
    with torch.no_grad():
        default = model(x, t, labels)
        hooked = model(x, t, labels, attention_fn=exact)
        zeroed = model(x, t, labels, attention_fn=zeros)
    assert torch.equal(hooked, default)
    assert [layer for layer, _, _ in calls] == list(range(config.depth))
    assert calls[0][1] == TokenLayout(frames=1, height=16, width=16, before=config.cond_tokens, after=0)
    assert calls[0][2] == (2, config.heads, config.cond_tokens + 256, config.head_dim)
    assert (zeroed - default).norm() > 0.1 * default.norm()
