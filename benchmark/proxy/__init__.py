"""A small Flux-like diffusion transformer trained on photographs: the proxy model of the quality benchmark.

model.py: ProxyDiT (class-conditional rectified flow on pixels, joint attention over cond + image tokens,
2-D rotary, or 3-D for videos, every attention call through one hook) and load_proxy_model() for the shipped fp16
fixtures: the image proxy proxy_dit.safetensors and the video proxy proxy_video_dit.safetensors (each with its
config, training record and sha256 in the .json beside it). sampling.py: the deterministic Euler sampler
sample_images() (images or videos). data.py and train.py (scikit-image needed) made the image fixture;
video_data.py and train_video.py, starting from it, the video fixture.
"""
from .model import VIDEO_WEIGHTS, ProxyConfig, ProxyDiT, load_proxy_model
from .sampling import sample_images

__all__ = ["VIDEO_WEIGHTS", "ProxyConfig", "ProxyDiT", "load_proxy_model", "sample_images"]
