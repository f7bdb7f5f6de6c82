"""A small Flux-like diffusion transformer trained on photographs: the proxy model of the quality benchmark.

model.py: ProxyDiT (class-conditional rectified flow on pixels, joint attention over cond + image tokens,
2-D rotary, every attention call through one hook) and load_proxy_model() for the shipped fp16 fixture
proxy_dit.safetensors (its config, training record and sha256 in proxy_dit.json). sampling.py: the
deterministic Euler sampler sample_images(). data.py and train.py (scikit-image needed) made the fixture.
"""
from .model import ProxyConfig, ProxyDiT, load_proxy_model
from .sampling import sample_images

__all__ = ["ProxyConfig", "ProxyDiT", "load_proxy_model", "sample_images"]
