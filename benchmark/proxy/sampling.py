"""Deterministic rectified-flow Euler sampler for ProxyDiT (t = 1 pure noise -> t = 0 image)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .model import AttentionFn, ProxyDiT


@torch.no_grad()
def sample_images(model: ProxyDiT, classes: Sequence[int], size: int = 32, steps: int = 12, seed: int = 0,
                  attention_fn: Optional[AttentionFn] = None, guidance: float = 2.0,
                  frames: Optional[int] = None) -> torch.Tensor:
    """One image per entry of ``classes`` -> (len(classes), 3, size, size) in [-1, 1], on the model's device; with
    ``frames`` one video each -> (len(classes), 3, frames, size, size) (a video proxy, frame times 0, 1, ...).

    The starting noise comes from a CPU torch.Generator seeded with ``seed`` (same seed, same noise on any
    device). ``steps`` Euler steps on a uniform time grid; guidance > 1 runs classifier-free guidance
    (each step then evaluates the model on the class and on the null class in one batch of 2B), guidance
    == 1 one plain evaluation per step. ``attention_fn`` is passed to every model evaluation.
    """
    parameter = next(model.parameters())
    labels = torch.as_tensor(list(classes), dtype=torch.long, device=parameter.device)
    shape = (len(labels), model.config.channels) + ((frames,) if frames else ()) + (size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = noise.to(device=parameter.device, dtype=parameter.dtype)
    times = torch.linspace(1.0, 0.0, steps + 1, device=parameter.device)
    guided = guidance != 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
    for t, t_next in zip(times[:-1], times[1:]):
        model_input = torch.cat([x, x]) if guided else x
        velocity = model(model_input, t.expand(len(labels)), labels, attention_fn=attention_fn)
        if guided:
            conditional, unconditional = velocity.chunk(2)
            velocity = unconditional + guidance * (conditional - unconditional)
        x = x + (t_next - t) * velocity
    return x.clamp(-1, 1)
