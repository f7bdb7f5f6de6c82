"""Training data of the proxy model: random square crops of the photographs shipped inside scikit-image.

One class per photograph, and one class for the 100 LFW faces of ``skimage.data.lfw_subset()`` (its
other 100 images are background patches, not used).
A crop rescales the photo by a random factor (log-uniform between "the short side fits the crop" and
"native resolution", so crops range from whole objects to fine detail), takes a random square of the
crop size, and flips it horizontally half the time. Images are (3, S, S) in [-1, 1]; grayscale photos
become three equal channels. All randomness comes from one seeded torch.Generator.

Only the photos that scikit-image has in its wheel are used (the others would be downloaded by pooch);
scikit-image is needed only here, for training.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field", "immunohistochemistry",
    "retina", "brick", "grass", "gravel", "camera", "lfw_faces",
)


def _to_tensor(photo: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) uint8 or [0, 1] float -> (3, H, W) float32 in [-1, 1]."""
    scale = 255.0 if photo.dtype == np.uint8 else 1.0
    image = torch.from_numpy(np.ascontiguousarray(photo)).float() / scale * 2 - 1
    if image.ndim == 2:
        image = image[None].expand(3, -1, -1)
    else:
        image = image.permute(2, 0, 1)
    return image.contiguous()


def load_photos() -> Dict[str, List[torch.Tensor]]:
    """Class name -> list of (3, H, W) images in [-1, 1] (one photo per class, 100 faces for lfw_faces)."""
    from skimage import data

    loaders = {
        "astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket,
        "motorcycle": lambda: data.stereo_motorcycle()[0], "hubble_deep_field": data.hubble_deep_field,
        "immunohistochemistry": data.immunohistochemistry, "retina": data.retina, "brick": data.brick,
        "grass": data.grass, "gravel": data.gravel, "camera": data.camera,
    }
    photos = {name: [_to_tensor(loaders[name]())] for name in CLASS_NAMES if name != "lfw_faces"}
    photos["lfw_faces"] = [_to_tensor(face) for face in data.lfw_subset()[:100]]
    return photos


class PhotoCrops:
    """Seeded stream of (images (B, 3, S, S) in [-1, 1], labels (B,)) batches, classes drawn uniformly."""

    def __init__(self, seed: int):
        photos = load_photos()
        self.photos = [photos[name] for name in CLASS_NAMES]
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def crop(self, photo: torch.Tensor, size: int) -> torch.Tensor:
        """(3, H, W) photo -> (3, size, size): rescaled by a random factor, cropped, maybe flipped."""
        height, width = photo.shape[1:]
        smallest = size / min(height, width)  # the short side just fits the crop
        largest = max(1.0, smallest)  # native resolution, or the whole photo if it is smaller than the crop
        factor = math.exp(math.log(smallest) + self._uniform() * math.log(largest / smallest))
        side = min(round(size / factor), height, width)  # the crop's side in photo pixels
        top, left = self._randint(height - side + 1), self._randint(width - side + 1)
        patch = photo[None, :, top:top + side, left:left + side]
        if side != size:
            patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=side > size,
                                  align_corners=False)
        patch = patch[0].clamp(-1, 1)
        return patch.flip(-1) if self._uniform() < 0.5 else patch

    def batch(self, batch_size: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(len(self.photos), (batch_size,), generator=self.generator)
        images = [self.crop(self.photos[label][self._randint(len(self.photos[label]))], size)
                  for label in labels.tolist()]
        return torch.stack(images), labels
