"""Image and tensor error measures of the quality benchmark.

Images are (B, C, H, W) in [0, 1], videos (B, C, F, H, W). SSIM is Wang et al. 2004 with an 11 x 11 Gaussian window of sigma 1.5,
K1 = 0.01, K2 = 0.03, per channel, averaged over the pixels whose window lies inside the image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # identical images: reported as this instead of infinity


def psnr_db(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB, peak 1, capped at PSNR_CAP_DB."""
    mse = (image.double() - reference.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP_DB / 10)))).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    profile /= profile.sum()
    return profile[:, None] * profile[None, :]


def ssim(image: torch.Tensor, reference: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """(B,) structural similarity, data range 1 (images smaller than the window use a window of their size)."""
    channels = image.shape[1]
    size = min(window_size, image.shape[-2], image.shape[-1])
    window = _gaussian_window(size).to(image.device)[None, None].expand(channels, 1, size, size)
    x, y = image.double(), reference.double()

    def local_mean(t):
        return F.conv2d(t, window, groups=channels)

    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mean_x ** 2
    var_y = local_mean(y * y) - mean_y ** 2
    covariance = local_mean(x * y) - mean_x * mean_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)
             / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2)))
    return index.flatten(1).mean(1).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors as flat vectors (1.0 for two zero tensors)."""
    a, b = a.double().flatten(), b.double().flatten()
    norms = a.norm() * b.norm()
    return 1.0 if norms == 0 else float(a @ b / norms)


def relative_l2(a: torch.Tensor, reference: torch.Tensor) -> float:
    """||a - reference|| / ||reference|| (0.0 when both are zero)."""
    difference = (a.double() - reference.double()).norm()
    scale = reference.double().norm()
    return 0.0 if difference == 0 else float(difference / scale) if scale > 0 else math.inf


def frames_as_images(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B * F, C, H, W), frame by frame."""
    return video.transpose(1, 2).flatten(0, 1)


def frame_changes(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, C, F - 1, H, W): each frame minus the one before it."""
    return video.double()[:, :, 1:] - video.double()[:, :, :-1]


def motion_ratio(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) how much the video changes from frame to frame, relative to the reference: mean |frame change| of the
    video / the reference's. 1: as much motion; above 1: flicker (changes the reference does not have); below 1:
    frozen frames."""
    video_motion, reference_motion = (frame_changes(t).abs().flatten(1).mean(1) for t in (video, reference))
    return (video_motion / reference_motion.clamp_min(1e-12)).float()


def temporal_error(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) ||frame changes of the video - the reference's|| / ||the reference's||: 0 when the video moves exactly
    as the reference does, whatever its per-frame error that stays the same from frame to frame."""
    difference = (frame_changes(video) - frame_changes(reference)).flatten(1).norm(dim=1)
    return (difference / frame_changes(reference).flatten(1).norm(dim=1).clamp_min(1e-12)).float()
