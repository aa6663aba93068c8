"""Sample inputs that need no download: photographs shipped with scikit-image and clips made from them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def photograph(name: str = "astronaut", size: int = 256) -> torch.Tensor:
    """An RGB photograph from `skimage.data`, square-cropped and resized: (3, size, size) in [-1, 1]."""
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    side = min(image.shape[1:])
    top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
    image = image[:, top:top + side, left:left + side]
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def panning_clip(image: torch.Tensor, frames: int = 16, size: int = 128, shift: float = 0.03) -> torch.Tensor:
    """A camera pan across `image` (3, H, W): (3, frames, size, size), each frame moved by `shift` of
    the width, with a slow zoom, sampled bilinearly."""
    grids = []
    for t in range(frames):
        zoom = 0.6 - 0.01 * t
        dx = -0.35 + 2 * shift * t
        theta = torch.tensor([[zoom, 0.0, dx], [0.0, zoom, 0.0]])
        grids.append(F.affine_grid(theta[None], [1, 3, size, size], align_corners=False))
    batch = image[None].expand(frames, -1, -1, -1)
    clip = F.grid_sample(batch, torch.cat(grids), mode="bilinear", padding_mode="reflection", align_corners=False)
    return clip.permute(1, 0, 2, 3).clamp(-1, 1)
