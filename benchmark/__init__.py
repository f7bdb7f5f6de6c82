"""Benchmarks of the pack, run by ``python -m efficient_attention_pop bench|quality``.

speed.py: every backend's time and memory on diffusion-shaped attention, side by side with torch SDPA.
"""
