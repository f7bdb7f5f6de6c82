"""Training clips of the video proxy: a camera moving over the photographs of data.py.

A clip is one photograph seen through a square camera that pans in a straight line, zooms at a constant
rate and maybe turns slowly, sampled at ``frames`` times (0, stride, 2 stride, ...): the motion is
real (every pixel of a frame is the same scene seen from a moved camera), its speed varies from clip to
clip, and a stride of 2 shows the model time gaps twice as long as its frame count alone would. The whole
path stays inside the photograph. Frames are resampled bilinearly from the photograph shrunk (antialiased) to
about the camera's scale, so they do not alias. Clips are (3, F, S, S) in [-1, 1]; all randomness comes from
one seeded torch.Generator, as in data.py.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .data import PhotoCrops

MAX_PAN = 0.5  # the camera moves at most this many camera widths over a clip of 16 time units
MAX_ZOOM = 0.35  # log of the zoom factor over 16 time units, either way
MAX_TURN = 0.4  # radians over 16 time units, either way (a third of the clips turn)
CLIP_TIME = 16.0


class PhotoClips(PhotoCrops):
    """Seeded stream of (clips (B, 3, F, S, S) in [-1, 1], labels (B,), frame times (F,)) batches."""

    def _between(self, low: float, high: float) -> float:
        return low + (high - low) * self._uniform()

    def clip(self, photo: torch.Tensor, frames: int, size: int, stride: int) -> torch.Tensor:
        """(3, H, W) photo -> (3, frames, size, size): the camera path sampled at times 0, stride, ..."""
        height, width = photo.shape[1:]
        span = (frames - 1) * stride / CLIP_TIME  # this clip's duration, in units of CLIP_TIME
        zoom = self._between(-MAX_ZOOM, MAX_ZOOM) * span
        turn = self._between(-MAX_TURN, MAX_TURN) * span if self._uniform() < 1 / 3 else 0.0
        # the camera's side in photo pixels at time 0: from "fits with room to move" down to native resolution
        reach = math.sqrt(2) if turn else 1.0  # a turned square needs its diagonal
        largest = min(height, width) / (reach * math.exp(max(0.0, zoom)) * (1 + MAX_PAN * span))
        smallest = min(float(size), largest)
        side = math.exp(self._between(math.log(smallest), math.log(largest)))
        sides = side * torch.exp(torch.linspace(0, zoom, frames))
        margin = float(sides.max()) * reach / 2
        start = torch.tensor([self._between(margin, width - margin), self._between(margin, height - margin)])
        angle = self._between(0, 2 * math.pi)
        pan = MAX_PAN * span * side * self._uniform()
        end = start + pan * torch.tensor([math.cos(angle), math.sin(angle)])
        end = torch.maximum(torch.minimum(end, torch.tensor([width - margin, height - margin])), torch.tensor(margin))
        shrink = min(1.0, 1.5 * size / side)  # resample from about 1.5 pixels per output pixel
        if shrink < 1:
            photo = F.interpolate(photo[None], scale_factor=shrink, mode="bilinear", antialias=True,
                                  align_corners=False)[0]
        progress = torch.linspace(0, 1, frames)[:, None]
        centres = (start + (end - start) * progress) * shrink  # (F, 2) x, y in the shrunk photo's pixels
        angles = torch.linspace(0, turn, frames)
        cos, sin = torch.cos(angles), torch.sin(angles)
        half = sides * shrink / 2
        shrunk_h, shrunk_w = photo.shape[1:]
        # output (u, v) in [-1, 1] -> photo pixel centre + half * R (u, v) -> normalised photo coordinates
        theta = torch.zeros(frames, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = half * cos * 2 / shrunk_w, -half * sin * 2 / shrunk_w
        theta[:, 1, 0], theta[:, 1, 1] = half * sin * 2 / shrunk_h, half * cos * 2 / shrunk_h
        theta[:, 0, 2] = 2 * centres[:, 0] / shrunk_w - 1
        theta[:, 1, 2] = 2 * centres[:, 1] / shrunk_h - 1
        grid = F.affine_grid(theta, [frames, 3, size, size], align_corners=False)
        clip = F.grid_sample(photo[None].expand(frames, -1, -1, -1), grid, mode="bilinear",
                             padding_mode="border", align_corners=False)
        clip = clip.clamp(-1, 1).transpose(0, 1)  # (3, F, S, S)
        return clip.flip(-1) if self._uniform() < 0.5 else clip

    def clips(self, batch_size: int, frames: int, size: int, stride: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.randint(len(self.photos), (batch_size,), generator=self.generator)
        clips = [self.clip(self.photos[label][self._randint(len(self.photos[label]))], frames, size, stride)
                 for label in labels.tolist()]
        return torch.stack(clips), labels, torch.arange(frames, dtype=torch.float32) * stride
